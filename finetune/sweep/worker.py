"""A worker: runs trials until the study holds `n_trials`, sharing the budget with every other
worker of the study, and gives the trials of dead workers back to the queue.

Each trial runs inside Optuna's `study.optimize` (one trial per call), which records Optuna's
heartbeat on RDB storages, fails stale trials, and lets the grid sampler stop; the loop around it
checks the budget under the study lock (finetune.sweep.locking) before the trial is asked for.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import socket
import threading
import time
import traceback
import warnings
from typing import Any

from finetune.sweep.config import SweepConfig
from finetune.sweep.search import grid_size, make_sampler
from finetune.sweep.study import (
    HEARTBEAT_S,
    default_storage,
    has_optuna_heartbeat,
    open_study,
    requeue_trial,
)
from finetune.sweep.trial import run_trial

logger = logging.getLogger(__name__)


def counts_toward_budget(t) -> bool:
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
    import optuna
    from optuna.trial import TrialState

    optuna_beats = has_optuna_heartbeat(storage)
    if optuna_beats:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # requeues them through the storage's callback
    reclaimed = []
    now = time.time()
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # Optuna's heartbeat tells a dead worker only after `stale_after_s`; a dead pid on this
        # host is known at once (a re-run right after kill -9 takes its trial back).
        dead = not _worker_alive(t.user_attrs)
        if not dead and not optuna_beats:
            beat = t.user_attrs.get("heartbeat", t.datetime_start.timestamp() if t.datetime_start else now)
            dead = now - beat >= sweep.stale_after_s
        if not dead:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:  # as optuna.storages.fail_stale_trials fails a stale trial
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished meanwhile: its worker was alive after all
        requeue_trial(study, t)
        reclaimed.append(t.number)
    return reclaimed


class _AttrHeartbeat:
    """The journal storage's heartbeat: `heartbeat` written into the trial every HEARTBEAT_S, so
    workers elsewhere can tell it is alive (Optuna beats only on RDB storages)."""

    def __init__(self, trial):
        self.trial = trial
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
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


def _objective(trial, sweep: SweepConfig, me: dict[str, Any], attr_heartbeat: bool, held, started: str,
               stopped: list[BaseException]) -> float:
    """What `study.optimize` runs: one trial, the study lock released as soon as it is in the study."""
    import optuna

    from finetune.errors import Preempted

    for k, v in {**me, **({"heartbeat": time.time()} if attr_heartbeat else {})}.items():
        trial.set_user_attr(k, v)
    held.release()  # the trial is in the study: other workers count it from now on
    logger.info("trial %d started (%s in the study)", trial.number, started)
    t0 = time.perf_counter()
    try:
        with _AttrHeartbeat(trial) if attr_heartbeat else contextlib.nullcontext():
            return run_trial(trial, sweep)
    except optuna.TrialPruned:
        raise
    except Preempted as exc:
        # No `error` attr: it does not count, and a re-run samples a new trial in its place.
        stopped.append(exc)
        raise
    except Exception as exc:
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:2000])
        trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
        raise
    finally:
        trial.set_user_attr("duration_s", round(time.perf_counter() - t0, 1))


def run_worker(sweep: SweepConfig, storage_url: str | None = None) -> int:
    """Run trials until the study holds `n_trials` (or `timeout_s` passes); returns trials run here."""
    import psutil

    from kitcore.runtime import release_accelerator_memory

    storage_url = storage_url or default_storage(sweep)
    study, storage, lock = open_study(sweep, storage_url)
    deadline = time.monotonic() + sweep.timeout_s if sweep.timeout_s else math.inf
    me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": psutil.Process().create_time()}
    attr_heartbeat = not has_optuna_heartbeat(storage)
    budget = min(sweep.n_trials, grid_size(sweep)) if sweep.sampler == "grid" else sweep.n_trials
    ran = 0
    while time.monotonic() < deadline:
        stopped: list[BaseException] = []
        with lock.hold() as held:
            _reclaim_dead_trials(study, storage, sweep)
            existing = study.get_trials(deepcopy=False)
            # Counted here, under the lock, before a trial is asked for (not Optuna's MaxTrialsCallback,
            # which counts after a trial ends): running trials count, a dead worker's do not.
            used = sum(counts_toward_budget(t) for t in existing)
            if used >= budget:
                break
            study.sampler = make_sampler(sweep, n_existing=len(existing))
            ran += 1
            objective = functools.partial(_objective, sweep=sweep, me=me, attr_heartbeat=attr_heartbeat,
                                          held=held, started=f"{used + 1}/{budget}", stopped=stopped)
            try:
                # Optuna records the trial as complete, pruned or failed (and logs it); an error fails
                # this trial only, a KeyboardInterrupt goes through, a pre-emption is re-raised below.
                study.optimize(objective, n_trials=1, catch=(Exception,))
            finally:
                # Trials run back to back in this process: the next one starts with the device empty
                # (train() already freed its own model; this covers the objective's scoring model and
                # a trial that failed half way).
                release_accelerator_memory()
        if stopped:
            raise stopped[0]
    return ran
