"""Optuna factories: the sampler, pruner and storage a sweep YAML names, and the study itself.

Storages: `sqlite:///...` and `postgresql://...` are Optuna RDB storages with Optuna's trial
heartbeat (a trial whose worker stops beating for `stale_after_s` is failed and its params are
queued again, by `requeue_trial`); `journal:///path` is Optuna's journal file, which records no
heartbeats, so the worker keeps one in a user attribute for it (finetune.sweep.worker).
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.config import ConfigError
from finetune.sweep.config import SweepConfig, base_params
from finetune.sweep.locking import StudyLock, with_pg_driver
from finetune.sweep.search import make_pruner, make_sampler

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

# Seconds between two heartbeats of a running trial (fewer when stale_after_s is short, so that a
# live trial always beats a few times within it).
HEARTBEAT_S = 30


def default_storage(sweep: SweepConfig) -> str:
    return f"sqlite:///{(Path(sweep.output_dir) / 'study.db').resolve()}"


def make_storage(url: str, stale_after_s: float | None = None):
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
        url = with_pg_driver(url)
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


def open_study(sweep: SweepConfig, storage_url: str, lock: StudyLock | None = None):
    """Create or load the study (same name + storage = same study); queue the baseline once."""
    import optuna

    lock = lock or StudyLock(storage_url, sweep.study_name or "sweep")
    storage = make_storage(storage_url, sweep.stale_after_s)
    with lock.hold():
        study = optuna.create_study(storage=storage, study_name=sweep.study_name, load_if_exists=True,
                                    direction=sweep.resolved_direction, sampler=make_sampler(sweep),
                                    pruner=make_pruner(sweep))
        if study.direction.name.lower() != sweep.resolved_direction:
            raise ConfigError(str(storage_url), [("direction", f"study {sweep.study_name!r} already exists "
                                                  f"with direction {study.direction.name.lower()}; use another "
                                                  "study_name or storage")])
        # The grid sampler does not count an enqueued trial as its grid point (it would run the
        # point twice); on a grid the baseline is the grid point itself, flagged in the trial.
        if sweep.enqueue_base and sweep.sampler != "grid" and not study.get_trials(deepcopy=False):
            study.enqueue_trial(base_params(sweep), user_attrs={"baseline": True})
    return study, storage, lock
