"""One trial: sampled params -> a training config -> `finetune.training.recipe.train` in its own run dir,
with a Trainer callback that reports eval losses to the pruner; returns the objective or raises."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from finetune.config import TrainConfig, dump_config
from finetune.console import atomic_write_text
from finetune.sweep.config import SweepConfig, base_config, base_params, expand_param, nested_params
from finetune.sweep.search import choice_label


def suggest(trial, sweep: SweepConfig) -> dict[str, Any]:
    """Sample every searched key; returns the dotted training keys to set (dict choices expanded)."""
    out: dict[str, Any] = {}
    for key, spec in sweep.search_space.items():
        if spec.type == "categorical":
            choices = spec.choices or []
            labels = [choice_label(c) for c in choices]
            label = trial.suggest_categorical(key, labels)
            out.update(expand_param(key, choices[labels.index(label)]))
        elif spec.type == "int":
            out[key] = trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1))
        else:
            out[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.type == "loguniform",
                                           step=spec.step)
    return out


def params_to_keys(sweep: SweepConfig, params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        spec = sweep.search_space.get(key)
        if spec is not None and spec.type == "categorical":
            labels = [choice_label(c) for c in spec.choices or []]
            value = (spec.choices or [])[labels.index(value)] if value in labels else value
        out.update(expand_param(key, value))
    return out


def trial_config(sweep: SweepConfig, keys: dict[str, Any], output_dir: str | Path) -> TrainConfig:
    """base + overrides + sampled keys, in `output_dir`; eval at a fixed number of examples."""
    cfg = base_config(sweep, **nested_params(keys))
    cfg.output_dir = str(output_dir)
    if sweep.eval_every_examples:
        t = cfg.training
        per_step = (t.examples_per_step if t.batch_size == "auto"  # the step the run keeps, whatever fits
                    else t.batch_size * t.grad_accum * int(os.environ.get("WORLD_SIZE", "1")))
        cfg.training.eval_steps = max(1, round(sweep.eval_every_examples / per_step))
        cfg.training.save_steps = cfg.training.eval_steps
    return cfg


class TrialMonitor:
    """Trainer callback: eval_loss -> `trial.report` -> prune (stop training); NaN loss -> stop.

    The pruner's step is examples seen, rounded to the `eval_every_examples` grid, so trials with
    different batch sizes compare at the same amount of data; without it, the optimizer step.
    """

    def __init__(self, trial, eval_every_examples: int | None, can_prune: bool = True):
        self.trial = trial
        self.eval_every = eval_every_examples
        self.can_prune = can_prune
        self.n_evals = 0
        self.reported: set[int] = set()
        self.pruned_at: dict[str, int] | None = None
        self.diverged: str | None = None
        self.best_eval_loss = math.inf

    def _as_callback(self):
        from transformers import TrainerCallback

        monitor = self

        class _Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                for key in ("loss", "eval_loss"):
                    v = (logs or {}).get(key)
                    if isinstance(v, float) and not math.isfinite(v):
                        monitor.diverged = f"{key} is {v} at step {state.global_step}"
                        control.should_training_stop = True
                return control

            def on_evaluate(self, args, state, control, metrics=None, **kw):
                v = (metrics or {}).get("eval_loss")
                if v is None or not math.isfinite(v):
                    return control
                monitor.n_evals += 1
                monitor.best_eval_loss = min(monitor.best_eval_loss, v)
                step = state.global_step
                if monitor.eval_every:
                    # Examples seen, on the eval grid (a last eval off the grid maps onto the previous point).
                    seen = state.global_step * args.per_device_train_batch_size * \
                        args.gradient_accumulation_steps * args.world_size
                    step = max(1, round(seen / monitor.eval_every)) * monitor.eval_every
                if step in monitor.reported:
                    return control
                monitor.reported.add(step)
                monitor.trial.report(v, step)
                if monitor.can_prune and monitor.trial.should_prune() and not control.should_training_stop:
                    monitor.pruned_at = {"step": state.global_step, "pruner_step": step}
                    control.should_training_stop = True
                    control.should_save = False
                return control

        return _Callback()


class TrialFailed(RuntimeError):
    """A trial ran but produced no usable objective (NaN loss, no eval)."""


def _best_eval_loss(run_dir: Path) -> float:
    path = run_dir / "metrics.jsonl"
    losses = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                v = json.loads(line).get("eval_loss")
                if isinstance(v, (int, float)):
                    losses.append(float(v))
    if not losses:
        raise TrialFailed(f"no eval_loss in {path}")
    return min(losses)


def _score_adapter(cfg: TrainConfig, run_dir: Path, objective: str) -> tuple[float, dict[str, Any]]:
    """The tuned model's `finetune eval` scores on eval.data (the base is not re-scored per trial)."""
    from finetune.eval.evaluation import extrinsic_scores, intrinsic_scores, read_eval_records
    from finetune.inference.load import load_for_inference

    kind, _, name = objective.partition(".")
    model, tok = load_for_inference(run_dir / ("model" if cfg.adapter == "full" else "adapter"))
    if kind == "preference":
        from finetune.eval.preference import read_preference_records, score_preferences

        records, _ = read_preference_records(cfg.eval.data)
        metrics, _ = score_preferences(model, tok, records[: cfg.eval.max_examples or None],
                                       batch_size=cfg.eval.batch_size, max_length=cfg.max_length)
        scores = {"preference": metrics}
        atomic_write_text(run_dir / "sweep_scores.json", json.dumps(scores, indent=2, default=str))
        return float(metrics[name]), scores
    if kind == "rewards":  # a run that trained from rewards: its own reward functions (its finetune.json)
        from finetune.eval.rewards import read_prompt_records, resolve_rewards, score_reward_model

        out = run_dir / ("model" if cfg.adapter == "full" else "adapter")
        prompts, _ = read_prompt_records(cfg.eval.data)
        scores, _ = score_reward_model(model, tok, prompts[: cfg.eval.max_examples or None], label="tuned",
                                       reward_spec=resolve_rewards("auto", out, None),
                                       max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
        atomic_write_text(run_dir / "sweep_scores.json", json.dumps(scores, indent=2, default=str))
        return float(scores["rewards"][name]), scores
    records, _ = read_eval_records(cfg.eval.data)
    if cfg.eval.max_examples:
        records = records[: cfg.eval.max_examples]
    teacher = None
    if name == "kl_to_teacher":  # the teacher this run distilled from, as `finetune eval` loads it
        from finetune.eval.evaluation import load_eval_teacher, resolve_teacher

        teacher = load_eval_teacher(resolve_teacher("auto", None, False, run_dir / "adapter", run_dir / "model"),
                                     tok, str(cfg.model))
    scores: dict[str, Any] = {"intrinsic": intrinsic_scores(
        model, tok, [r["messages"] for r in records], loss_on=cfg.data.loss_on,
        batch_size=cfg.eval.batch_size, max_length=cfg.max_length, tools=[r.get("tools") for r in records],
        teacher=teacher)}
    if kind == "extrinsic":
        scores["extrinsic"], _ = extrinsic_scores(model, tok, records, metrics=cfg.eval.metrics,
                                                  max_new_tokens=cfg.eval.max_new_tokens,
                                                  batch_size=cfg.eval.batch_size)
    atomic_write_text(run_dir / "sweep_scores.json", json.dumps(scores, indent=2, default=str))
    return float(scores[kind][name]), scores


def run_trial(trial, sweep: SweepConfig) -> float:
    """One training run in OUTPUT/trials/trial-NNNN; returns the objective or raises."""
    import optuna

    from finetune.training.recipe import train

    keys = suggest(trial, sweep)
    if sweep.enqueue_base and sweep.sampler == "grid" and trial.params == base_params(sweep):
        trial.set_user_attr("baseline", True)
    run_dir = Path(sweep.output_dir).resolve() / "trials" / f"trial-{trial.number:04d}"
    trial.set_user_attr("run_dir", str(run_dir))
    cfg = trial_config(sweep, keys, run_dir)
    cfg.eval.after_train = False  # scored below only when the objective needs it
    cfg.overwrite = True  # a re-queued trial number never reuses a dir, but a half-written one may exist
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    atomic_write_text(run_dir / "trial.json", json.dumps(
        {"study": sweep.study_name, "trial": trial.number, "params": trial.params, "keys": keys}, indent=2,
        default=str))
    # tensorboard logs into each trial's own dir (train() only sets this when unset).
    os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
    monitor = TrialMonitor(trial, sweep.eval_every_examples,
                           can_prune=not trial.user_attrs.get("baseline"))
    # train() seeds only when it builds the Trainer, after the LoRA weights are initialised; without
    # this, a trial's init depends on what ran before it in this process (measured: the same
    # baseline gave eval loss 1.3295 and 1.344 in two runs, as the first trial of the process).
    from transformers import set_seed

    set_seed(cfg.seed)
    train(cfg, callbacks=[monitor._as_callback()])
    if not sweep.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if monitor.diverged:
        raise TrialFailed(f"diverged: {monitor.diverged}")
    if monitor.pruned_at:
        trial.set_user_attr("pruned_at_step", monitor.pruned_at["step"])
        trial.set_user_attr("pruned_at", monitor.pruned_at["pruner_step"])
        trial.set_user_attr("best_eval_loss", monitor.best_eval_loss)
        raise optuna.TrialPruned(f"pruned at step {monitor.pruned_at['step']}")
    if cfg.data.eval:
        trial.set_user_attr("best_eval_loss", _best_eval_loss(run_dir))
    if sweep.objective == "eval_loss":
        value = _best_eval_loss(run_dir)
    else:
        value, _ = _score_adapter(cfg, run_dir, sweep.objective)
    if not math.isfinite(value):
        raise TrialFailed(f"objective {sweep.objective} is {value}")
    return value
