"""The run directory: refusing to overwrite, resuming (checked against the setup that wrote the
checkpoints), run.json, and the exported adapter or model.

    adapter/            PEFT adapter (or model/ for full fine-tuning) + tokenizer + chat template
    checkpoints/        checkpoint-N/ (a COMPLETE marker is written once every rank has saved)
    config.yaml         the resolved config
    run.json            versions, git commit, parallel setup, seed, data hashes, data stats
    metrics.jsonl       loss, eval_loss, learning_rate, tokens/s per logging step
    tensorboard/
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from finetune.config import TrainConfig, dump_config
from finetune.console import atomic_write_text, is_main_process, rank0_print
from finetune.errors import CheckpointWriteError, RunDirError
from finetune.models.loading import model_ref
from finetune.training.callbacks import COMPLETE_MARKER
from kitcore.integrity import write_manifest

__all__ = ["latest_complete_checkpoint", "complete_checkpoints", "intact_checkpoint", "setup_run_dir", "parallel_setup", "check_resume_setup", "write_run_info",
           "export_weights"]


def latest_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint whose save finished on every rank (a kill mid-save leaves none)."""
    done = complete_checkpoints(ckpt_dir)
    return done[0] if done else None


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Every checkpoint whose save finished on every rank, newest first."""
    if not ckpt_dir.is_dir():
        return []
    done = [p for p in ckpt_dir.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def _checkpoint_verdict(ckpt_dir: Path, newest: Path, fall_back: bool) -> tuple[str, str]:
    """("ok", checkpoint) or ("error", message), decided by one process."""
    from kitcore.integrity import IntegrityError, require_intact

    try:
        require_intact(newest, "checkpoint", exclude=(COMPLETE_MARKER,))
        return "ok", str(newest)
    except IntegrityError as exc:
        damage = str(exc)
    intact = None
    for older in complete_checkpoints(ckpt_dir):
        if int(older.name.split("-")[-1]) >= int(newest.name.split("-")[-1]):
            continue
        try:
            require_intact(older, "checkpoint", exclude=(COMPLETE_MARKER,))
            intact = older
            break
        except IntegrityError:
            continue
    if intact is not None and fall_back:
        rank0_print(f"WARNING: {damage}\nresume=latest_intact: resuming from {intact} instead")
        return "ok", str(intact)
    if intact is None:
        return "error", f"{damage}. No older checkpoint in {ckpt_dir} is intact either; start again without resume=true"
    return "error", (f"{damage}. The newest intact checkpoint is {intact}: pass resume=latest_intact to continue "
                     "from it (the steps after it are trained again)")


def intact_checkpoint(ckpt_dir: Path, newest: Path, *, fall_back: bool = False) -> Path:
    """The checkpoint to resume from, its checksums verified: `newest`, or with `fall_back` the
    newest intact one; a RunDirError naming the damaged file and the newest intact checkpoint
    otherwise. Rank 0 verifies and every rank gets its verdict, so no rank hangs or reads alone."""
    from kitcore.runtime import process_group

    dist = process_group()
    verdict = [None]
    if dist is None or dist.get_rank() == 0:
        verdict = [_checkpoint_verdict(ckpt_dir, newest, fall_back)]
    if dist is not None:
        dist.broadcast_object_list(verdict, src=0)
    status, value = verdict[0]
    if status != "ok":
        raise RunDirError(value)
    return Path(value)


def setup_run_dir(cfg: TrainConfig, run_dir: Path, launch) -> Path | None:
    ckpt_dir = run_dir / "checkpoints"
    has_run = run_dir.is_dir() and any(
        (run_dir / n).exists() for n in ("run.json", "checkpoints", "adapter", "model")
    )
    if cfg.resume:
        ckpt = latest_complete_checkpoint(ckpt_dir)
        if ckpt is None:
            raise RunDirError(
                f"resume=true but {ckpt_dir} holds no complete checkpoint; start without resume=true"
            )
        check_resume_setup(run_dir, parallel_setup(cfg, launch))
        ckpt = intact_checkpoint(ckpt_dir, ckpt, fall_back=cfg.resume == "latest_intact")
        rank0_print(f"Resuming from {ckpt}")
        return ckpt
    if has_run and not cfg.overwrite:
        raise RunDirError(
            f"{run_dir} already holds a run. Pass resume=true to continue it, overwrite=true to "
            "replace it, or choose another output_dir."
        )
    if has_run and cfg.overwrite and launch.rt.is_main:
        for n in ("checkpoints", "adapter", "model", "metrics.jsonl", "run.json", "tensorboard"):
            p = run_dir / n
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return None


def parallel_setup(cfg: TrainConfig, launch) -> dict[str, int]:
    """What a checkpoint's optimizer state and data position depend on (recorded in run.json);
    `launch`: finetune.training.launch.Launch."""
    return {"world_size": launch.rt.world_size, "zero_stage": launch.zero_stage,
            "batch_size": cfg.training.batch_size, "grad_accum": cfg.training.grad_accum,
            "precision": launch.precision}


def describe_setup(s: dict[str, int]) -> str:
    zero = f"ZeRO-{s['zero_stage']}" if s.get("zero_stage") else "no ZeRO"
    zero += f", {s['precision']}" if s.get("precision") else ""
    return (f"world size {s['world_size']}, {zero}, batch {s['batch_size']} per device x {s['grad_accum']} "
            f"accum x {s['world_size']} ranks = {s['batch_size'] * s['grad_accum'] * s['world_size']} per step")


def check_resume_setup(run_dir: Path, now: dict[str, int]) -> None:
    """Refuse, before anything loads, a resume that cannot continue the run it resumes.

    - A different ZeRO stage, or a different world size under ZeRO: the optimizer state is
      partitioned per data-parallel rank, and DeepSpeed would fail deep in its loader or load the
      wrong shards. (DeepSpeed's universal checkpoints, converted offline with its
      `ds_to_universal` tool, are the way to change either; the kit does not do that conversion.)
    - Without ZeRO a different world size is sound when every step still sees the same examples:
      same per-device batch and the same world size x grad_accum (e.g. 2 ranks x 1 -> 1 rank x 2).
      The Trainer skips consumed data in micro-batches of the same sampler, so the run continues
      with the batches it would have seen. Anything else changes the effective batch and the data
      position silently, so it is an error that says which grad_accum would make it sound.
    """
    info_file = run_dir / "run.json"
    if not info_file.is_file():
        return
    info = json.loads(info_file.read_text())
    was = {**now, "world_size": info.get("world_size", now["world_size"]), **(info.get("parallel") or {})}
    if was == now:
        return
    both = f"the checkpoints in {run_dir} were written with {describe_setup(was)}; this launch has {describe_setup(now)}"
    if was["zero_stage"] != now["zero_stage"] and {was["zero_stage"], now["zero_stage"]} != {1, 2}:
        # ZeRO-1 and ZeRO-2 write the same files and partition the optimizer alike; ZeRO-3 writes
        # per-rank model states, and no ZeRO is a different format altogether.
        raise RunDirError(f"cannot resume: {both}. Resume with the same DeepSpeed ZeRO stage "
                          "(or convert the checkpoint with DeepSpeed's ds_to_universal tool and load it yourself).")
    if now["zero_stage"] and was.get("precision") != now.get("precision"):
        # DeepSpeed names its optimizer files by precision (bf16_zero_pp_rank_...): it would not
        # find them, and fp16 and bf16 optimizer states are not interchangeable.
        raise RunDirError(f"cannot resume: {both}, trained in {was.get('precision')}; this launch would train in "
                          f"{now.get('precision')}. Set training.precision={was.get('precision')}.")
    if was["world_size"] != now["world_size"] and now["zero_stage"]:
        raise RunDirError(f"cannot resume: {both}. ZeRO-{now['zero_stage']} partitions the optimizer state per "
                          f"rank: launch {was['world_size']} processes again (or convert the checkpoint with "
                          "DeepSpeed's ds_to_universal tool).")
    same_step = was["batch_size"] == now["batch_size"] and (
        was["world_size"] * was["grad_accum"] == now["world_size"] * now["grad_accum"])
    if not same_step:
        fix = ""
        ranks = was["world_size"] * was["grad_accum"]
        if was["batch_size"] == now["batch_size"] and ranks % now["world_size"] == 0:
            fix = f" Set training.grad_accum={ranks // now['world_size']} to continue with the same steps."
        raise RunDirError(f"cannot resume: {both}; the steps would see other examples and the learning-rate "
                          f"schedule another batch size.{fix}")
    rank0_print(f"Resuming across setups: {both}. Each step sees the same examples, so the run continues.")


def _data_record(spec: str) -> dict[str, Any]:
    """Path and SHA-256 of a dataset; shards hash as their concatenation, i.e. as the single file
    the local engine would have written, and are counted."""
    from finetune.data.files import data_files, sha256_files

    ds = data_files(spec)
    if ds.single:
        return {"path": str(Path(spec).resolve()), "sha256": sha256_file(spec)}
    return {"path": str(Path(spec).resolve()), "sha256": sha256_files(ds.files), "files": len(ds.files)}


def sha256_file(path: str | Path) -> str:
    from kitcore.integrity import file_digest

    return file_digest(path, "sha256")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_info(cfg: TrainConfig, run_dir: Path, trainer, data_stats, launch, extra: dict | None = None) -> None:
    if not is_main_process():
        return
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "deepspeed", "bitsandbytes",
                "datasets", "finetune-kit"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    info = {
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions,
        "python": sys.version.split()[0],
        "git_commit": git_commit(),
        "world_size": trainer.args.world_size,
        "parallel": {**parallel_setup(cfg, launch), "world_size": trainer.args.world_size},
        "seed": cfg.seed,
        "kernels": {"requested": cfg.training.kernels,
                    "liger": trainer.args.liger_kernel_config if trainer.args.use_liger_kernel else None},
        "model": model_ref(cfg.model),
        "data": {k: _data_record(p) for k, p in (("train", cfg.data.train), ("eval", cfg.data.eval)) if p},
        "data_stats": {k: v.as_dict() for k, v in data_stats.items()},
        **(extra or {}),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2))


def export_weights(cfg: TrainConfig, run_dir: Path, trainer, tokenizer) -> None:
    """Save the (best, when eval data exists) weights with the tokenizer and chat template."""
    name = "model" if cfg.adapter == "full" else "adapter"
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    if is_main_process() and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    try:
        # save_model gathers ZeRO-3 shards on every rank, so all ranks call it.
        trainer.save_model(str(tmp))
        if is_main_process():
            # E.g. DPO on an adapter trains against a frozen copy of the starting adapter ("ref", which PEFT
            # saves as a subdirectory); the export is the trained adapter alone.
            for sub in cfg.method_spec.export_drops:
                shutil.rmtree(tmp / sub, ignore_errors=True)
            tokenizer.save_pretrained(tmp)
            state = trainer.state
            atomic_write_text(tmp / "finetune.json", json.dumps({
                "adapter": cfg.adapter,
                "method": cfg.method,
                "base_model": model_ref(cfg.model),
                "global_step": state.global_step,
                "best_checkpoint": state.best_model_checkpoint,
                "best_eval_loss": state.best_metric,
                "loss_on": cfg.data.loss_on,
                "quantization": cfg.quantization.model_dump() if cfg.adapter == "qlora" else None,
                "dtype": cfg.dtype,
                "max_length": cfg.max_length,
                # What the method records for evaluation (distill: its teacher).
                **cfg.method_spec.hook("run_info", lambda cfg: {})(cfg),
            }, indent=2))
            # Last, before the rename: every file's checksum, verified by whatever reads it back.
            write_manifest(tmp)
    except OSError as exc:
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(
            f"could not write the {name} to {tmp}: {exc.strerror or exc}. "
            f"{'The previous ' + name + ' in ' + str(final) + ' is intact. ' if final.exists() else ''}"
            f"The checkpoints in {run_dir / 'checkpoints'} are intact; free space and re-run with resume=true."
        ) from exc
    if is_main_process():
        # Swap by renames so that some complete copy is on disk at every moment.
        old = run_dir / f".{name}.old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        rank0_print(f"saved {name} -> {final}")
