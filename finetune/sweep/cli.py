"""`finetune sweep SWEEP.yaml [key=value ...]` and `python -m finetune.sweep` (what `--workers N`
spawns): run the workers here, one per local process, then write the reports."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from finetune.config import ConfigError
from finetune.sweep.config import SweepConfig, load_sweep_config
from finetune.sweep.report import count_states, trial_rows, write_reports
from finetune.sweep.study import default_storage, open_study
from finetune.sweep.worker import run_worker

logger = logging.getLogger(__name__)


def run_sweep(sweep: SweepConfig, storage_url: str | None = None, workers: int = 1,
              sweep_path: str | Path | None = None, report: bool = True,
              overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the sweep here (`workers` processes sharing the study), then write the reports.

    With workers > 1 each worker loads `sweep_path` with the same `overrides` as `sweep`."""
    storage_url = storage_url or default_storage(sweep)
    Path(sweep.output_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if workers > 1:
        if sweep_path is None:
            raise ValueError("workers > 1 needs the sweep file's path (each worker loads it)")
        open_study(sweep, storage_url)  # created (and the baseline queued) once, before workers race
        _spawn_workers(Path(sweep_path), storage_url, workers, overrides or [])
    else:
        run_worker(sweep, storage_url)
    study, _, _ = open_study(sweep, storage_url)
    summary: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 1), "storage": storage_url}
    if report:
        summary["reports"] = {k: str(v) for k, v in write_reports(study, sweep).items()}
    rows = trial_rows(study)
    summary["states"] = count_states(rows)
    complete = [r for r in rows if r["state"] == "complete"]
    if complete:
        best = study.best_trial
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params)
        base = next((r for r in complete if r["baseline"]), None)
        if base is not None:
            summary.update(baseline_trial=base["number"], baseline_value=base["objective"])
    return summary


def assign_worker_gpus(workers: int) -> list[str | None]:
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


def _spawn_workers(sweep_path: Path, storage_url: str, workers: int, overrides: list[str]) -> None:
    """N local worker processes; each gets an equal share of the cores (torch would take them all)."""
    env = dict(os.environ)
    threads = max(1, (os.cpu_count() or 1) // workers)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    cmd = [sys.executable, "-m", "finetune.sweep", str(sweep_path), *overrides, "--storage", storage_url,
           "--no-report"]
    procs = []
    for gpu in assign_worker_gpus(workers):
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
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of the sweep file's keys, e.g. n_trials=20 sampler_options.seed=1")
    parser.add_argument("--storage", help="Optuna storage shared by all workers: postgresql://user@host/db, "
                        "journal:///shared/path/study.log, sqlite:///path.db (default: sqlite:///OUTPUT/study.db)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes on this machine sharing the study (default 1)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the reports from the study, run no trial")
    parser.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # spawned workers
    return parser


def sweep_command(args: argparse.Namespace) -> int:
    sweep = load_sweep_config(args.sweep_config, args.overrides)
    if args.workers < 1:
        raise ConfigError("--workers", [("--workers", "must be at least 1")])
    storage = args.storage or default_storage(sweep)
    if args.report_only:
        study, _, _ = open_study(sweep, storage)
        for name, path in write_reports(study, sweep).items():
            print(f"{name:22s} {path}")
        return 0
    summary = run_sweep(sweep, storage, workers=args.workers, sweep_path=args.sweep_config,
                        report=not args.no_report, overrides=args.overrides)
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
    description = "`finetune sweep`: hyperparameter search on Optuna; one trial = one full `finetune train` run."
    parser = add_sweep_arguments(argparse.ArgumentParser(prog="finetune sweep", description=description))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        return sweep_command(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
