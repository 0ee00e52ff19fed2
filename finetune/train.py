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
from datetime import timedelta
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from finetune.config import ConfigError, TrainConfig, dump_config
from finetune.data import DataStats, LengthGroupedShuffledSampler, pad_collate, tokenize_dataset
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
    (e.g. a sweep's pruning callback)."""
    run_dir = Path(cfg.output_dir)
    dist_kwargs = _setup_distributed(cfg)
    resume_from = _setup_run_dir(cfg, run_dir)
    _check_plan(cfg)
    tokenizer = load_tokenizer(cfg.model, chat_template=cfg.chat_template,
                               trust_remote_code=cfg.trust_remote_code)
    train_ds, eval_ds, data_stats = _setup_data(cfg, tokenizer)
    args = _training_args(cfg, run_dir, eval_ds is not None, dist_kwargs)
    # Seed before the adapter weights are created: the Trainer seeds only when it is built, so
    # without this a run's LoRA init depended on what ran earlier in the same process.
    from transformers import set_seed

    set_seed(cfg.seed)
    model = _setup_model(cfg, tokenizer)
    trainer = _setup_trainer(cfg, args, run_dir, model, tokenizer, train_ds, eval_ds, callbacks)
    _print_summary(cfg, trainer, model, data_stats)
    _write_run_info(cfg, run_dir, trainer, data_stats)

    preempt = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Preemption))
    preempt.install()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        preempt.uninstall()
    if preempt.stopped:
        trainer.accelerator.wait_for_everyone()
        _cleanup_distributed()
        rank0_print(f"Pre-empted ({preempt.signal_name}): checkpoint saved at step "
                    f"{trainer.state.global_step}; re-run the same command with resume=true to continue.")
        raise Preempted(trainer.state.global_step)

    _export(cfg, run_dir, trainer, tokenizer)
    trainer.accelerator.wait_for_everyone()
    _cleanup_distributed()
    if cfg.eval.after_train and cfg.eval.data and is_main_process():
        from finetune.evaluate import evaluate_run

        evaluate_run(run_dir, cfg)
    return run_dir


# ----------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------
def _setup_distributed(cfg: TrainConfig) -> dict[str, Any]:
    """Pick the DeepSpeed JSON and the process-group backend before the Trainer does.

    With no CUDA, accelerate picks no backend and every rank silently trains alone (see
    shared/STACK.md), so we create the state ourselves with gloo:
      - DeepSpeed: `PartialState(backend="gloo")` runs `deepspeed.init_distributed(gloo)`;
      - plain DDP: `PartialState(cpu=True, backend="gloo")` gives MULTI_CPU. Without `cpu=True` the
        process group exists but the state says `DistributedType.NO`: data is sharded, yet the model
        is never wrapped in DDP, so each rank trains its own copy and rank 0's is saved.
    Returns extra TrainingArguments.
    """
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    kwargs: dict[str, Any] = {"ddp_timeout": cfg.training.ddp_timeout_s}
    _resolve_deepspeed_config(cfg)
    use_deepspeed = bool(cfg.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if use_deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    if world > 1 and not torch.cuda.is_available():
        from accelerate import PartialState

        state = PartialState(cpu=not use_deepspeed, backend="gloo",
                             timeout=timedelta(seconds=cfg.training.ddp_timeout_s))
        if state.num_processes != world:
            raise RuntimeError(f"WORLD_SIZE={world} but the process group has {state.num_processes} "
                               f"process(es) ({state.distributed_type}); refusing to train alone")
        kwargs.update(ddp_backend="gloo", accelerator_config={"use_configured_state": True})
    elif world == 1 and not torch.cuda.is_available():
        kwargs["use_cpu"] = True
    return kwargs


def _cleanup_distributed() -> None:
    """Tear the process group down once every rank has saved: the post-training eval runs on rank 0
    alone, and with the group still up it sharded its data and waited for ranks that had exited
    (gloo: "Connection closed by peer"). Left to interpreter exit, a ZeRO-3 rank also once aborted
    ("terminate called without an active exception") after a finished run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


def _check_plan(cfg: TrainConfig) -> None:
    """Print the memory plan (rank 0) and refuse a run predicted not to fit unless force=true.

    On GPUs the budget is the device's memory; on CPU it is the memory available now (psutil)
    shared by this node's processes, and the plan predicts RSS in CPU mode (fp32), the quantity
    scripts/validate_plan.py checks against measurements (docs/plan.md). Runs before the model is
    loaded: a run that cannot fit fails in a second, not after minutes of loading."""
    import torch

    from finetune.config import ConfigError
    from finetune.plan import plan_for_training, render_plan

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = "gpu"
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() or 1))
        mem = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    else:
        import psutil

        device = "cpu"
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        mem = int(psutil.virtual_memory().available / max(1, per_node))
    try:
        plan = plan_for_training(cfg, world_size=world, gpus_per_node=per_node, device=device,
                                 device_memory=mem)
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


def _setup_run_dir(cfg: TrainConfig, run_dir: Path) -> Path | None:
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
        rank0_print(f"Resuming from {ckpt}")
        return ckpt
    if has_run and not cfg.overwrite:
        raise RunDirError(
            f"{run_dir} already holds a run. Pass resume=true to continue it, overwrite=true to "
            "replace it, or choose another output_dir."
        )
    if has_run and cfg.overwrite and is_main_process():
        for n in ("checkpoints", "adapter", "model", "metrics.jsonl", "run.json", "tensorboard"):
            p = run_dir / n
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return None


def _setup_data(cfg: TrainConfig, tokenizer):
    from datasets import Dataset

    kw = dict(max_length=cfg.max_length, loss_on=cfg.data.loss_on, too_long=cfg.data.too_long)
    train_rows, train_stats = tokenize_dataset(tokenizer, cfg.data.train, **kw)
    stats = {"train": train_stats}
    eval_ds = None
    if cfg.data.eval:
        eval_rows, stats["eval"] = tokenize_dataset(tokenizer, cfg.data.eval, **kw)
        eval_ds = Dataset.from_list(eval_rows)
    train_ds = Dataset.from_list([{**r, "length": len(r["input_ids"])} for r in train_rows])
    return train_ds, eval_ds, stats


def _setup_model(cfg: TrainConfig, tokenizer):
    import torch

    quantize = "4bit" if cfg.adapter == "qlora" and cfg.quantization.bits == 4 else (
        "8bit" if cfg.adapter == "qlora" else None)
    qkw = None
    if quantize:
        q = cfg.quantization
        compute = resolve_dtype(cfg.dtype if q.compute_dtype == "auto" else q.compute_dtype)
        storage = compute if q.storage_dtype == "auto" else getattr(torch, q.storage_dtype)
        qkw = dict(quant_type=q.quant_type, double_quant=q.double_quant, compute_dtype=compute,
                   storage_dtype=storage)
    model = load_base_model(
        cfg.model, dtype=cfg.dtype, quantize=quantize, quant_kwargs=qkw,
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
    if cfg.adapter == "full":
        if cfg.training.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantize:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.training.gradient_checkpointing
        )
    elif cfg.training.gradient_checkpointing:
        model.gradient_checkpointing_enable()
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


def _training_args(cfg: TrainConfig, run_dir: Path, has_eval: bool, dist_kwargs: dict[str, Any]):
    """TrainingArguments from the config. Built BEFORE the model: with a ZeRO-3 DeepSpeed config this
    registers it globally, so `from_pretrained` partitions weights as they load (zero.Init) instead
    of materialising the whole model on every rank."""
    import torch
    from transformers import TrainingArguments

    t = cfg.training
    strategy = "steps" if (t.eval_steps or t.save_steps) else "epoch"
    eval_every = t.eval_steps or t.save_steps
    save_every = t.save_steps or t.eval_steps
    if has_eval and strategy == "steps":
        # The best checkpoint must be a saved one, so saves happen at eval steps.
        save_every = eval_every
    dtype = resolve_dtype(cfg.dtype) if cfg.training.precision == "auto" else None
    bf16 = cfg.training.precision == "bf16" or (dtype is torch.bfloat16 and torch.cuda.is_available())
    fp16 = cfg.training.precision == "fp16"
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
            return LengthGroupedShuffledSampler(ds["length"], self._train_batch_size,
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
    zero = "off"
    if cfg.deepspeed:
        zero = str(json.loads(Path(cfg.deepspeed).read_text()).get("zero_optimization", {}).get("stage", "?"))
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


def _write_run_info(cfg: TrainConfig, run_dir: Path, trainer, data_stats) -> None:
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
