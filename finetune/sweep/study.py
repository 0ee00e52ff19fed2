"""Optuna factories: the sampler, pruner and storage a sweep YAML names, and the study itself.

Storages: `sqlite:///...` and `postgresql://...` are Optuna RDB storages with Optuna's trial
heartbeat (a trial whose worker stops beating for `stale_after_s` is failed and its params are
queued again, by `requeue_trial`); `journal:///path` is Optuna's journal file, which records no
heartbeats, so the worker keeps one in a user attribute for it (finetune.sweep.worker).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.config import ConfigError
from finetune.sweep.config import SweepConfig, _base_params, choice_label
from finetune.sweep.locking import StudyLock

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

# Seconds between two heartbeats of a running trial (fewer when stale_after_s is short, so that a
# live trial always beats a few times within it).
HEARTBEAT_S = 30


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


def _grid_size(sweep: SweepConfig) -> int:
    return math.prod(len(v) for v in _grid(sweep).values())


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
        # Optuna's own: trials run inside `study.optimize` (finetune.sweep.worker), where the
        # `study.stop()` it calls after the last grid point is allowed.
        return optuna.samplers.GridSampler(_grid(sweep), **kw)
    if sweep.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401  (Optuna's CMA-ES sampler needs it; imported lazily there)
        except ImportError:
            raise ValueError("sampler: cmaes needs the cmaes package: pip install cmaes") from None
    return classes[sweep.sampler](**kw)


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


def _make_storage(url: str, stale_after_s: float | None = None):
    """`journal:///path/file.log` -> JournalStorage (file backend); anything else -> RDBStorage,
    with Optuna's trial heartbeat when `stale_after_s` is given (workers; a reader needs none)."""
    import optuna

    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.removeprefix("journal://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    kw: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # Several local workers write to one file: wait for SQLite's lock instead of failing at once.
        kw["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    else:
        url = _with_pg_driver(url)
    if stale_after_s is not None:
        kw.update(heartbeat_interval=max(1, min(HEARTBEAT_S, int(stale_after_s // 3))),
                  grace_period=max(1, math.ceil(stale_after_s)))
        kw[_stale_callback_arg()] = requeue_trial
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
        return optuna.storages.RDBStorage(url, **kw)


def _stale_callback_arg() -> str:
    """Optuna 4.9 renamed RDBStorage's `failed_trial_callback` (deprecated since)."""
    import inspect

    from optuna.storages import RDBStorage

    params = inspect.signature(RDBStorage.__init__).parameters
    return "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"


def has_optuna_heartbeat(storage) -> bool:
    """RDB storages beat through Optuna; Optuna's journal storage has no heartbeat (optuna 5.0)."""
    import optuna

    return isinstance(storage, optuna.storages.RDBStorage) and storage.heartbeat_interval is not None


def requeue_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose worker is gone (now FAIL) -> a new waiting trial with its params, by Optuna's
    retry callback; it keeps only `retry_of` and `baseline`, the rest belonged to the dead run."""
    import optuna

    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback  # the name before optuna 4.9
    retried = copy.deepcopy(trial)  # the callback extends its retry history in place
    retried.user_attrs = {"retry_of": trial.number, **({"baseline": True} if trial.user_attrs.get("baseline") else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry_cls()(study, retried)
    logger.warning("trial %d: its worker is gone; marked failed, params queued again", trial.number)


def _with_pg_driver(url: str) -> str:
    """`postgresql://` names no driver; SQLAlchemy 2.1 then wants psycopg 3. Use whichever is installed."""
    if not url.startswith("postgresql://"):
        return url
    for module, scheme in (("psycopg", "postgresql+psycopg://"), ("psycopg2", "postgresql+psycopg2://")):
        if importlib.util.find_spec(module) is not None:
            return scheme + url.removeprefix("postgresql://")
    raise ConfigError("--storage", [("--storage", "PostgreSQL needs a driver: pip install psycopg2-binary "
                                     "(or psycopg[binary])")])


def open_study(sweep: SweepConfig, storage_url: str, lock: StudyLock | None = None):
    """Create or load the study (same name + storage = same study); queue the baseline once."""
    import optuna

    lock = lock or StudyLock(storage_url, sweep.study_name or "sweep")
    storage = _make_storage(storage_url, sweep.stale_after_s)
    with lock.hold():
        study = optuna.create_study(storage=storage, study_name=sweep.study_name, load_if_exists=True,
                                    direction=sweep.resolved_direction, sampler=_make_sampler(sweep),
                                    pruner=_make_pruner(sweep))
        if study.direction.name.lower() != sweep.resolved_direction:
            raise ConfigError(str(storage_url), [("direction", f"study {sweep.study_name!r} already exists "
                                                  f"with direction {study.direction.name.lower()}; use another "
                                                  "study_name or storage")])
        # The grid sampler does not count an enqueued trial as its grid point (it would run the
        # point twice); on a grid the baseline is the grid point itself, flagged in the trial.
        if sweep.enqueue_base and sweep.sampler != "grid" and not study.get_trials(deepcopy=False):
            study.enqueue_trial(_base_params(sweep), user_attrs={"baseline": True})
    return study, storage, lock
