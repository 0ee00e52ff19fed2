"""The sweep YAML: its schema, how it is loaded (with `key=value` overrides), and the checks that
every searched value makes a valid training config before any trial runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from finetune.config import (
    ConfigError,
    Section,
    TrainConfig,
    apply_overrides,
    load_config,
    resolve_yaml_path,
    validation_problems,
)
from finetune.sweep.search import choice_label, make_pruner, make_sampler

# Objectives where lower is better; any other objective defaults to `direction: maximize`.
_LOWER_IS_BETTER = {"eval_loss", "intrinsic.nll", "intrinsic.perplexity", "intrinsic.bits_per_byte",
                    "intrinsic.kl_to_teacher"}
_INTRINSIC = {"nll", "perplexity", "bits_per_byte", "token_accuracy", "kl_to_teacher"}
# `finetune eval` on preference pairs (finetune.eval.preference), scored for the tuned model alone.
_PREFERENCE = {"preference_accuracy", "preference_accuracy_per_token", "logp_margin", "logp_margin_per_token",
               "unpaired_logp_margin_per_token"}


class ParamSpec(Section):
    """One searched key. `choices` may hold dicts of dotted keys set together (model + target_modules)."""

    type: Literal["loguniform", "uniform", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = Field(None, gt=0, description="Grid step for uniform/int (int default 1).")
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty `choices` list")
            if self.low is not None or self.high is not None or self.step is not None:
                raise ValueError("categorical takes `choices` only (no low/high/step)")
            labels = [choice_label(c) for c in self.choices]
            if len(set(labels)) != len(labels):
                raise ValueError("`choices` holds duplicates")
            return self
        if self.choices is not None:
            raise ValueError(f"{self.type} takes low/high, not `choices` (use type: categorical)")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs `low` and `high`")
        if not self.low < self.high:
            raise ValueError(f"`low` ({self.low}) must be below `high` ({self.high})")
        if self.type == "loguniform":
            if self.low <= 0:
                raise ValueError("loguniform needs low > 0")
            if self.step is not None:
                raise ValueError("loguniform takes no `step` (Optuna cannot combine log and step)")
        if self.type == "int" and not all(float(v).is_integer() for v in (self.low, self.high, self.step or 1)):
            raise ValueError("int needs whole numbers for low, high and step")
        return self


class SweepConfig(Section):
    base: str = Field(description="Training config (YAML) every trial starts from.")
    overrides: list[str] = Field(default_factory=list, description="key=value applied to `base` in every trial.")
    search_space: dict[str, ParamSpec] = Field(description="Dotted training key -> distribution.")
    objective: str = Field(
        "eval_loss",
        description="eval_loss (best eval loss during the run, on data.eval) or a `finetune eval` score "
        "of the tuned adapter on eval.data: intrinsic.{nll,perplexity,bits_per_byte,token_accuracy}, "
        "intrinsic.kl_to_teacher (method: distill; KL(teacher || student) per scored token), "
        "extrinsic.<metric> (e.g. extrinsic.exact_match), or on preference pairs in eval.data "
        "preference.{preference_accuracy,preference_accuracy_per_token,logp_margin,logp_margin_per_token} "
        "(pairs) or preference.unpaired_logp_margin_per_token (unpaired KTO records), or, for a method that "
        "trains from rewards (grpo), rewards.reward (the weighted total) or rewards.<reward name> on the prompt "
        "records in eval.data (one greedy reply each).",
    )
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="Default: minimize for losses/perplexity, maximize for task metrics."
    )
    sampler: Literal["tpe", "random", "grid", "cmaes", "nsga2"] = "tpe"
    sampler_options: dict[str, Any] = Field(default_factory=dict, description="Keyword args of the Optuna sampler.")
    pruner: Literal["median", "successive_halving", "hyperband", "none"] = "median"
    pruner_options: dict[str, Any] = Field(default_factory=dict, description="Keyword args of the Optuna pruner.")
    eval_every_examples: int | None = Field(
        None, ge=1,
        description="Evaluate every N training examples whatever the trial's batch size, so that the "
        "pruner compares trials at the same amount of data (pruner steps are examples seen). "
        "Default: the base config's eval schedule, pruner steps are optimizer steps.",
    )
    n_trials: int = Field(ge=1, description="Trials in the study, all workers and re-runs together.")
    timeout_s: float | None = Field(None, gt=0, description="No new trial starts after this many seconds.")
    seed: int = Field(0, description="Sampler seed.")
    study_name: str | None = Field(None, description="Default: the sweep file's name.")
    output_dir: str = Field(description="Study, trials/, reports and plots.")
    enqueue_base: bool = Field(
        True, description="Trial 0 runs the base config's own values (the baseline, never pruned)."
    )
    keep_checkpoints: bool = Field(False, description="Keep trials' checkpoints/ (the adapter is always kept).")
    stale_after_s: float = Field(
        600, gt=0, description="A running trial whose worker sent no heartbeat for this long is failed "
        "and queued again (a dead worker on this host is detected at once).",
    )

    @property
    def resolved_direction(self) -> str:
        return self.direction or ("minimize" if self.objective in _LOWER_IS_BETTER else "maximize")


def load_sweep_config(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Load and check a sweep YAML with `key=value` overrides of its keys (the grammar of `finetune
    train`); every problem (sweep keys, base config, search values) at once.

    `base:` written in the file is read from the file's directory (then the current directory, like
    a training config's paths); a `base=` override is read from the current directory.
    """
    p = Path(path)
    source = str(p)
    if not p.is_file():
        raise ConfigError(source, [("<file>", f"sweep file not found: {p}")])
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(source, [(f"line {mark.line + 1}" if mark else "<file>", f"not valid YAML: {exc}")]) from None
    if not isinstance(raw, dict):
        raise ConfigError(source, [("<root>", "a sweep config must be a mapping of keys to values")])
    if isinstance(raw.get("base"), str):
        raw["base"] = resolve_yaml_path(str(Path(raw["base"]).expanduser()), p.parent)
    raw = apply_overrides(raw, overrides or [])
    raw.setdefault("study_name", p.stem)
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(source, validation_problems(err)) from None
    problems = _check_against_base(sweep)
    if problems:
        raise ConfigError(source, problems)
    return sweep


def nested_params(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def expand_param(key: str, value: Any) -> dict[str, Any]:
    """A dict choice sets several dotted keys at once (`name` is only its label)."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "name"}
    return {key: value}


def _lookup(cfg: TrainConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def base_config(sweep: SweepConfig, **extra: Any) -> TrainConfig:
    return load_config(sweep.base, sweep.overrides, **extra)


def _check_against_base(sweep: SweepConfig) -> list[tuple[str, str]]:
    """Each searched value must make a valid training config; the objective must have its data."""
    try:
        base = base_config(sweep)
    except ConfigError as exc:
        return [(f"base ({sweep.base}): {key}", msg) for key, msg in exc.problems]
    problems: list[tuple[str, str]] = []
    for key, spec in sweep.search_space.items():
        values = spec.choices if spec.type == "categorical" else [spec.low, spec.high]
        for i, value in enumerate(values or []):
            if spec.type == "int":
                value = int(value)
            where = f"search_space.{key}" + (f".choices[{i}]" if spec.type == "categorical" else "")
            try:
                base_config(sweep, **nested_params(expand_param(key, value)))
            except ConfigError as exc:
                problems += [(where, f"{k}: {m}") for k, m in exc.problems]
        if sweep.enqueue_base and not problems:
            if _base_param(base, key, spec) is _MISSING:
                shown = {k: _lookup(base, k) for k in expand_param(key, (spec.choices or [None])[0])} \
                    if spec.type == "categorical" else _lookup(base, key)
                problems.append((f"search_space.{key}", f"the base config's value {shown!r} is not in this "
                                 "search space, so the baseline trial cannot run it; widen the space or set "
                                 "enqueue_base: false"))
    obj = sweep.objective
    if obj == "eval_loss":
        if not base.data.eval:
            problems.append(("objective", "eval_loss needs data.eval in the base config (or overrides)"))
    elif obj.startswith(("intrinsic.", "extrinsic.", "preference.")) and base.method_spec.completion_room(base):
        problems.append(("objective", f"method {base.method} trains from rewards on prompt records: use "
                         "rewards.reward (the weighted total) or rewards.<reward name>"))
    elif obj.startswith(("intrinsic.", "extrinsic.", "preference.")):
        kind, _, name = obj.partition(".")
        if not base.eval.data:
            problems.append(("objective", f"{obj} is scored on eval.data; set it in the base config"))
        else:
            from finetune.eval.preference import is_preference_file

            pairs = is_preference_file(base.eval.data)
            if kind == "preference" and not pairs:
                problems.append(("objective", f"{obj} needs preference pairs in eval.data ({base.eval.data} "
                                 "holds chats)"))
            if kind != "preference" and pairs:
                problems.append(("objective", f"eval.data {base.eval.data} holds preference pairs: use "
                                 f"preference.<score> (one of {sorted(_PREFERENCE)})"))
        if kind == "preference" and name not in _PREFERENCE:
            problems.append(("objective", f"unknown preference score {name!r} (one of {sorted(_PREFERENCE)})"))
        elif kind == "preference" and base.eval.data and pairs:
            from finetune.eval.preference import preference_kinds

            needs = "unpaired" if name.startswith("unpaired_") else "paired"
            if needs not in preference_kinds(base.eval.data):
                problems.append(("objective", f"{obj} is scored on {needs} records; eval.data {base.eval.data} "
                                 f"has none"))
        if kind == "intrinsic" and name not in _INTRINSIC:
            problems.append(("objective", f"unknown intrinsic score {name!r} (one of {sorted(_INTRINSIC)})"))
        if name == "kl_to_teacher" and base.method_spec.teacher(base) is None:
            problems.append(("objective", f"{obj} is the KL to the teacher of the run: the base config's "
                             f"method ({base.method}) trains against no teacher"))
        if kind == "extrinsic" and name not in base.eval.metrics:
            problems.append(("objective", f"{name!r} is not in eval.metrics {base.eval.metrics}"))
    elif obj.startswith("rewards."):
        name = obj.partition(".")[2]
        specs = getattr(base.method_spec.settings(base), "rewards", None)
        if not specs:
            problems.append(("objective", f"{obj} scores with the run's reward functions: the base config's method "
                             f"({base.method}) trains from none"))
        elif name not in ("reward", *(r.label for r in specs)):
            problems.append(("objective", f"unknown reward {name!r} (reward, the weighted total, or one of "
                             f"{[r.label for r in specs]})"))
        if not base.eval.data:
            problems.append(("objective", f"{obj} is scored on the prompt records of eval.data; set it in the base "
                             "config"))
    else:
        problems.append(("objective", f"unknown objective {obj!r}: eval_loss, intrinsic.<score>, "
                         "extrinsic.<metric>, preference.<score> or rewards.<reward>"))
    if sweep.pruner != "none" and not base.data.eval:
        problems.append(("pruner", "pruning needs intermediate eval losses: set data.eval, or pruner: none"))
    if sweep.sampler == "grid":
        for key, spec in sweep.search_space.items():
            if spec.type == "loguniform" or (spec.type == "uniform" and spec.step is None):
                problems.append((f"search_space.{key}", "the grid sampler needs choices or a `step`"))
    for name, options in (("sampler", sweep.sampler_options), ("pruner", sweep.pruner_options)):
        try:
            (make_sampler if name == "sampler" else make_pruner)(sweep, check_only=True)
        except (TypeError, ValueError) as exc:
            where = name if "pip install" in str(exc) else f"{name}_options"
            problems.append((where, f"{exc}" + ("" if where == name else f" (options: {options})")))
    return problems


_MISSING = object()


def _base_param(base: TrainConfig, key: str, spec: ParamSpec) -> Any:
    """The Optuna value that reproduces the base config for `key`, or _MISSING."""
    if spec.type == "categorical":
        for choice in spec.choices or []:
            if all(_lookup(base, k) == v for k, v in expand_param(key, choice).items()):
                return choice_label(choice)
        return _MISSING
    value = _lookup(base, key)
    assert spec.low is not None and spec.high is not None
    if not spec.low <= value <= spec.high:
        return _MISSING
    return int(value) if spec.type == "int" else float(value)


def base_params(sweep: SweepConfig) -> dict[str, Any]:
    base = base_config(sweep)
    return {k: _base_param(base, k, spec) for k, spec in sweep.search_space.items()}
