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

__all__ = ["MetricsLogger", "Preemption", "CheckpointMarker", "COMPLETE_MARKER", "PREEMPTED_EXIT_CODE"]

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
        if "loss" in logs and self._t0 is not None:
            dt = now - self._t0
            dtok = state.num_input_tokens_seen - self._tokens0
            if dt > 0 and dtok > 0:
                rec["tokens_per_s"] = round(dtok / dt, 1)
            self._t0, self._tokens0 = now, state.num_input_tokens_seen
        with self.path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")


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
