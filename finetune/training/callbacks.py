"""The Trainer callbacks of `finetune train`: the metrics log, pre-emption, and COMPLETE markers."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune.console import atomic_write_text

__all__ = ["MetricsLogger", "MemoryCheck", "Preemption", "CheckpointMarker", "COMPLETE_MARKER", "PREEMPTED_EXIT_CODE",
           "process_rss", "PLAN_TOLERANCE", "PLAN_TOLERANCE_BYTES"]

COMPLETE_MARKER = "COMPLETE"
# EX_TEMPFAIL: "try again later" — what a pre-empted run exits with, so a scheduler can requeue it.
PREEMPTED_EXIT_CODE = 75


class MetricsLogger(TrainerCallback):
    """Append one JSON line per log event (rank 0): step, loss, eval_loss, lr, tokens/s."""

    def __init__(self, path: Path, resume: bool = False):
        self.path = path
        self.resume = resume
        self._t0: float | None = None
        self._tokens0 = 0

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.resume and self.path.exists():
                # Drop lines past the checkpoint we resume from: those steps are replayed.
                keep = [ln for ln in self.path.read_text().splitlines()
                        if ln.strip() and json.loads(ln).get("step", 0) <= state.global_step]
                atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
            elif not self.resume:
                self.path.write_text("")
        self._t0 = time.perf_counter()
        self._tokens0 = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        now = time.perf_counter()
        rec: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        for k, v in logs.items():
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                rec[k] = v
        if "loss" in logs and self._t0 is not None and "tokens_per_s" not in logs:  # else the trainer measured it
            dt = now - self._t0
            dtok = state.num_input_tokens_seen - self._tokens0
            if dt > 0 and dtok > 0:
                rec["tokens_per_s"] = round(dtok / dt, 1)
            self._t0, self._tokens0 = now, state.num_input_tokens_seen
        self.write(rec)

    def write(self, rec: dict[str, Any]) -> None:
        """Append one record (the caller is rank 0)."""
        with self.path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")


# How far the measured peak may be from the plan before the run warns (the plan is validated to +-10%),
# and by at least how much: below it a miss changes no hardware decision (a tiny model's fixed costs).
PLAN_TOLERANCE = 0.15
PLAN_TOLERANCE_BYTES = 256 * 2**20


def process_rss(key: str = "VmRSS") -> int | None:
    """This process's resident memory (`VmRSS`) or its high-water mark (`VmHWM`), in bytes (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class MemoryCheck(TrainerCallback):
    """Every run checks the memory plan: after its first `at_step` optimizer steps it measures its peak
    and logs it beside the plan's figure (metrics.jsonl and run.json's "memory"), warning when they
    differ by more than PLAN_TOLERANCE (and PLAN_TOLERANCE_BYTES).

    Measured as the plan predicts it (finetune.plan): on a GPU, the caching allocator's peak
    (`torch.cuda.max_memory_reserved`, which holds `max_memory_allocated` and the allocator's reserve;
    the CUDA context is outside it); on CPU, the peak resident memory of the process since training
    began (VmHWM, reset when it starts) minus what the process held before the model loaded
    (`baseline`). The largest figure over the ranks is reported."""

    def __init__(self, plan: dict[str, Any], baseline: int | None, metrics: MetricsLogger | None,
                 run_info: Path | None, at_step: int = 3):
        self.plan = plan  # {"device": "gpu" | "cpu", "bytes": predicted peak, "worst_case_bytes", "batch"}
        self.baseline = baseline
        self.metrics = metrics
        self.run_info = run_info
        self.at_step = at_step
        self.result: dict[str, Any] | None = None
        self.done = False

    def on_train_begin(self, args, state, control, **kw):
        if self.plan["device"] == "gpu":
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            try:  # reset VmHWM to the current RSS (Linux >= 4.0): the load-time transient is not training's
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
        self._start = state.global_step

    def on_step_end(self, args, state, control, **kw):
        if self.done:  # the same step on every rank: each takes part in the measurement's collective once
            return
        last = state.max_steps if state.max_steps and state.max_steps > 0 else None
        if state.global_step - self._start < self.at_step and state.global_step != last:
            return
        self.done = True
        self.result = self.measure(state.global_step, state.is_world_process_zero)

    def measure(self, step: int, main: bool) -> dict[str, Any] | None:
        import logging

        import torch

        from kitcore.runtime import process_group

        extra: dict[str, Any] = {}
        if self.plan["device"] == "gpu":
            measured = torch.cuda.max_memory_reserved()
            extra["measured_allocated_bytes"] = torch.cuda.max_memory_allocated()
        else:
            hwm = process_rss("VmHWM")
            measured = (hwm - self.baseline) if (hwm is not None and self.baseline is not None) else None
        dist = process_group()
        if dist is not None:  # every rank takes part: the largest peak over the ranks
            t = torch.tensor([float(measured if measured is not None else -1)],
                             device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            measured = int(t.item()) if t.item() >= 0 else None
        if measured is None or not main:
            return None
        predicted = float(self.plan["bytes"])
        error = (predicted - measured) / max(measured, 1)
        rec = {"step": step, "memory_plan_bytes": int(predicted), "memory_measured_bytes": int(measured),
               "memory_plan_error": round(error, 4), **extra}
        if self.plan.get("worst_case_bytes"):
            rec["memory_plan_worst_case_bytes"] = int(self.plan["worst_case_bytes"])
        if self.metrics is not None:
            self.metrics.write(rec)
        if self.run_info is not None and self.run_info.is_file():
            info = json.loads(self.run_info.read_text())
            info["memory"] = {**rec, "device": self.plan["device"], "batch": self.plan.get("batch"),
                              "measured": ("torch.cuda.max_memory_reserved" if self.plan["device"] == "gpu"
                                           else "VmHWM since training began - RSS before the model loaded")}
            atomic_write_text(self.run_info, json.dumps(info, indent=2))
        gib = 1024**3
        if abs(error) > PLAN_TOLERANCE and abs(predicted - measured) > PLAN_TOLERANCE_BYTES:
            logging.getLogger(__name__).warning(
                "memory: the plan said %.2f GiB per device, the first %d steps peaked at %.2f GiB (%+.0f%%); "
                "`finetune plan --data` shows the breakdown", predicted / gib, step, measured / gib, 100 * error)
        return rec


class Preemption(TrainerCallback):
    """SIGTERM / SIGUSR1 (what Slurm and Kubernetes send before a kill) -> save and stop.

    The handler only sets a flag; at the next step end every rank learns whether ANY rank was
    signalled (one tiny all-reduce per step, so all ranks save the same step and no collective is
    left half-entered), then the Trainer saves a checkpoint and stops. A watchdog exits the process
    after `grace_s` seconds if a step or the save hangs, so the job never outlives its grace period.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, grace_s: float = 120.0):
        self.grace_s = grace_s
        self.signal_name: str | None = None
        self.stopped = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        import signal
        import threading

        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            timer = threading.Timer(self.grace_s, os._exit, args=(PREEMPTED_EXIT_CODE,))
            timer.daemon = True
            timer.start()

    def _any_rank_signalled(self) -> bool:
        import torch

        from kitcore.runtime import process_group

        flag = torch.tensor([1.0 if self.signal_name else 0.0])
        dist = process_group()
        if dist is not None:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kw):
        if self._any_rank_signalled():
            self.signal_name = self.signal_name or "signal on another rank"
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False
        return control


class CheckpointMarker(TrainerCallback):
    """Write checkpoint-N/checksums.json, then checkpoint-N/COMPLETE, after every rank finished
    saving it; resume trusts only complete checkpoints, and verifies their checksums first.

    The ranks on the first node share the hashing (each takes every k-th file, DeepSpeed's
    per-rank shards included) and rank 0 writes the manifest, so a large checkpoint is hashed
    once, in parallel, while the files are still in the page cache."""

    def on_save(self, args, state, control, **kw):
        from kitcore.integrity import digest_files, list_files, write_manifest
        from kitcore.runtime import current, process_group

        dist = process_group()
        up = dist is not None
        if up:
            dist.barrier()
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        rt = current()
        part: dict = {}
        if rt.rank < rt.local_world_size and ckpt.is_dir():  # ranks of the node rank 0 is on
            names = list_files(ckpt, exclude=(COMPLETE_MARKER,))
            part = digest_files(ckpt, names[rt.local_rank::rt.local_world_size])
        parts = [part]
        if up:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, part)
        if state.is_world_process_zero and ckpt.is_dir():
            files = {k: v for p in parts for k, v in (p or {}).items()}
            write_manifest(ckpt, files=files)
            atomic_write_text(ckpt / COMPLETE_MARKER, json.dumps({"step": state.global_step}))
