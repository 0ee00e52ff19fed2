"""`method: grpo` on TRL's GRPOTrainer, fed by the kit's data cache (the method's record, settings and
docs: finetune.methods.grpo; its reward functions: finetune.methods.rewards).

What the kit adds around TRL's trainer, and nothing else:
  - prompts are rendered by the run's chat template and tokenized once, into the data cache
    (finetune.data.prompts); the trainer generates from the cached ids (`_tokenize_prompts`) instead
    of rendering every prompt again at every step, and the records' columns reach the reward functions;
  - generation stops at the template's end-of-turn token too (ChatML's <|im_end|> is not every
    tokenizer's eos);
  - the reward functions are the config's (weights, names, failures counted instead of fatal);
  - each training log line adds where the time went: `rollout/tokens_per_s` (completion tokens
    generated per second of generation, all ranks), `rollout/share` (the fraction of the interval
    spent generating and scoring), `train/tokens_per_s` (prompt + completion tokens trained on per
    second outside generation), achieved `tflops` and `mfu` / `mfu_6n` over the interval with
    `train/mfu` and `rollout/mfu` for each phase over its own time (grpo_flops: the conventions of
    finetune.training.throughput), `rewards/<name>/errors`, and `peak_mem_gib`;
  - the run directory, checkpoints, pre-emption, metrics and export are the SFT recipe's.

The reference model (beta > 0) is TRL's: under LoRA the starting adapter's frozen copy (the base
model for a fresh adapter: TRL scores it with the adapter disabled, no second copy of the weights);
under full fine-tuning a second model loaded from the same path.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer

from finetune.config import ConfigError, TrainConfig
from finetune.data.kinds import PROMPTS
from finetune.data.prompts import decode_row
from finetune.methods.rewards import build_rewards

__all__ = ["arguments", "collator", "records", "trainer", "before_model", "run_info", "KitGRPOTrainer", "grpo_flops"]

logger = logging.getLogger(__name__)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def arguments(cfg: TrainConfig) -> tuple[type, dict[str, Any]]:
    """GRPOConfig and the fields the kit sets on it beyond the SFT recipe's TrainingArguments."""
    g, t = cfg.grpo, cfg.training
    world = _world_size()
    per_step = t.batch_size * world * t.grad_accum
    if per_step % g.num_generations:
        raise ConfigError("grpo config", [("training.batch_size", (
            f"an optimizer step holds batch_size {t.batch_size} x {world} rank(s) x grad_accum {t.grad_accum} = "
            f"{per_step} completions, not a multiple of grpo.num_generations ({g.num_generations}): every prompt's "
            "group of completions must be in one step"))])
    if cfg.data.eval:
        per_eval = (t.eval_batch_size or t.batch_size) * world
        if per_eval % g.num_generations:
            raise ConfigError("grpo config", [("training.eval_batch_size", (
                f"{per_eval} completions per evaluation batch ({world} rank(s)) is not a multiple of "
                f"grpo.num_generations ({g.num_generations})"))])
    return GRPOConfig, {
        "beta": g.beta,
        "loss_type": g.loss_type,
        "num_generations": g.num_generations,
        "max_completion_length": g.max_completion_length,
        "temperature": g.temperature,
        "top_p": g.top_p,
        "top_k": g.top_k,
        "epsilon": g.epsilon,
        "epsilon_high": g.epsilon_high,
        "scale_rewards": g.scale_rewards,
        "num_iterations": g.num_iterations,
        "mask_truncated_completions": g.mask_truncated_completions,
        "reward_weights": [r.weight for r in g.rewards],
        # Dropout follows lora.dropout, as for every method (TRL turns it off by default).
        "disable_dropout": False,
        # The batch is a list of records, not input_ids: TRL counts the tokens it generates itself.
        "include_num_input_tokens_seen": "no",
        # The sampler is TRL's (each prompt repeated num_generations times, over the ranks).
        "train_sampling_strategy": "random",
        "metric_for_best_model": "eval_reward" if cfg.data.eval else None,
        "greater_is_better": True if cfg.data.eval else None,
        "log_completions": False,
    }


def records(rows: list[dict]) -> list[dict]:
    """The collator: a batch is the list of its cached rows (TRL's GRPOTrainer decodes them itself)."""
    return rows


def collator(cfg: TrainConfig, tokenizer):
    return records


def before_model(cfg: TrainConfig, tokenizer) -> None:
    """The reward functions are imported and built before any weights load: a typo in a
    `module:function` path fails in a second, naming its key."""
    build_rewards(cfg.grpo.rewards, cfg.grpo.max_completion_length)


def trainer(cfg: TrainConfig, **common):
    for key in ("group_by_length", "group_window", "tokens_per_batch", "packing", "heavy_early"):
        common.pop(key, None)
    rewards = build_rewards(cfg.grpo.rewards, cfg.grpo.max_completion_length)
    return KitGRPOTrainer(reward_funcs=rewards, **common)


class KitGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer generating from the kit's cached prompt ids, stopping at the chat template's
    end of turn, with the kit's throughput and reward-failure lines in every training log."""

    def __init__(self, *args, reward_funcs, data_collator=None, **kwargs):
        super().__init__(*args, reward_funcs=reward_funcs, **kwargs)
        if data_collator is not None:  # a list of rows either way (TRL's is the identity too)
            self.data_collator = data_collator
        from finetune.data.chat_template import end_of_turn_token

        self.kit_rewards = list(reward_funcs)
        eot = end_of_turn_token(self._tokenizer)
        eot_id = self._tokenizer.convert_tokens_to_ids(eot) if eot else None
        if isinstance(eot_id, int) and eot_id != self._tokenizer.unk_token_id and eot_id not in self.eos_token_ids:
            self.eos_token_ids = [*self.eos_token_ids, eot_id]
            if getattr(self, "generation_config", None) is not None:
                self.generation_config.eos_token_id = self.eos_token_ids
                self.generation_kwargs["eos_token_id"] = self.eos_token_ids
        self._cached_prompt_ids: list[list[int]] | None = None
        self._acct = dict.fromkeys(_COUNTS, 0.0)
        self._t_log: float | None = None
        self.rollout_total = {"seconds": 0.0, **dict.fromkeys(_COUNTS, 0.0), **dict.fromkeys(_FLOPS, 0.0)}
        self._flops = None  # finetune.training.throughput.ModelFlops, at the first log
        self._peak: tuple[float, str] | None = None

    # ---- the data: cached rows -> TRL's records, prompts already tokenized ----
    def _generate_and_score_completions(self, inputs):
        missing = set(PROMPTS.columns) - set(inputs[0]) if inputs else set()
        if missing:
            raise ValueError(f"the prompts batch lacks {sorted(missing)}: build it with finetune's data cache")
        records = [decode_row(row) for row in inputs]
        self._cached_prompt_ids = [r.pop("prompt_ids") for r in records]
        # TRL hands the reward functions the first record's keys, one value per record: a record without
        # a column another one has (a prompt with no reference answer) gets None there, "no value".
        keys = dict.fromkeys(k for r in records for k in r)
        for r in records:
            for k in keys:
                r.setdefault(k, None)
        try:
            return super()._generate_and_score_completions(records)
        finally:
            self._cached_prompt_ids = None

    def _tokenize_prompts(self, prompts: list):
        ids = self._cached_prompt_ids
        if ids is None or len(ids) != len(prompts):  # a path the kit does not feed (e.g. a rollout_func)
            return super()._tokenize_prompts(prompts)
        return ids, None, {}

    # ---- where the time goes ----
    def _generate(self, prompts: list):
        if self._t_log is None:
            self._t_log = time.perf_counter()
        started = time.perf_counter()
        out = super()._generate(prompts)
        if self.model.training:
            self._acct["gen_s"] += time.perf_counter() - started
            self._acct["gen_tokens"] += float(sum(len(c) for c in out[1]))
            whole = [len(p) + len(c) for p, c in zip(out[0], out[1])]  # host lists: no synchronisation
            self._acct["gen_seq_tokens"] += float(sum(whole))
            self._acct["gen_sum_sq"] += float(sum(n * n for n in whole))
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._t_log is None:
            self._t_log = time.perf_counter()
        if model.training:  # device tensors: read at log time, no host synchronisation per micro-batch
            rows = inputs["prompt_mask"].sum(dim=1, dtype=torch.float64) + inputs["completion_mask"].sum(
                dim=1, dtype=torch.float64)
            self._acct["train_tokens"] = self._acct["train_tokens"] + rows.sum()
            self._acct["train_sum_sq"] = self._acct["train_sum_sq"] + (rows * rows).sum()
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._t_log is not None:
            logs.update(self._interval())
        super().log(logs, start_time)

    def _interval(self) -> dict[str, float]:
        from finetune.training.throughput import device_peak, model_flops, peak_memory

        if self._flops is None:  # once; the peak's matmul is not the run's time
            started = time.perf_counter()
            self._flops = model_flops(self.accelerator.unwrap_model(self.model))
            self._peak = device_peak(self.args.device)
            self._t_log += time.perf_counter() - started
        now = time.perf_counter()
        dt = max(now - self._t_log, 1e-9)
        self._t_log = now
        a = self._acct
        errors = [float(r.take_errors()) for r in self.kit_rewards]
        local = torch.stack([torch.as_tensor(a[k], dtype=torch.float64).to(self.accelerator.device)
                             for k in _SUMMED] + [torch.tensor(e, dtype=torch.float64, device=self.accelerator.device)
                                                  for e in errors])
        summed = self.accelerator.reduce(local, reduction="sum").tolist()
        counts, errors = dict(zip(_SUMMED, summed)), summed[len(_SUMMED):]
        counts["gen_s"] = gen_s = a["gen_s"]  # the ranks generate in lockstep: this rank's time is the step's
        flops = grpo_flops(self._flops, counts)
        world = self.accelerator.num_processes
        total = self.rollout_total
        total["seconds"] += dt
        for k, v in (*counts.items(), *flops.items()):
            total[k] += v
        self._acct = dict.fromkeys(_COUNTS, 0.0)
        out = {"rollout/tokens_per_s": round(counts["gen_tokens"] / max(gen_s, 1e-9), 1),
               "rollout/share": round(min(1.0, gen_s / dt), 4),
               "train/tokens_per_s": round(counts["train_tokens"] / max(dt - gen_s, 1e-9), 1),
               **_utilisation(flops, dt, gen_s, world, self._peak[0]),
               "peak_mem_gib": round(peak_memory(self.args.device) / 2**30, 3)}
        for reward, n in zip(self.kit_rewards, errors):
            out[f"rewards/{reward.__name__}/errors"] = n
        return out

    def throughput_summary(self) -> dict[str, Any] | None:
        """The run's rollout and training throughput over its logged intervals, and the reward
        functions' failures by reason (all ranks): what run.json records."""
        from finetune.training.throughput import peak_memory

        t = self.rollout_total
        if t["seconds"] <= 0 or self._peak is None:
            return None
        gen_tps = t["gen_tokens"] / max(t["gen_s"], 1e-9)
        train_tps = t["train_tokens"] / max(t["seconds"] - t["gen_s"], 1e-9)
        share = t["gen_s"] / t["seconds"]
        use = _utilisation({k: t[k] for k in _FLOPS}, t["seconds"], t["gen_s"], self.accelerator.num_processes,
                           self._peak[0])
        return {"line": f"rollouts: {t['gen_tokens']:,.0f} completion tokens at {gen_tps:,.0f} tokens/s, "
                        f"{100 * share:.0f}% of the time; training {train_tps:,.0f} tokens/s; MFU "
                        f"{100 * use['mfu']:.1f}% (training {100 * use['train/mfu']:.1f}%, rollouts "
                        f"{100 * use['rollout/mfu']:.1f}%) of {self._peak[1]}",
                "seconds": t["seconds"], "rollout_seconds": t["gen_s"], "rollout_share": round(share, 4),
                "rollout_tokens": int(t["gen_tokens"]), "rollout_tokens_per_s": round(gen_tps, 1),
                "train_tokens": int(t["train_tokens"]), "train_tokens_per_s": round(train_tps, 1),
                "tflops_per_device": use["tflops"], "mfu": use["mfu"], "mfu_6n": use["mfu_6n"],
                "train_mfu": use["train/mfu"], "rollout_mfu": use["rollout/mfu"], "mfu_peak": self._peak[1],
                "flops": {k: t[k] for k in _FLOPS},
                "flops_per_token": {"kit": self._flops.per_token(), "6n": self._flops.per_token("6n"),
                                    "generation": 2 * (self._flops.frozen + self._flops.trainable)},
                "peak_mem_gib": round(peak_memory(self.args.device) / 2**30, 3),
                "reward_errors": self._reward_errors()}

    def _reward_errors(self) -> dict[str, dict[str, int]]:
        """Each reward function's failures by reason, summed over the ranks (every rank calls this)."""
        from collections import Counter

        mine = {r.__name__: dict(r.total_errors) for r in self.kit_rewards}
        everyone = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, mine)
        out: dict[str, Counter] = {}
        for rank in everyone:
            for name, reasons in rank.items():
                out.setdefault(name, Counter()).update(reasons)
        return {name: dict(c) for name, c in out.items() if c}


# What each interval counts (summed over the ranks at log time; gen_s is this rank's seconds of generation).
_SUMMED = ("gen_tokens", "gen_seq_tokens", "gen_sum_sq", "train_tokens", "train_sum_sq")
_COUNTS = ("gen_s", *_SUMMED)
_FLOPS = ("train_flops", "train_flops_6n", "rollout_flops")


def grpo_flops(flops, counts: dict[str, float]) -> dict[str, float]:
    """Useful FLOPs of a GRPO interval (finetune.training.throughput's conventions): training, the policy's
    forward and backward over each row's prompt + completion tokens (4N+6N_trainable, and 6N), with
    attention 12 x layers x width x s^2 per row; rollouts, one forward's work over prompt + completion
    (what a KV-cached generation computes): 2 FLOPs per matmul weight per token, attention 4 x layers x
    width x s^2. A reference's forward (beta > 0) and the old policy's (num_iterations > 1) are cost, not
    counted."""
    return {"train_flops": counts["train_tokens"] * flops.per_token() + flops.attention(counts["train_sum_sq"]),
            "train_flops_6n": counts["train_tokens"] * flops.per_token("6n") + flops.attention(counts["train_sum_sq"]),
            "rollout_flops": counts["gen_seq_tokens"] * 2 * (flops.frozen + flops.trainable)
            + flops.attention(counts["gen_sum_sq"]) / 3}


def _utilisation(f: dict[str, float], seconds: float, gen_s: float, world: int, peak: float) -> dict[str, float]:
    """Per device: achieved TFLOP/s and MFU over the whole interval (training + rollouts), and of each phase
    over its own time."""
    from finetune.training.throughput import significant

    def rate(x: float, s: float) -> float:
        return x / max(s, 1e-9) / max(1, world)

    whole = rate(f["train_flops"] + f["rollout_flops"], seconds)
    return {"tflops": significant(whole / 1e12), "mfu": significant(whole / peak),
            "mfu_6n": significant(rate(f["train_flops_6n"] + f["rollout_flops"], seconds) / peak),
            "train/mfu": significant(rate(f["train_flops"], seconds - gen_s) / peak),
            "rollout/mfu": significant(rate(f["rollout_flops"], gen_s) / peak)}


def run_info(cfg: TrainConfig) -> dict[str, Any]:
    """finetune.json's record of the reward functions (finetune.methods.rewards.RECORD_KEY): what
    `finetune eval --adapter RUN/adapter` scores held-out prompts with by default."""
    from finetune.methods.rewards import RECORD_KEY

    return {RECORD_KEY: {"rewards": [r.model_dump(by_alias=True, exclude_none=True) for r in cfg.grpo.rewards],
                         "max_completion_length": cfg.grpo.max_completion_length}}
