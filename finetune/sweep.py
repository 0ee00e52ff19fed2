"""`finetune sweep`: hyperparameter search on Optuna; one trial = one full `finetune train` run.

    finetune sweep SWEEP.yaml [--storage URL] [--workers N]

    sweep YAML ─ base training config + search space ─► Optuna study (SQLite in output_dir by default;
    PostgreSQL or a journal file when workers on several nodes share it)
      each trial: base + sampled params ─► OUTPUT/trials/trial-NNNN/ (a normal run dir); eval_loss
      at every evaluation goes to the pruner, which may stop the run early ─► objective
    ─► OUTPUT/trials.csv, trials.md, best_config.yaml, optimization_history.png,
       param_importances.png, intermediate_values.png

Re-running the same command resumes the study: finished trials (complete, pruned, failed) count
toward `n_trials`; a trial whose worker died (kill -9, node lost) is marked failed and its params
are queued again. Workers share one budget: a trial is started only under a study lock (a file
lock for SQLite and journal files, a PostgreSQL advisory lock for a database), so N workers never
run more than `n_trials` trials between them.

Search and pruning are Optuna's (samplers, pruners, storages, plots); this module only maps a
sweep YAML onto them and runs each trial through `finetune.train.train`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import inspect
import io
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from finetune.config import ConfigError, TrainConfig, _problems, dump_config, load_config
from finetune.utils import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "ParamSpec",
    "SweepConfig",
    "load_sweep_config",
    "trial_config",
    "run_worker",
    "run_sweep",
    "write_reports",
    "add_sweep_arguments",
    "sweep_command",
]

# Objectives where lower is better; any other objective defaults to `direction: maximize`.
_LOWER_IS_BETTER = {"eval_loss", "intrinsic.nll", "intrinsic.perplexity", "intrinsic.bits_per_byte"}
_INTRINSIC = {"nll", "perplexity", "bits_per_byte", "token_accuracy"}
_HEARTBEAT_S = 30.0


# ----------------------------------------------------------------------------------------------
# sweep config
# ----------------------------------------------------------------------------------------------
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamSpec(_Section):
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


class SweepConfig(_Section):
    base: str = Field(description="Training config (YAML) every trial starts from.")
    overrides: list[str] = Field(default_factory=list, description="key=value applied to `base` in every trial.")
    search_space: dict[str, ParamSpec] = Field(description="Dotted training key -> distribution.")
    objective: str = Field(
        "eval_loss",
        description="eval_loss (best eval loss during the run, on data.eval) or a `finetune eval` score "
        "of the tuned adapter on eval.data: intrinsic.{nll,perplexity,bits_per_byte,token_accuracy} "
        "or extrinsic.<metric> (e.g. extrinsic.exact_match).",
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


def choice_label(choice: Any) -> Any:
    """Optuna stores categorical values as str/int/float/bool/None; dicts and lists get a JSON label."""
    if choice is None or isinstance(choice, (str, int, float, bool)):
        return choice
    if isinstance(choice, dict) and isinstance(choice.get("name"), str):
        return choice["name"]
    return json.dumps(choice, sort_keys=True)


def _resolve_path(value: str, sweep_dir: Path) -> str:
    """Like training configs: relative to the current directory first, then to the sweep file."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists() or not (sweep_dir / p).exists():
        return str(p)
    return str(sweep_dir / p)


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Load and check a sweep YAML; every problem (sweep keys, base config, search values) at once."""
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
        raw["base"] = _resolve_path(raw["base"], p.parent)
    raw.setdefault("study_name", p.stem)
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(source, _problems(err)) from None
    problems = _check_against_base(sweep)
    if problems:
        raise ConfigError(source, problems)
    return sweep


def _nested(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _expand(key: str, value: Any) -> dict[str, Any]:
    """A dict choice sets several dotted keys at once (`name` is only its label)."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "name"}
    return {key: value}


def _lookup(cfg: TrainConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _base_config(sweep: SweepConfig, **extra: Any) -> TrainConfig:
    return load_config(sweep.base, sweep.overrides, **extra)


def _check_against_base(sweep: SweepConfig) -> list[tuple[str, str]]:
    """Each searched value must make a valid training config; the objective must have its data."""
    try:
        base = _base_config(sweep)
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
                _base_config(sweep, **_nested(_expand(key, value)))
            except ConfigError as exc:
                problems += [(where, f"{k}: {m}") for k, m in exc.problems]
        if sweep.enqueue_base and not problems:
            if _base_param(base, key, spec) is _MISSING:
                shown = {k: _lookup(base, k) for k in _expand(key, (spec.choices or [None])[0])} \
                    if spec.type == "categorical" else _lookup(base, key)
                problems.append((f"search_space.{key}", f"the base config's value {shown!r} is not in this "
                                 "search space, so the baseline trial cannot run it; widen the space or set "
                                 "enqueue_base: false"))
    obj = sweep.objective
    if obj == "eval_loss":
        if not base.data.eval:
            problems.append(("objective", "eval_loss needs data.eval in the base config (or overrides)"))
    elif obj.startswith(("intrinsic.", "extrinsic.")):
        kind, _, name = obj.partition(".")
        if not base.eval.data:
            problems.append(("objective", f"{obj} is scored on eval.data; set it in the base config"))
        if kind == "intrinsic" and name not in _INTRINSIC:
            problems.append(("objective", f"unknown intrinsic score {name!r} (one of {sorted(_INTRINSIC)})"))
        if kind == "extrinsic" and name not in base.eval.metrics:
            problems.append(("objective", f"{name!r} is not in eval.metrics {base.eval.metrics}"))
    else:
        problems.append(("objective", f"unknown objective {obj!r}: eval_loss, intrinsic.<score> or "
                         "extrinsic.<metric>"))
    if sweep.pruner != "none" and not base.data.eval:
        problems.append(("pruner", "pruning needs intermediate eval losses: set data.eval, or pruner: none"))
    if sweep.sampler == "grid":
        for key, spec in sweep.search_space.items():
            if spec.type == "loguniform" or (spec.type == "uniform" and spec.step is None):
                problems.append((f"search_space.{key}", "the grid sampler needs choices or a `step`"))
    for name, options in (("sampler", sweep.sampler_options), ("pruner", sweep.pruner_options)):
        try:
            (_make_sampler if name == "sampler" else _make_pruner)(sweep, check_only=True)
        except (TypeError, ValueError) as exc:
            where = name if "pip install" in str(exc) else f"{name}_options"
            problems.append((where, f"{exc}" + ("" if where == name else f" (options: {options})")))
    return problems


_MISSING = object()


def _base_param(base: TrainConfig, key: str, spec: ParamSpec) -> Any:
    """The Optuna value that reproduces the base config for `key`, or _MISSING."""
    if spec.type == "categorical":
        for choice in spec.choices or []:
            if all(_lookup(base, k) == v for k, v in _expand(key, choice).items()):
                return choice_label(choice)
        return _MISSING
    value = _lookup(base, key)
    assert spec.low is not None and spec.high is not None
    if not spec.low <= value <= spec.high:
        return _MISSING
    return int(value) if spec.type == "int" else float(value)


# ----------------------------------------------------------------------------------------------
# optuna pieces
# ----------------------------------------------------------------------------------------------
def _grid(sweep: SweepConfig) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for key, spec in sweep.search_space.items():
        if spec.type == "categorical":
            grid[key] = [choice_label(c) for c in spec.choices or []]
        else:
            assert spec.low is not None and spec.high is not None
            step = spec.step or 1
            n = int(math.floor((spec.high - spec.low) / step + 1e-9)) + 1
            values = [spec.low + i * step for i in range(n)]
            grid[key] = [int(v) for v in values] if spec.type == "int" else values
    return grid


def _make_sampler(sweep: SweepConfig, check_only: bool = False, n_existing: int = 0):
    """The sampler for the next trial. Its seed is `seed` + the number of trials already in the
    study: a resumed run, or a second worker, must not replay the first one's random draws (with
    one fixed seed, every worker's first sampled trial has the same params)."""
    import optuna

    kw = dict(sweep.sampler_options)
    # Not for the grid: its seed shuffles the grid, and grid ids stored in trials index that order.
    kw["seed"] = kw.get("seed", sweep.seed) + (0 if sweep.sampler == "grid" else n_existing)
    classes = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
               "cmaes": optuna.samplers.CmaEsSampler, "nsga2": optuna.samplers.NSGAIISampler}
    if sweep.sampler == "grid":
        return _GridSampler(_grid(sweep), **kw)
    if sweep.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401  (Optuna's CMA-ES sampler needs it; imported lazily there)
        except ImportError:
            raise ValueError("sampler: cmaes needs the cmaes package: pip install cmaes") from None
    return classes[sweep.sampler](**kw)


def _grid_size(sweep: SweepConfig) -> int:
    return math.prod(len(v) for v in _grid(sweep).values())


def _grid_sampler_class():
    from optuna.samplers import GridSampler

    class GridSamplerNoStop(GridSampler):
        """GridSampler whose `after_trial` does not call `study.stop()` (which only works inside
        `study.optimize`); run_worker stops once every grid point has been started."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return GridSamplerNoStop


def _GridSampler(*args, **kwargs):
    return _grid_sampler_class()(*args, **kwargs)


def _make_pruner(sweep: SweepConfig, check_only: bool = False):
    import optuna

    kw = dict(sweep.pruner_options)
    if sweep.pruner == "none":
        if kw:
            raise ValueError("pruner: none takes no options")
        return optuna.pruners.NopPruner()
    classes = {"median": optuna.pruners.MedianPruner, "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
               "hyperband": optuna.pruners.HyperbandPruner}
    return classes[sweep.pruner](**kw)


def default_storage(sweep: SweepConfig) -> str:
    return f"sqlite:///{(Path(sweep.output_dir) / 'study.db').resolve()}"


def _make_storage(url: str):
    """`journal:///path/file.log` -> JournalStorage (file backend); anything else -> RDBStorage."""
    import optuna

    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.removeprefix("journal://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # Several local workers write to one file: wait for SQLite's lock instead of failing at once.
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    return optuna.storages.RDBStorage(_with_pg_driver(url))


def _with_pg_driver(url: str) -> str:
    """`postgresql://` names no driver; SQLAlchemy 2.1 then wants psycopg 3. Use whichever is installed."""
    import importlib.util

    if not url.startswith("postgresql://"):
        return url
    for module, scheme in (("psycopg", "postgresql+psycopg://"), ("psycopg2", "postgresql+psycopg2://")):
        if importlib.util.find_spec(module) is not None:
            return scheme + url.removeprefix("postgresql://")
    raise ConfigError("--storage", [("--storage", "PostgreSQL needs a driver: pip install psycopg2-binary "
                                     "(or psycopg[binary])")])


class StudyLock:
    """Serializes "is there budget left? then start a trial" across every worker of a study.

    Files (SQLite, journal): an flock on a file beside them (all workers on one host, or a shared
    filesystem with working locks). PostgreSQL: a session advisory lock. Held for milliseconds.
    """

    def __init__(self, url: str, study_name: str):
        self.url = url
        self.key = int.from_bytes(hashlib.sha1(study_name.encode()).digest()[:8], "big", signed=True)
        self._engine = None
        self._lockfile: Path | None = None
        self._thread_lock = threading.Lock()
        # Not `<file>.lock`: Optuna's journal backend takes that name for its own symlink lock.
        if url.startswith("sqlite:///"):
            self._lockfile = Path(url.removeprefix("sqlite:///") + ".sweep-lock")
        elif url.startswith("journal://"):
            self._lockfile = Path(url.removeprefix("journal://") + ".sweep-lock")
        elif url.startswith("postgresql"):
            import sqlalchemy
            from sqlalchemy.pool import NullPool

            self._engine = sqlalchemy.create_engine(_with_pg_driver(url), poolclass=NullPool)
        else:
            logger.warning("no cross-worker lock for %s: concurrent workers may start a few trials past "
                           "n_trials", url.split("://")[0])

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self._thread_lock:
            if self._lockfile is not None:
                import fcntl

                self._lockfile.parent.mkdir(parents=True, exist_ok=True)
                with open(self._lockfile, "a") as fh:
                    fcntl.flock(fh, fcntl.LOCK_EX)
                    try:
                        yield
                    finally:
                        fcntl.flock(fh, fcntl.LOCK_UN)
            elif self._engine is not None:
                import sqlalchemy

                with self._engine.connect() as conn:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
                    try:
                        yield
                    finally:
                        conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            else:
                yield


def open_study(sweep: SweepConfig, storage_url: str, lock: StudyLock | None = None):
    """Create or load the study (same name + storage = same study); queue the baseline once."""
    import optuna

    lock = lock or StudyLock(storage_url, sweep.study_name or "sweep")
    storage = _make_storage(storage_url)
    with lock.hold():
        study = optuna.create_study(storage=storage, study_name=sweep.study_name, load_if_exists=True,
                                    direction=sweep.resolved_direction, sampler=_make_sampler(sweep),
                                    pruner=_make_pruner(sweep))
        if study.direction.name.lower() != sweep.resolved_direction:
            raise ConfigError(str(storage_url), [("direction", f"study {sweep.study_name!r} already exists "
                                                  f"with direction {study.direction.name.lower()}; use another "
                                                  "study_name or storage")])
        # The grid sampler does not count an enqueued trial as its grid point (it would run the
        # point twice); on a grid the baseline is the grid point itself, flagged in _run_trial.
        if sweep.enqueue_base and sweep.sampler != "grid" and not study.get_trials(deepcopy=False):
            study.enqueue_trial(_base_params(sweep), user_attrs={"baseline": True})
    return study, storage, lock


def _base_params(sweep: SweepConfig) -> dict[str, Any]:
    base = _base_config(sweep)
    return {k: _base_param(base, k, spec) for k, spec in sweep.search_space.items()}


def _counts_toward_budget(t) -> bool:
    """Finished or running trials count; a FAIL without our `error` attr is a dead worker's trial."""
    from optuna.trial import TrialState

    if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
        return True
    return t.state == TrialState.FAIL and "error" in t.user_attrs


def _worker_alive(attrs: dict[str, Any]) -> bool:
    if attrs.get("host") != socket.gethostname() or "pid" not in attrs:
        return True  # another host: only its heartbeat tells
    import psutil

    try:
        return abs(psutil.Process(attrs["pid"]).create_time() - attrs.get("pid_started", 0)) < 1.0
    except psutil.Error:
        return False


def _reclaim_dead_trials(study, storage, sweep: SweepConfig) -> list[int]:
    """Fail RUNNING trials whose worker is gone and queue their params again. Call under the lock."""
    from optuna.trial import TrialState

    reclaimed = []
    now = time.time()
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = t.user_attrs.get("heartbeat", t.datetime_start.timestamp() if t.datetime_start else now)
        if _worker_alive(t.user_attrs) and now - beat < sweep.stale_after_s:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except Exception:  # finished meanwhile (its worker was alive after all): leave it
            continue
        attrs = {"retry_of": t.number}
        if t.user_attrs.get("baseline"):
            attrs["baseline"] = True
        study.enqueue_trial(t.params, user_attrs=attrs)
        reclaimed.append(t.number)
        logger.warning("trial %d: its worker is gone; marked failed, params queued again", t.number)
    return reclaimed


# ----------------------------------------------------------------------------------------------
# one trial
# ----------------------------------------------------------------------------------------------
def _suggest(trial, sweep: SweepConfig) -> dict[str, Any]:
    """Sample every searched key; returns the dotted training keys to set (dict choices expanded)."""
    out: dict[str, Any] = {}
    for key, spec in sweep.search_space.items():
        if spec.type == "categorical":
            choices = spec.choices or []
            labels = [choice_label(c) for c in choices]
            label = trial.suggest_categorical(key, labels)
            out.update(_expand(key, choices[labels.index(label)]))
        elif spec.type == "int":
            out[key] = trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1))
        else:
            out[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.type == "loguniform",
                                           step=spec.step)
    return out


def _params_to_keys(sweep: SweepConfig, params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        spec = sweep.search_space.get(key)
        if spec is not None and spec.type == "categorical":
            labels = [choice_label(c) for c in spec.choices or []]
            value = (spec.choices or [])[labels.index(value)] if value in labels else value
        out.update(_expand(key, value))
    return out


def trial_config(sweep: SweepConfig, keys: dict[str, Any], output_dir: str | Path) -> TrainConfig:
    """base + overrides + sampled keys, in `output_dir`; eval at a fixed number of examples."""
    cfg = _base_config(sweep, **_nested(keys))
    cfg.output_dir = str(output_dir)
    if sweep.eval_every_examples:
        per_step = cfg.training.batch_size * cfg.training.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))
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


@contextlib.contextmanager
def _train_callbacks(callbacks: list) -> Iterator[dict[str, Any]]:
    """Extra Trainer callbacks for `train`: its `callbacks=` argument when it has one, else a wrapper
    around `finetune.train._setup_trainer` for the duration (undone on exit)."""
    import finetune.train as train_mod

    if "callbacks" in inspect.signature(train_mod.train).parameters:
        yield {"callbacks": callbacks}
        return
    original = train_mod._setup_trainer

    def setup_with_callbacks(*args, **kwargs):
        trainer = original(*args, **kwargs)
        for cb in callbacks:
            trainer.add_callback(cb)
        return trainer

    train_mod._setup_trainer = setup_with_callbacks
    try:
        yield {}
    finally:
        train_mod._setup_trainer = original


class _Heartbeat:
    """Writes `heartbeat` into the trial every 30 s, so workers elsewhere can tell it is alive."""

    def __init__(self, trial):
        self.trial = trial
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(_HEARTBEAT_S):
            try:
                self.trial.set_user_attr("heartbeat", time.time())
            except Exception as exc:  # a storage hiccup must not kill the run
                logger.warning("heartbeat of trial %d failed: %s", self.trial.number, exc)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


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
    from finetune.evaluate import extrinsic_scores, intrinsic_scores, read_eval_records
    from finetune.inference import load_for_inference

    kind, _, name = objective.partition(".")
    records, _ = read_eval_records(cfg.eval.data)
    if cfg.eval.max_examples:
        records = records[: cfg.eval.max_examples]
    model, tok = load_for_inference(run_dir / ("model" if cfg.adapter == "full" else "adapter"))
    scores: dict[str, Any] = {"intrinsic": intrinsic_scores(
        model, tok, [r["messages"] for r in records], loss_on=cfg.data.loss_on,
        batch_size=cfg.eval.batch_size, max_length=cfg.max_length)}
    if kind == "extrinsic":
        scores["extrinsic"], _ = extrinsic_scores(model, tok, records, metrics=cfg.eval.metrics,
                                                  max_new_tokens=cfg.eval.max_new_tokens,
                                                  batch_size=cfg.eval.batch_size)
    atomic_write_text(run_dir / "sweep_scores.json", json.dumps(scores, indent=2, default=str))
    return float(scores[kind][name]), scores


def _run_trial(trial, sweep: SweepConfig) -> float:
    """One training run in OUTPUT/trials/trial-NNNN; returns the objective or raises."""
    import optuna

    from finetune.train import train

    keys = _suggest(trial, sweep)
    if sweep.enqueue_base and sweep.sampler == "grid" and trial.params == _base_params(sweep):
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
    with _train_callbacks([monitor._as_callback()]) as kw:
        train(cfg, **kw)
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


def _tell(study, trial, t0: float, **kw) -> None:
    trial.set_user_attr("duration_s", round(time.perf_counter() - t0, 1))
    study.tell(trial, **kw)


def run_worker(sweep: SweepConfig, storage_url: str | None = None) -> int:
    """Run trials until the study holds `n_trials` (or `timeout_s` passes); returns trials run here."""
    import optuna
    import psutil
    from optuna.trial import TrialState

    from finetune.errors import Preempted

    storage_url = storage_url or default_storage(sweep)
    study, storage, lock = open_study(sweep, storage_url)
    deadline = time.monotonic() + sweep.timeout_s if sweep.timeout_s else math.inf
    me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": psutil.Process().create_time()}
    budget = min(sweep.n_trials, _grid_size(sweep)) if sweep.sampler == "grid" else sweep.n_trials
    ran = 0
    while time.monotonic() < deadline:
        with lock.hold():
            _reclaim_dead_trials(study, storage, sweep)
            existing = study.get_trials(deepcopy=False)
            used = sum(_counts_toward_budget(t) for t in existing)
            if used >= budget:
                break
            study.sampler = _make_sampler(sweep, n_existing=len(existing))
            trial = study.ask()
            for k, v in {**me, "heartbeat": time.time()}.items():
                trial.set_user_attr(k, v)
        t0 = time.perf_counter()
        ran += 1
        logger.info("trial %d started (%d/%d in the study)", trial.number, used + 1, budget)
        try:
            with _Heartbeat(trial):
                value = _run_trial(trial, sweep)
        except optuna.TrialPruned as exc:
            logger.info("trial %d %s", trial.number, exc)
            _tell(study, trial, t0, state=TrialState.PRUNED)
        except (KeyboardInterrupt, Preempted):
            # No `error` attr: it does not count, and a re-run samples a new trial in its place.
            _tell(study, trial, t0, state=TrialState.FAIL)
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
            trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
            logger.error("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
            _tell(study, trial, t0, state=TrialState.FAIL)
        else:
            logger.info("trial %d: %s = %.5g", trial.number, sweep.objective, value)
            _tell(study, trial, t0, values=value)
        finally:
            # Trials run back to back in this process: the next one starts with the device empty
            # (train() already freed its own model; this covers the objective's scoring model and
            # a trial that failed half way).
            from kitcore.runtime import release_accelerator_memory

            release_accelerator_memory()
    return ran


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------
def _trial_rows(study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        status = t.state.name.lower()
        if t.state.name == "FAIL" and "error" not in a:
            status = "fail (worker died)" if "retry_of" not in a else "fail"
        rows.append({
            "number": t.number,
            "state": status,
            # Optuna gives a pruned trial its last reported value; only complete trials have an objective.
            "objective": t.value if t.state.name == "COMPLETE" else "",
            "best_eval_loss": a.get("best_eval_loss", ""),
            "duration_s": a.get("duration_s", ""),
            "pruned_at_step": a.get("pruned_at_step", ""),
            "pruned_at": a.get("pruned_at", ""),
            "baseline": bool(a.get("baseline")),
            "error": a.get("error", ""),
            **{f"params.{k}": v for k, v in t.params.items()},
        })
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_reports(study, sweep: SweepConfig, out: str | Path | None = None) -> dict[str, Path]:
    """trials.csv/.md, best_config.yaml (checked with load_config) and PNG plots in `out`."""
    out = Path(out or sweep.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = _trial_rows(study)
    cols = ["number", "state", "objective", "best_eval_loss", "duration_s", "pruned_at_step", "pruned_at",
            "baseline", *[f"params.{k}" for k in sweep.search_space], "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    paths = {"csv": atomic_write_text(out / "trials.csv", buf.getvalue())}

    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    baseline = next((t for t in complete if t.user_attrs.get("baseline")), None)
    md = [f"# Sweep {sweep.study_name}", "",
          f"objective: {sweep.objective} ({sweep.resolved_direction}), sampler {sweep.sampler}, pruner "
          f"{sweep.pruner}; {len(rows)} trials: "
          + ", ".join(f"{n} {s}" for s, n in sorted(_count_states(rows).items())), ""]
    if best is not None:
        md.append(f"best: trial {best.number}, {sweep.objective} = {best.value:.5g}"
                  + (f"; baseline (base config's values, trial {baseline.number}) = {baseline.value:.5g}"
                     if baseline is not None else ""))
        md.append("")
    shown = [c for c in cols if c != "error"]
    md.append("| " + " | ".join(c.removeprefix("params.") for c in shown) + " |")
    md.append("|" + "---|" * len(shown))
    for r in rows:
        md.append("| " + " | ".join(_fmt(r.get(c, "")) for c in shown) + " |")
    errors = [r for r in rows if r["error"]]
    if errors:
        md += ["", "## Failed trials", ""] + [f"- trial {r['number']}: {r['error']}" for r in errors]
    paths["md"] = atomic_write_text(out / "trials.md", "\n".join(md) + "\n")

    if best is not None:
        paths["best_config"] = _write_best_config(sweep, best, out)
    paths.update(_write_plots(study, out, n_complete=len(complete)))
    return paths


def _count_states(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return counts


def _write_best_config(sweep: SweepConfig, best, out: Path) -> Path:
    fresh = out / "best_run"
    n = 2
    while fresh.exists():
        fresh, n = out / f"best_run-{n}", n + 1
    cfg = trial_config(sweep, _params_to_keys(sweep, best.params), fresh.resolve())
    header = (f"# Best trial {best.number} of sweep {sweep.study_name}: {sweep.objective} = {best.value:.5g}\n"
              f"#   finetune train {out / 'best_config.yaml'}\n"
              f"# params: {json.dumps(best.params, default=str)}\n")
    path = atomic_write_text(out / "best_config.yaml", header + dump_config(cfg))
    load_config(path)  # a best config that does not load is a bug here, not the user's problem
    return path


def _write_plots(study, out: Path, n_complete: int) -> dict[str, Path]:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plots = {"optimization_history": ovm.plot_optimization_history,
             "intermediate_values": ovm.plot_intermediate_values}
    if n_complete >= 2:
        plots["param_importances"] = ovm.plot_param_importances
    else:
        logger.info("param_importances.png needs 2 completed trials (%d so far); skipped", n_complete)
    paths = {}
    for name, fn in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.tight_layout()
            fig.savefig(out / f"{name}.png", dpi=110)
            plt.close(fig)
            paths[name] = out / f"{name}.png"
        except Exception as exc:  # a plot must never cost the results
            logger.warning("could not draw %s: %s: %s", name, type(exc).__name__, exc)
    return paths


# ----------------------------------------------------------------------------------------------
# command
# ----------------------------------------------------------------------------------------------
def run_sweep(sweep: SweepConfig, storage_url: str | None = None, workers: int = 1,
              sweep_path: str | Path | None = None, report: bool = True) -> dict[str, Any]:
    """Run the sweep here (`workers` processes sharing the study), then write the reports."""
    storage_url = storage_url or default_storage(sweep)
    Path(sweep.output_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if workers > 1:
        if sweep_path is None:
            raise ValueError("workers > 1 needs the sweep file's path (each worker loads it)")
        open_study(sweep, storage_url)  # created (and the baseline queued) once, before workers race
        _spawn_workers(Path(sweep_path), storage_url, workers)
    else:
        run_worker(sweep, storage_url)
    study, _, _ = open_study(sweep, storage_url)
    summary: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 1), "storage": storage_url}
    if report:
        summary["reports"] = {k: str(v) for k, v in write_reports(study, sweep).items()}
    rows = _trial_rows(study)
    summary["states"] = _count_states(rows)
    complete = [r for r in rows if r["state"] == "complete"]
    if complete:
        best = study.best_trial
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params)
        base = next((r for r in complete if r["baseline"]), None)
        if base is not None:
            summary.update(baseline_trial=base["number"], baseline_value=base["objective"])
    return summary


def _worker_gpus(workers: int) -> list[str | None]:
    """One GPU per local worker, round-robin over the GPUs this process may use; else every
    worker would train on cuda:0."""
    from kitcore.runtime import worker_gpus

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [g.strip() for g in visible.split(",") if g.strip()]
    else:
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return worker_gpus(workers, ids)


def _spawn_workers(sweep_path: Path, storage_url: str, workers: int) -> None:
    """N local worker processes; each gets an equal share of the cores (torch would take them all)."""
    env = dict(os.environ)
    threads = max(1, (os.cpu_count() or 1) // workers)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    cmd = [sys.executable, "-m", "finetune.sweep", str(sweep_path), "--storage", storage_url, "--no-report"]
    procs = []
    for gpu in _worker_gpus(workers):
        procs.append(subprocess.Popen(cmd, env=env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": gpu}))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    bad = [c for c in codes if c != 0]
    if bad:
        logger.error("%d of %d workers exited with an error (codes %s)", len(bad), workers, bad)


def add_sweep_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("sweep_config", metavar="SWEEP.yaml", help="sweep config (see configs/sweep/)")
    parser.add_argument("--storage", help="Optuna storage shared by all workers: postgresql://user@host/db, "
                        "journal:///shared/path/study.log, sqlite:///path.db (default: sqlite:///OUTPUT/study.db)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes on this machine sharing the study (default 1)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the reports from the study, run no trial")
    parser.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # spawned workers
    return parser


def sweep_command(args: argparse.Namespace) -> int:
    sweep = load_sweep_config(args.sweep_config)
    if args.workers < 1:
        raise ConfigError("--workers", [("--workers", "must be at least 1")])
    storage = args.storage or default_storage(sweep)
    if args.report_only:
        study, _, _ = open_study(sweep, storage)
        for name, path in write_reports(study, sweep).items():
            print(f"{name:22s} {path}")
        return 0
    summary = run_sweep(sweep, storage, workers=args.workers, sweep_path=args.sweep_config,
                        report=not args.no_report)
    if args.no_report:
        return 0
    print(f"\nSweep {sweep.study_name}: {summary['states']} in {summary['seconds']:.0f} s (storage {storage})")
    if "best_trial" in summary:
        print(f"  best: trial {summary['best_trial']}, {sweep.objective} = {summary['best_value']:.5g}, "
              f"params {summary['best_params']}")
        if "baseline_trial" in summary:
            print(f"  baseline (base config's values): trial {summary['baseline_trial']}, "
                  f"{sweep.objective} = {summary['baseline_value']:.5g}")
    for name, path in summary.get("reports", {}).items():
        print(f"  {name:22s} {path}")
    return 0 if "best_trial" in summary else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m finetune.sweep` (what `--workers N` spawns; the same as `finetune sweep`)."""
    parser = add_sweep_arguments(argparse.ArgumentParser(prog="finetune sweep", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        return sweep_command(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
