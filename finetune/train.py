"""`finetune train`: config -> data -> model (+adapter) -> trainer -> train -> export -> eval.

Thin over `transformers.Trainer`: it owns the loop, gradient accumulation (token-weighted via
`num_items_in_batch`), checkpoint/resume and the accelerate/DeepSpeed mechanics. This module adds
what it gets wrong or leaves out: loss masks from the chat template, gloo on CPU clusters,
kill-safe checkpoints, a run directory that refuses to be overwritten, and an exported adapter that
carries its tokenizer and chat template.

Run directory:
    adapter/            PEFT adapter (or model/ for full fine-tuning) + tokenizer + chat template
    checkpoints/        checkpoint-N/ (a COMPLETE marker is written once every rank has saved)
    config.yaml         the resolved config
    run.json            versions, git commit, world size, seed, data hashes, data stats
    metrics.jsonl       loss, eval_loss, learning_rate, tokens/s per logging step
    tensorboard/
    rank_probe/         only with FINETUNE_RANK_PROBE=1 (tests): per-rank pid, data hashes, weights
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from finetune.config import ConfigError, TrainConfig, dump_config
from finetune.data import DataStats, LengthGroupedShuffledSampler, pad_collate
from finetune.errors import CheckpointWriteError, Preempted, RunDirError
from finetune.modeling import load_base_model, load_tokenizer, model_ref, resolve_dtype
from finetune.utils import atomic_write_text, is_main_process, rank0_print

logger = logging.getLogger(__name__)

__all__ = ["train", "RunDirError", "latest_complete_checkpoint"]

COMPLETE_MARKER = "COMPLETE"
# EX_TEMPFAIL: "try again later" — what a pre-empted run exits with, so a scheduler can requeue it.
PREEMPTED_EXIT_CODE = 75


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, callbacks: list | tuple = ()) -> Path:
    """Train as configured; returns the run directory. `callbacks`: extra `TrainerCallback`s
    (e.g. a sweep's pruning callback). The caller's `cfg` is not modified, and environment
    variables that the libraries set during the run (accelerate's ACCELERATE_USE_DEEPSPEED, ...)
    are restored afterwards, so a second run in the same process (a sweep trial) starts clean."""
    cfg = cfg.model_copy(deep=True)
    with _scoped_environ():
        return _train(cfg, callbacks)


def _train(cfg: TrainConfig, callbacks) -> Path:
    from kitcore import runtime

    run_dir = Path(cfg.output_dir)
    _resolve_deepspeed_config(cfg)
    rt = _setup_distributed(cfg)
    _check_quantized_storage(cfg, rt)
    resume_from = _setup_run_dir(cfg, run_dir, rt)
    _check_plan(cfg, rt)
    tokenizer = load_tokenizer(cfg.model, chat_template=cfg.chat_template,
                               trust_remote_code=cfg.trust_remote_code)
    train_ds, eval_ds, data_stats = _setup_data(cfg, tokenizer, rt)
    stopped_at = _fit(cfg, rt, run_dir, tokenizer, train_ds, eval_ds, data_stats, resume_from, callbacks)
    # The trainer, model and optimizer were freed when _fit returned (accelerator memory too).
    runtime.release_accelerator_memory()
    _cleanup_distributed()
    if stopped_at is not None:
        raise Preempted(stopped_at)
    if cfg.eval.after_train and cfg.eval.data and rt.is_main:
        from finetune.evaluate import evaluate_run

        evaluate_run(run_dir, cfg, subprocess=rt.distributed or bool(cfg.deepspeed))
    return run_dir


def _fit(cfg, rt, run_dir, tokenizer, train_ds, eval_ds, data_stats, resume_from, callbacks) -> int | None:
    """Build the model and the Trainer, train, export. Returns the step a pre-emption stopped at
    (None when training finished). Everything heavy lives in this frame and is freed on return."""
    args = _training_args(cfg, run_dir, eval_ds is not None, rt)
    # Seed before the adapter weights are created: the Trainer seeds only when it is built, so
    # without this a run's LoRA init depended on what ran earlier in the same process.
    from transformers import set_seed

    set_seed(cfg.seed)
    model = _setup_model(cfg, tokenizer, rt)
    trainer = _setup_trainer(cfg, args, run_dir, model, tokenizer, train_ds, eval_ds, callbacks)
    _print_summary(cfg, trainer, model, data_stats)
    _write_run_info(cfg, run_dir, trainer, data_stats, rt)

    preempt = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Preemption))
    preempt.install()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        preempt.uninstall()
    if preempt.stopped:
        trainer.accelerator.wait_for_everyone()
        rank0_print(f"Pre-empted ({preempt.signal_name}): checkpoint saved at step "
                    f"{trainer.state.global_step}; re-run the same command with resume=true to continue.")
        return trainer.state.global_step
    _export(cfg, run_dir, trainer, tokenizer)
    trainer.accelerator.wait_for_everyone()
    return None


# ----------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------
class _scoped_environ:
    """Undo, on exit, every change made to os.environ inside the block (added, changed, removed)."""

    def __enter__(self):
        self._before = dict(os.environ)
        return self

    def __exit__(self, *exc):
        for key in set(os.environ) - set(self._before):
            del os.environ[key]
        for key, value in self._before.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        return False


def _setup_distributed(cfg: TrainConfig):
    """Create the process group the Trainer will use (kitcore.runtime decides the backend: NCCL on
    GPUs, gloo without). Returns the Runtime."""
    from kitcore import runtime

    _, _, world, _ = runtime.launch_env()
    if world > 1:
        return runtime.start(deepspeed=_uses_deepspeed(cfg), timeout_s=cfg.training.ddp_timeout_s)
    return runtime.current()


def _uses_deepspeed(cfg: TrainConfig) -> bool:
    """A DeepSpeed JSON in the config, or `accelerate launch` with a DeepSpeed yaml (which may hold
    its DeepSpeed settings inline instead of in a file)."""
    return bool(cfg.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def _cleanup_distributed() -> None:
    """Tear the process group down once every rank has saved: the post-training eval runs on rank 0
    alone (in a clean subprocess after a distributed or DeepSpeed run), and with the group still up
    it sharded its data and waited for ranks that had exited (gloo: "Connection closed by peer")."""
    from kitcore import runtime

    runtime.end()


def _resolve_deepspeed_config(cfg: TrainConfig) -> None:
    """One DeepSpeed JSON per run, whichever way it is named.

    `accelerate launch --config_file <deepspeed yaml>` exports the yaml's `deepspeed_config_file` as
    ACCELERATE_DEEPSPEED_CONFIG_FILE. Rule: the training config's `deepspeed` key wins when the
    launcher names no file; when it is unset, the launcher's file is used (and written to the run's
    config.yaml); when both are set they must be the same file or hold the same JSON, else it is an
    error, since DeepSpeed would otherwise run with a config the user did not read.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return
    launcher = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if launcher in ("", "none"):
        return
    if not Path(launcher).is_file():
        raise ConfigError("accelerate launch", [(
            "deepspeed_config_file",
            f"file not found: {launcher} (relative paths are read from {os.getcwd()}; launch from the "
            "repository root or make the path absolute)",
        )])
    if not cfg.deepspeed:
        cfg.deepspeed = launcher
        return
    same = Path(cfg.deepspeed).resolve() == Path(launcher).resolve() or (
        json.loads(Path(cfg.deepspeed).read_text()) == json.loads(Path(launcher).read_text()))
    if not same:
        raise ConfigError("training config vs accelerate launch", [(
            "deepspeed",
            f"{cfg.deepspeed} differs from the accelerate config's deepspeed_config_file {launcher}; "
            "unset `deepspeed` (the launcher's file is used) or point both at the same JSON",
        )])


def _check_plan(cfg: TrainConfig, rt) -> None:
    """Print the memory plan (rank 0) and refuse a run predicted not to fit unless force=true.

    On GPUs the budget is the device's memory; on CPU it is the memory available now (psutil)
    shared by this node's processes, and the plan predicts RSS in CPU mode (fp32), the quantity
    scripts/validate_plan.py checks against measurements (docs/plan.md). Runs before the model is
    loaded: a run that cannot fit fails in a second, not after minutes of loading."""
    import torch

    from finetune.config import ConfigError
    from finetune.plan import plan_for_training, render_plan

    if rt.device.startswith("cuda"):
        device = "gpu"
        mem = torch.cuda.get_device_properties(torch.device(rt.device)).total_memory
    else:
        import psutil

        device = "cpu"
        mem = int(psutil.virtual_memory().available / max(1, rt.local_world_size))
    try:
        plan = plan_for_training(cfg, world_size=rt.world_size, gpus_per_node=rt.local_world_size,
                                 device=device, device_memory=mem)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        logger.warning("no memory plan for %s: %s", cfg.model, exc)
        return
    rank0_print(render_plan(plan))
    if not plan.fits and not cfg.force:
        raise ConfigError("memory plan", [("force", "predicted not to fit (see the table above); apply one of "
                                          "the listed changes, or pass --force / force=true to try anyway")])


def latest_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint whose save finished on every rank (a kill mid-save leaves none)."""
    if not ckpt_dir.is_dir():
        return None
    done = [p for p in ckpt_dir.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _setup_run_dir(cfg: TrainConfig, run_dir: Path, rt) -> Path | None:
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
        _check_resume_setup(run_dir, _parallel_setup(cfg, rt))
        rank0_print(f"Resuming from {ckpt}")
        return ckpt
    if has_run and not cfg.overwrite:
        raise RunDirError(
            f"{run_dir} already holds a run. Pass resume=true to continue it, overwrite=true to "
            "replace it, or choose another output_dir."
        )
    if has_run and cfg.overwrite and rt.is_main:
        for n in ("checkpoints", "adapter", "model", "metrics.jsonl", "run.json", "tensorboard"):
            p = run_dir / n
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return None


def _zero_stage(cfg: TrainConfig) -> int:
    """The ZeRO stage of this run: 0 without DeepSpeed."""
    if cfg.deepspeed:
        stage = json.loads(Path(cfg.deepspeed).read_text()).get("zero_optimization", {}).get("stage", 0)
        return int(stage) if str(stage).isdigit() else 0
    if _uses_deepspeed(cfg):  # accelerate launch with inline DeepSpeed settings
        return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)
    return 0


def _parallel_setup(cfg: TrainConfig, rt) -> dict[str, int]:
    """What a checkpoint's optimizer state and data position depend on (recorded in run.json)."""
    bf16, fp16 = _autocast(cfg, rt)
    return {"world_size": rt.world_size, "zero_stage": _zero_stage(cfg),
            "batch_size": cfg.training.batch_size, "grad_accum": cfg.training.grad_accum,
            "precision": "bf16" if bf16 else "fp16" if fp16 else "fp32"}


def _describe_setup(s: dict[str, int]) -> str:
    zero = f"ZeRO-{s['zero_stage']}" if s.get("zero_stage") else "no ZeRO"
    zero += f", {s['precision']}" if s.get("precision") else ""
    return (f"world size {s['world_size']}, {zero}, batch {s['batch_size']} per device x {s['grad_accum']} "
            f"accum x {s['world_size']} ranks = {s['batch_size'] * s['grad_accum'] * s['world_size']} per step")


def _check_resume_setup(run_dir: Path, now: dict[str, int]) -> None:
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
    both = f"the checkpoints in {run_dir} were written with {_describe_setup(was)}; this launch has {_describe_setup(now)}"
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


def _setup_data(cfg: TrainConfig, tokenizer, rt=None):
    """The tokenized splits, memory-mapped from the data cache (finetune.data_cache): built once by
    one process per node (or job), then read by every rank; nothing is held as Python objects."""
    from finetune.data_cache import prepared_split

    train_ds, train_stats, _ = prepared_split(cfg, tokenizer, cfg.data.train, rt)
    stats = {"train": train_stats}
    eval_ds = None
    if cfg.data.eval:
        eval_ds, stats["eval"], _ = prepared_split(cfg, tokenizer, cfg.data.eval, rt)
        eval_ds = eval_ds.select_columns(["input_ids", "labels"])
    return train_ds.select_columns(["input_ids", "labels", "length"]), eval_ds, stats


def _quantization(cfg: TrainConfig) -> tuple[str | None, dict[str, Any] | None]:
    """("4bit" | "8bit" | None, bitsandbytes settings) for this run."""
    import torch

    if cfg.adapter != "qlora":
        return None, None
    q = cfg.quantization
    if q.bits == 8:
        return "8bit", {}
    compute = resolve_dtype(cfg.dtype if q.compute_dtype == "auto" else q.compute_dtype)
    storage = compute if q.storage_dtype == "auto" else getattr(torch, q.storage_dtype)
    return "4bit", dict(quant_type=q.quant_type, double_quant=q.double_quant, compute_dtype=compute,
                        storage_dtype=storage)


def _autocast(cfg: TrainConfig, rt) -> tuple[bool, bool]:
    """(bf16, fp16) for the Trainer, and so for DeepSpeed's "auto" precision fields. The compute
    dtype (resolve_dtype: bf16 on GPUs that have it, else fp32) decides, whatever dtype the weights
    were loaded in (_weights_dtype)."""
    import torch

    compute = resolve_dtype(cfg.dtype) if cfg.training.precision == "auto" else None
    bf16 = cfg.training.precision == "bf16" or (compute is torch.bfloat16 and rt.on_accelerator)
    fp16 = cfg.training.precision == "fp16" or (compute is torch.float16 and rt.on_accelerator)
    return bf16, fp16


def _deepspeed_dtype(cfg: TrainConfig, rt):
    """The dtype DeepSpeed casts the model's floating-point parameters to (None without DeepSpeed)."""
    import torch

    if not cfg.deepspeed:
        return None
    ds = json.loads(Path(cfg.deepspeed).read_text())
    bf16, fp16 = _autocast(cfg, rt)

    def enabled(section: str, auto: bool) -> bool:
        v = (ds.get(section) or {}).get("enabled", False)
        return auto if v == "auto" else bool(v)

    if enabled("bf16", bf16) or enabled("bfloat16", bf16):
        return torch.bfloat16
    if enabled("fp16", fp16):
        return torch.float16
    return torch.float32


def _check_quantized_storage(cfg: TrainConfig, rt) -> None:
    """QLoRA under DeepSpeed: the packed 4-bit weights must be stored in DeepSpeed's dtype.

    With fp16 or bf16 on, DeepSpeed casts every floating-point parameter of the model to that
    dtype by value (`p.data = p.data.to(dtype)`; ZeRO-3 too, since a quantized model is not built
    under zero.Init). 4-bit
    weights packed into bf16 "storage" elements and then cast to fp16 are different bytes: the
    model trains on garbage without any error. So the storage dtype must equal DeepSpeed's dtype
    (`quantization.storage_dtype: auto` follows the compute dtype, which matches whenever
    `training.precision` and `dtype` are left at auto). uint8 storage is left alone by the cast
    but cannot be flattened with the other parameters into ZeRO-3's partitions.
    """
    import torch

    quantize, qkw = _quantization(cfg)
    ds_dtype = _deepspeed_dtype(cfg, rt)
    if quantize != "4bit" or ds_dtype is None:
        return
    storage = qkw["storage_dtype"]
    stage = _zero_stage(cfg)
    if ds_dtype == torch.float32 and storage != torch.uint8:
        return  # no fp16/bf16: DeepSpeed casts nothing, and ZeRO-3 partitions each dtype as it is
    name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    if storage == torch.uint8:
        if stage == 3:
            raise ConfigError("training config", [("quantization.storage_dtype", (
                f"uint8 storage cannot be partitioned by ZeRO-3; set it to auto (or {name(ds_dtype)}, the dtype "
                "DeepSpeed trains in)"))])
        return
    if storage != ds_dtype:
        raise ConfigError("training config", [("quantization.storage_dtype", (
            f"the 4-bit weights would be stored as {name(storage)} but DeepSpeed ({cfg.deepspeed}) casts every "
            f"floating-point parameter to {name(ds_dtype)}, which corrupts the packed weights silently; set "
            f"quantization.storage_dtype={name(ds_dtype)} (or make training.precision / the DeepSpeed JSON's "
            f"bf16/fp16 match {name(storage)})"))])


def _setup_model(cfg: TrainConfig, tokenizer, rt):
    quantize, qkw = _quantization(cfg)
    model = load_base_model(
        cfg.model, dtype=_weights_dtype(cfg, rt), quantize=quantize, quant_kwargs=qkw,
        trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation,
    )
    modules_to_save = list(cfg.lora.modules_to_save)
    emb = model.get_input_embeddings().weight
    # Under ZeRO-3 the weight is a 0-element shard and its real shape is ds_shape: comparing with
    # .shape resized every ZeRO-3 model to the tokenizer's length and trained embeddings in full.
    if len(tokenizer) > getattr(emb, "ds_shape", emb.shape)[0]:
        # The ChatML fallback added tokens the base has never seen: they need trained embeddings.
        model.resize_token_embeddings(len(tokenizer))
        for name in ("embed_tokens", "lm_head"):
            if cfg.adapter != "full" and name not in modules_to_save:
                modules_to_save.append(name)
        logger.warning("added chat tokens to the vocabulary; training embed_tokens and lm_head in full")
    model.config.use_cache = False
    # Non-reentrant checkpointing: the reentrant kind (torch's fallback when no kwargs are passed,
    # which prepare_model_for_kbit_training does) runs each layer's backward outside autograd's
    # view, so DDP marks LoRA weights ready twice and the first backward fails.
    ckpt_kwargs = {"use_reentrant": False}
    if cfg.adapter == "full":
        if cfg.training.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        return model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantize:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.training.gradient_checkpointing,
            gradient_checkpointing_kwargs=ckpt_kwargs,
        )
    elif cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        model.enable_input_require_grads()
    lcfg = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lcfg)


def _weights_dtype(cfg: TrainConfig, rt) -> str:
    """The dtype the base weights are loaded in.

    Full fine-tuning on a GPU without DeepSpeed at `dtype: auto` loads fp32 weights and trains
    with bf16 autocast: the optimizer then updates fp32 master weights. Loaded in bf16, AdamW would
    update bf16 weights in place and lose every update below bf16's resolution (~0.4% of the
    weight). DeepSpeed keeps fp32 master weights itself, and LoRA trains fp32 adapter weights
    (PEFT upcasts them) over a frozen base, so those load the base in the compute dtype.
    An explicit `dtype: bfloat16` keeps pure bf16 training, with a warning."""
    if cfg.adapter == "full" and not _uses_deepspeed(cfg) and rt.on_accelerator:
        if cfg.dtype == "auto":
            return "float32"
        if cfg.dtype in ("bfloat16", "float16"):
            logger.warning("dtype=%s with full fine-tuning and no DeepSpeed trains without fp32 master weights "
                           "(updates below %s resolution are lost); dtype=auto trains fp32 weights with "
                           "autocast", cfg.dtype, cfg.dtype)
    return cfg.dtype


def _training_args(cfg: TrainConfig, run_dir: Path, has_eval: bool, rt):
    """TrainingArguments from the config. Built BEFORE the model: with a ZeRO-3 DeepSpeed config this
    registers it globally, so `from_pretrained` partitions weights as they load (zero.Init) instead
    of materialising the whole model on every rank."""
    from transformers import TrainingArguments

    t = cfg.training
    strategy = "steps" if (t.eval_steps or t.save_steps) else "epoch"
    eval_every = t.eval_steps or t.save_steps
    save_every = t.save_steps or t.eval_steps
    if has_eval and strategy == "steps":
        # The best checkpoint must be a saved one, so saves happen at eval steps.
        save_every = eval_every
    bf16, fp16 = _autocast(cfg, rt)
    dist_kwargs: dict[str, Any] = {"ddp_timeout": t.ddp_timeout_s}
    if rt.distributed:
        # Our process group (kitcore.runtime.start) is the one the Trainer must use.
        dist_kwargs["accelerator_config"] = {"use_configured_state": True}
        if rt.backend == "gloo":
            dist_kwargs["ddp_backend"] = "gloo"
        if cfg.adapter != "full":
            # Every LoRA weight takes part in every forward. Left to the Trainer, a PeftModel gets
            # find_unused_parameters=True, which with activation checkpointing fails the first
            # backward ("Expected to mark a variable ready only once").
            dist_kwargs["ddp_find_unused_parameters"] = False
    elif not rt.on_accelerator:
        dist_kwargs["use_cpu"] = True
    report_to = [r for r in t.report_to if r != "none"] or "none"
    if report_to != "none" and "tensorboard" in report_to:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tensorboard"))
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy=strategy if has_eval else "no",
        eval_steps=eval_every if has_eval and strategy == "steps" else None,
        save_strategy=strategy,
        save_steps=save_every if strategy == "steps" else None,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=has_eval,
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False if has_eval else None,
        bf16=bf16,
        fp16=fp16,
        activation_checkpointing=False,  # enabled on the model in _setup_model (PEFT needs it there)
        train_sampling_strategy="random",  # group_by_length: KitTrainer._get_train_sampler
        remove_unused_columns=False,
        dataloader_num_workers=t.num_workers,
        include_num_input_tokens_seen="non_padding",
        report_to=report_to,
        seed=cfg.seed,
        data_seed=cfg.seed,
        deepspeed=cfg.deepspeed,
        disable_tqdm=not is_main_process(),
        save_only_model=False,
        **dist_kwargs,
    )
    if args.n_gpu > 1:
        # One process that sees several GPUs: the Trainer would wrap the model in nn.DataParallel
        # and multiply the batch by the GPU count (`finetune train` pins itself to GPU 0; this is
        # a library call in a process whose CUDA was already initialised).
        raise ConfigError("training setup", [("CUDA_VISIBLE_DEVICES", (
            f"this single process sees {args.n_gpu} GPUs; set CUDA_VISIBLE_DEVICES to one GPU before "
            "starting Python, or use `accelerate launch` to train data parallel"))])
    return args


def _setup_trainer(cfg, args, run_dir, model, tokenizer, train_ds, eval_ds, extra_callbacks=()):
    from transformers import EarlyStoppingCallback

    t = cfg.training
    has_eval = eval_ds is not None
    callbacks = [MetricsLogger(run_dir / "metrics.jsonl", resume=cfg.resume), CheckpointMarker(),
                 Preemption(grace_s=t.preemption_grace_s)]
    collate = make_collator(cfg, tokenizer)
    if os.environ.get("FINETUNE_RANK_PROBE") == "1":
        probe = RankProbe(run_dir / "rank_probe", collate)
        callbacks.append(probe)
        collate = probe.collate
    if has_eval and t.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    callbacks.extend(extra_callbacks)
    trainer = KitTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collate,
        processing_class=tokenizer,
        callbacks=callbacks,
        group_by_length=t.group_by_length,
        group_window=t.group_window,
    )
    return trainer


class KitTrainer(Trainer):
    """`Trainer` with two changes.

    - Training batches come from `LengthGroupedShuffledSampler` when `training.group_by_length`
      (the default): similar lengths within a batch, random order of batches.
    - A failed checkpoint write (full disk, quota, file-size limit) removes the partial checkpoint
      and raises one error naming the path; the previous COMPLETE checkpoint is untouched
      (rotation runs only after a successful save).
    """

    def __init__(self, *args, group_by_length: bool = False, group_window: int = 64, **kwargs):
        self.group_by_length = group_by_length
        self.group_window = group_window
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if self.group_by_length and ds is not None and "length" in getattr(ds, "column_names", ()):
            # The length column straight from Arrow as one numpy array (no Python list per example).
            lengths = ds.data.column("length").to_numpy()
            return LengthGroupedShuffledSampler(lengths, self._train_batch_size,
                                                window=self.group_window, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def _save_checkpoint(self, model, trial):
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except OSError as exc:
            if self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            previous = latest_complete_checkpoint(Path(self.args.output_dir))
            raise CheckpointWriteError(
                f"could not write checkpoint {folder}: {exc.strerror or exc}. The partial checkpoint "
                f"was removed; the previous one ({previous or 'none yet'}) is intact. Free space "
                "(or raise the quota / file-size limit) and re-run with resume=true."
            ) from exc


def make_collator(cfg: TrainConfig, tokenizer):
    """Padding to the longest in the batch, or (`packing: true`) one padding-free row per batch.

    Packing concatenates the batch's examples into one row with position_ids restarting at 0 for
    each: transformers then builds a block-diagonal mask (sdpa/eager) or passes sequence boundaries
    to flash attention, so no example attends to another; the first label of every example is
    -100, so no token predicts across a boundary. Needs the model's cache off (see STACK.md), which
    _setup_model does.
    """
    if not cfg.packing:
        return pad_collate(tokenizer.pad_token_id)
    from transformers import DataCollatorWithFlattening

    flash = bool(cfg.attn_implementation and cfg.attn_implementation.startswith("flash"))
    return DataCollatorWithFlattening(return_flash_attn_kwargs=flash, return_position_ids=True)


# ----------------------------------------------------------------------------------------------
# callbacks
# ----------------------------------------------------------------------------------------------
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
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.signal_name else 0.0])
        if dist.is_available() and dist.is_initialized():
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
    """Write checkpoint-N/COMPLETE after every rank finished saving it; resume trusts only those."""

    def on_save(self, args, state, control, **kw):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                atomic_write_text(ckpt / COMPLETE_MARKER, json.dumps({"step": state.global_step}))


class RankProbe(TrainerCallback):
    """Debug hook for the distributed tests; on only with FINETUNE_RANK_PROBE=1.

    Each rank writes rank_probe/rank-N.json in the run dir: pid, rank and world size as the process
    group sees them, a short hash per example of its first batches (ranks must see different data)
    and, after training, the sum and local size of its trainable weights (DDP and ZeRO-1/2 ranks must
    agree; ZeRO-3 ranks hold shards) and the model's module classes (e.g. Linear4bit for QLoRA).
    FINETUNE_RANK_PROBE_EXIT=R:S makes rank R die (os._exit) after step S, to check that a dead
    rank fails the job instead of hanging it.
    """

    BATCHES = 4

    def __init__(self, out_dir: Path, collate):
        self.out_dir = out_dir
        self._collate = collate
        self.info: dict[str, Any] = {"pid": os.getpid(), "batches": []}
        exit_at = os.environ.get("FINETUNE_RANK_PROBE_EXIT", "")
        self.exit_at = tuple(int(x) for x in exit_at.split(":")) if exit_at else None

    def collate(self, rows: list[dict]) -> dict[str, Any]:
        if len(self.info["batches"]) < self.BATCHES:
            self.info["batches"].append(
                [hashlib.sha1(str(r["input_ids"]).encode()).hexdigest()[:12] for r in rows])
        return self._collate(rows)

    def _write(self, args) -> None:
        atomic_write_text(self.out_dir / f"rank-{args.process_index}.json", json.dumps(self.info))

    def on_train_begin(self, args, state, control, **kw):
        import torch.distributed as dist

        ready = dist.is_available() and dist.is_initialized()
        self.info.update(rank=dist.get_rank() if ready else 0, world_size=dist.get_world_size() if ready else 1)
        self._write(args)

    def on_step_end(self, args, state, control, **kw):
        self._write(args)
        if self.exit_at == (args.process_index, state.global_step):
            os._exit(1)

    def on_train_end(self, args, state, control, model=None, **kw):
        if model is not None:
            trainable = [p for p in model.parameters() if p.requires_grad]
            self.info.update(
                trainable_sum=sum(float(p.detach().double().sum()) for p in trainable),
                trainable_numel=sum(p.numel() for p in trainable),  # 0 for ZeRO-3 partitioned params
                module_types=sorted({type(m).__name__ for m in model.modules()}),
            )
        self._write(args)


# ----------------------------------------------------------------------------------------------
# reporting and export
# ----------------------------------------------------------------------------------------------
def _print_summary(cfg: TrainConfig, trainer, model, data_stats: dict[str, DataStats]) -> None:
    numel = lambda p: getattr(p, "ds_numel", None) or p.numel()  # noqa: E731  (ZeRO-3: shard is empty)
    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    args = trainer.args
    world = args.world_size
    eff_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    st = data_stats["train"]
    mean_tokens = st.tokens / max(st.kept, 1)
    zero = str(_zero_stage(cfg) or "off")
    rank0_print(
        "\n".join([
            f"model            {cfg.model} ({cfg.adapter})",
            f"parameters       {total / 1e6:.2f}M total, {trainable / 1e6:.3f}M trainable "
            f"({100 * trainable / max(total, 1):.2f}%)",
            f"world size       {world}   ZeRO stage {zero}   device {args.device}",
            f"effective batch  {eff_batch} = {args.per_device_train_batch_size} per device x "
            f"{args.gradient_accumulation_steps} accum x {world} ranks",
            f"tokens per step  ~{eff_batch * mean_tokens:.0f} (mean {mean_tokens:.0f} tokens/example)",
            f"train data       {st.kept} examples, {st.trained_tokens} trained tokens, "
            f"{st.truncated} truncated, dropped {dict(st.dropped) or 0}",
        ])
    )


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_run_info(cfg: TrainConfig, run_dir: Path, trainer, data_stats, rt) -> None:
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
        "git_commit": _git_commit(),
        "world_size": trainer.args.world_size,
        "parallel": {**_parallel_setup(cfg, rt), "world_size": trainer.args.world_size},
        "seed": cfg.seed,
        "model": model_ref(cfg.model),
        "data": {k: {"path": str(Path(p).resolve()), "sha256": _sha256(p)}
                 for k, p in (("train", cfg.data.train), ("eval", cfg.data.eval)) if p},
        "data_stats": {k: v.as_dict() for k, v in data_stats.items()},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2))


def _export(cfg: TrainConfig, run_dir: Path, trainer, tokenizer) -> None:
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
            tokenizer.save_pretrained(tmp)
            state = trainer.state
            atomic_write_text(tmp / "finetune.json", json.dumps({
                "adapter": cfg.adapter,
                "base_model": model_ref(cfg.model),
                "global_step": state.global_step,
                "best_checkpoint": state.best_model_checkpoint,
                "best_eval_loss": state.best_metric,
                "loss_on": cfg.data.loss_on,
                "quantization": cfg.quantization.model_dump() if cfg.adapter == "qlora" else None,
                "dtype": cfg.dtype,
                "max_length": cfg.max_length,
            }, indent=2))
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
