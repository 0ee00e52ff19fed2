"""The TrainingArguments of a run (or its method's TRL config, e.g. DPOConfig), from the config and
the launch's decisions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from finetune.compat import checkpointing_off
from finetune.config import ConfigError, TrainConfig
from finetune.training.launch import Launch

__all__ = ["training_arguments"]


def training_arguments(cfg: TrainConfig, run_dir: Path, has_eval: bool, launch: Launch):
    """TrainingArguments from the config. Built BEFORE the model: with a ZeRO-3 DeepSpeed config this
    registers it globally, so `from_pretrained` partitions weights as they load (zero.Init) instead
    of materialising the whole model on every rank."""
    from transformers import TrainingArguments

    args_class, method_args = cfg.method_spec.hook("arguments", lambda cfg: (TrainingArguments, {}))(cfg)
    t = cfg.training
    strategy = "steps" if (t.eval_steps or t.save_steps) else "epoch"
    eval_every = t.eval_steps or t.save_steps
    save_every = t.save_steps or t.eval_steps
    if has_eval and strategy == "steps":
        # The best checkpoint must be a saved one, so saves happen at eval steps.
        save_every = eval_every
    rt, kernels = launch.rt, launch.kernels
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
    kwargs = dict(
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
        bf16=launch.bf16,
        fp16=launch.fp16,
        train_sampling_strategy="random",  # group_by_length: the kit's sampler (LengthGroupedSampling._get_train_sampler)
        remove_unused_columns=False,
        prediction_loss_only=True,  # eval during training needs eval_loss only (the chunked loss has no logits)
        dataloader_num_workers=t.num_workers,
        include_num_input_tokens_seen="non_padding",
        report_to=report_to,
        seed=cfg.seed,
        data_seed=cfg.seed,
        deepspeed=launch.deepspeed,
        disable_tqdm=not rt.is_main,
        use_liger_kernel=bool(kernels.liger),
        liger_kernel_config=kernels.liger,
        save_only_model=False,
        **dist_kwargs,
        **checkpointing_off(args_class),  # enabled on the model by the recipe (PEFT needs it there)
    )
    # The method's fields, and the recipe's fields it sets otherwise (e.g. its own best-model metric).
    kwargs.update(method_args)
    args = args_class(**kwargs)
    if args.n_gpu > 1:
        # One process that sees several GPUs: the Trainer would wrap the model in nn.DataParallel
        # and multiply the batch by the GPU count (`finetune train` pins itself to GPU 0; this is
        # a library call in a process whose CUDA was already initialised).
        raise ConfigError("training setup", [("CUDA_VISIBLE_DEVICES", (
            f"this single process sees {args.n_gpu} GPUs; set CUDA_VISIBLE_DEVICES to one GPU before "
            "starting Python, or use `accelerate launch` to train data parallel"))])
    return args
