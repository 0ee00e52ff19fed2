"""`finetune sweep`: hyperparameter search on Optuna; one trial = one full `finetune train` run.

    finetune sweep SWEEP.yaml [key=value ...] [--storage URL] [--workers N]

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

Search and pruning are Optuna's (samplers, pruners, storages, heartbeats, retries of stale trials,
plots); this package only maps a sweep YAML onto them and runs each trial through
`finetune.training.recipe.train`. One file per part:

    config.py   the sweep YAML: schema, `key=value` overrides, checks against the base config
    study.py    Optuna factories: sampler, pruner, storage (with its heartbeat), the study
    locking.py  the cross-worker lock that keeps N workers within `n_trials`
    trial.py    one trial: sampled params -> training config -> train() with the pruning callback
    worker.py   the worker loop: budget, trials of dead workers queued again
    report.py   trials.csv/.md, best_config.yaml, plots
    cli.py      `finetune sweep` / `python -m finetune.sweep`, local worker processes
"""

from finetune.sweep.cli import add_sweep_arguments, assign_worker_gpus, main, run_sweep, sweep_command
from finetune.sweep.config import ParamSpec, SweepConfig, load_sweep_config
from finetune.sweep.locking import StudyLock
from finetune.sweep.report import write_reports
from finetune.sweep.search import choice_label, grid_size, make_pruner, make_sampler
from finetune.sweep.study import default_storage, make_storage, open_study
from finetune.sweep.trial import TrialFailed, TrialMonitor, suggest, trial_config
from finetune.sweep.worker import counts_toward_budget, run_worker

__all__ = [
    "ParamSpec",
    "assign_worker_gpus",
    "counts_toward_budget",
    "grid_size",
    "make_pruner",
    "make_sampler",
    "make_storage",
    "suggest",
    "StudyLock",
    "SweepConfig",
    "TrialFailed",
    "TrialMonitor",
    "add_sweep_arguments",
    "choice_label",
    "default_storage",
    "load_sweep_config",
    "main",
    "open_study",
    "run_sweep",
    "run_worker",
    "sweep_command",
    "trial_config",
    "write_reports",
]
