"""`finetune train`: config -> distributed state -> data -> model (+adapter) -> trainer -> train ->
export -> eval. Read top to bottom, it is the recipe; the pieces live beside it:

    kitcore/runtime.py              the device and the process group
    finetune/training/launch.py     DeepSpeed JSON, ZeRO stage, dtypes, 4-bit settings, kernels: decided
                                    once (Launch), checked before anything loads
    finetune/data/cache.py          the tokenized data, built once, memory-mapped by every rank
    finetune/methods/               the training method: its data kind, collator, Trainer
    finetune/training/arguments.py  the TrainingArguments (or the method's TRL config)
    finetune/training/run_dir.py    the run directory: overwrite/resume rules, run.json, the exported adapter
    finetune/training/callbacks.py  metrics log, pre-emption, COMPLETE markers

Thin over `transformers.Trainer`: it owns the loop, gradient accumulation (token-weighted via
`num_items_in_batch`), checkpoint/resume and the accelerate/DeepSpeed mechanics. The kit adds what
it gets wrong or leaves out: loss masks from the chat template, gloo on CPU clusters, kill-safe
checkpoints, a run directory that refuses to be overwritten, and an exported adapter that carries
its tokenizer and chat template.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from finetune.config import ConfigError, TrainConfig
from finetune.console import rank0_print
from finetune.data.files import DataStats
from finetune.data.kinds import kind
from finetune.errors import CheckpointWriteError, Preempted, RunDirError
from finetune.models.loading import load_base_model, load_tokenizer
from finetune.training.arguments import training_arguments
from finetune.training.callbacks import (
    PREEMPTED_EXIT_CODE,
    CheckpointMarker,
    MemoryCheck,
    MetricsLogger,
    Preemption,
    process_rss,
)
from finetune.training.launch import Launch, deepspeed_config, resolve_launch, uses_deepspeed
from finetune.training.run_dir import (
    export_weights,
    latest_complete_checkpoint,
    setup_run_dir,
    write_run_info,
)

logger = logging.getLogger(__name__)

__all__ = ["train", "RunDirError", "latest_complete_checkpoint", "PREEMPTED_EXIT_CODE"]


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
    cfg.deepspeed = deepspeed_config(cfg)  # this run's own copy: its config.yaml names the JSON it ran with
    rt = _setup_distributed(cfg)
    kernels_here = cfg.training.kernels != "none" and rt.device.startswith("cuda")
    launch = resolve_launch(cfg, rt, model_type=_model_type(cfg) if kernels_here else None)
    # `packing: auto` and `training.kernels: auto` become what this device does (config.yaml records
    # them), packing with the attention it needs.
    cfg.packing, cfg.attn_implementation = launch.packing, launch.attn_implementation
    cfg.training.kernels = "liger" if launch.kernels.liger else "none"
    resume_from = setup_run_dir(cfg, run_dir, launch)
    tokenizer = load_tokenizer(cfg.model, chat_template=cfg.chat_template,
                               trust_remote_code=cfg.trust_remote_code)
    # What the method checks with the tokenizer, before any weights load (distill: one tokenizer for both).
    cfg.method_spec.hook("before_model", lambda cfg, tokenizer: None)(cfg, tokenizer)
    train_ds, eval_ds, data_stats = _setup_data(cfg, tokenizer, rt)
    info = {}
    for key, record in AUTO_RECORD.items():
        if getattr(cfg.training, key) == "auto":
            info[record] = _resolve_auto_batch(cfg, rt, run_dir, resume_from, key, train_ds)
    # A micro-batch `auto` decided can be retried smaller: its heaviest micro-batches run early (the sampler's
    # heavy_early); a fixed one keeps the shuffled order.
    heavy_early = _auto_decided(info)
    plan = _check_plan(cfg, rt, train_ds, data_stats["train"], heavy_early=heavy_early)
    # Liger patches its model family's transformers module for the whole process; undone on return.
    patched = _modeling_module(cfg) if cfg.training.kernels == "liger" else None
    with scoped_module_globals(patched):
        try:
            stopped_at = _fit(cfg, launch, run_dir, tokenizer, train_ds, eval_ds, data_stats, resume_from, callbacks,
                              plan, info)
            retry = False
        except FirstStepsOutOfMemory as exc:
            retry = _smaller_micro_batch(cfg, rt, launch, resume_from, info, str(exc))
        if retry:  # outside the handler: the failed attempt's frames (its model, its Trainer) are gone
            import gc

            gc.collect()
            runtime.release_accelerator_memory()
            # Planned again for the smaller micro-batch, for the memory check; not refused: the plan was
            # already wrong once, and the failed attempt's memory may not all be back yet.
            plan = _check_plan(cfg, rt, train_ds, data_stats["train"], refuse=False, heavy_early=True)
            stopped_at = _fit(cfg, launch, run_dir, tokenizer, train_ds, eval_ds, data_stats, resume_from, callbacks,
                              plan, info)
    # The trainer, model and optimizer were freed when _fit returned (accelerator memory too).
    runtime.release_accelerator_memory()
    _cleanup_distributed()
    if stopped_at is not None:
        raise Preempted(stopped_at)
    if cfg.eval.after_train and cfg.eval.data and rt.is_main:
        from finetune.eval.evaluation import evaluate_run

        evaluate_run(run_dir, cfg, subprocess=rt.distributed or bool(cfg.deepspeed))
    return run_dir


def _fit(cfg, launch, run_dir, tokenizer, train_ds, eval_ds, data_stats, resume_from, callbacks,
         plan: dict | None = None, info: dict | None = None) -> int | None:
    """Build the model and the Trainer, train, export. Returns the step a pre-emption stopped at
    (None when training finished). Everything heavy lives in this frame and is freed on return."""
    args = training_arguments(cfg, run_dir, eval_ds is not None, launch)
    # Seed before the adapter weights are created: the Trainer seeds only when it is built, so
    # without this a run's LoRA init depended on what ran earlier in the same process.
    from transformers import set_seed

    set_seed(cfg.seed)
    # What the process holds before the model loads: the CPU plan predicts the growth over it.
    baseline = process_rss() if plan and plan["device"] == "cpu" else None
    model = _setup_model(cfg, tokenizer, launch)
    trainer = _setup_trainer(cfg, args, run_dir, model, tokenizer, train_ds, eval_ds, callbacks,
                             memory_plan=plan, memory_baseline=baseline,
                             heavy_early=_auto_decided(info))
    _print_summary(cfg, launch, trainer, model, data_stats)
    write_run_info(cfg, run_dir, trainer, data_stats, launch, extra=info)

    preempt = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Preemption))
    preempt.install()
    failed = None
    try:
        _train_with_checkpoint_errors(trainer, resume_from)
    except (RuntimeError, MemoryError) as exc:
        # In an `auto` run the heaviest micro-batches are the second optimizer step
        # (finetune.data.sampler.heavy_batches_at): one that does not fit fails in the first two.
        if not (_out_of_memory(exc) and trainer.state.global_step <= 1):
            raise
        failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    finally:
        preempt.uninstall()
    if failed is not None:  # raised here, not in the handler: the caller may free this frame and retry
        raise FirstStepsOutOfMemory(failed)
    if preempt.stopped:
        trainer.accelerator.wait_for_everyone()
        rank0_print(f"Pre-empted ({preempt.signal_name}): checkpoint saved at step "
                    f"{trainer.state.global_step}; re-run the same command with resume=true to continue.")
        return trainer.state.global_step
    _record_throughput(trainer, run_dir)
    export_weights(cfg, run_dir, trainer, tokenizer)
    trainer.accelerator.wait_for_everyone()
    return None


def _record_throughput(trainer, run_dir: Path) -> None:
    """The run's tokens/s, TFLOP/s and MFU over its logged steps (finetune.training.throughput):
    printed, and kept in run.json ("throughput")."""
    summary = trainer.throughput_summary() if hasattr(trainer, "throughput_summary") else None
    if summary is None or not trainer.is_world_process_zero():
        return
    import json

    from finetune.console import atomic_write_text

    line = summary.pop("line", None)  # a method's own account (grpo: rollouts and training)
    rank0_print(line or (
        f"throughput: {summary['tokens_per_s']:,.0f} tokens/s ({summary['trained_tokens_per_s']:,.0f} trained), "
        f"{summary['tflops_per_device']:.3g} TFLOP/s per device, MFU {100 * summary['mfu']:.1f}% "
        f"(6N convention {100 * summary['mfu_6n']:.1f}%) of {summary['mfu_peak']}; peak memory "
        f"{summary['peak_mem_gib']:.2f} GiB"))
    path = run_dir / "run.json"
    if path.is_file():
        info = json.loads(path.read_text())
        info["throughput"] = summary
        atomic_write_text(path, json.dumps(info, indent=2))


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


class scoped_module_globals:
    """Restore, on exit, the names of module `name` (e.g. transformers.models.llama.modeling_llama)
    that were rebound inside the block. Liger's kernels are applied by rebinding that module's
    RMSNorm, MLP and rotary-embedding names process-wide, not only on the model being trained: left
    so, every later model of that family built in the process (an evaluation on CPU, the next sweep
    trial with training.kernels=none) would run Triton kernels, and fail on a CPU tensor. The
    trained model keeps its own Liger modules. `name` None: nothing to do."""

    def __init__(self, name: str | None):
        self.name = name

    def __enter__(self):
        import importlib

        self._module = importlib.import_module(self.name) if self.name else None
        self._before = dict(vars(self._module)) if self._module else {}
        return self

    def __exit__(self, *exc):
        if self._module is not None:
            names = vars(self._module)
            for key, value in self._before.items():
                if names.get(key) is not value:
                    setattr(self._module, key, value)
        return False


def _modeling_module(cfg: TrainConfig) -> str | None:
    """The transformers module that holds the model family's classes (None when it has none, e.g.
    remote code)."""
    import importlib.util

    model_type = _model_type(cfg)
    name = f"transformers.models.{model_type}.modeling_{model_type}"
    try:
        return name if importlib.util.find_spec(name) else None
    except ModuleNotFoundError:
        return None


def _setup_distributed(cfg: TrainConfig):
    """Create the process group the Trainer will use (kitcore.runtime decides the backend: NCCL on
    GPUs, gloo without). Returns the Runtime."""
    from kitcore import runtime

    _, _, world, _ = runtime.launch_env()
    if world > 1:
        return runtime.start(deepspeed=uses_deepspeed(cfg), timeout_s=cfg.training.ddp_timeout_s)
    return runtime.current()


def _cleanup_distributed() -> None:
    """Tear the process group down once every rank has saved: the post-training eval runs on rank 0
    alone (in a clean subprocess after a distributed or DeepSpeed run), and with the group still up
    it sharded its data and waited for ranks that had exited (gloo: "Connection closed by peer")."""
    from kitcore import runtime

    runtime.end()


class FirstStepsOutOfMemory(RuntimeError):
    """Training ran out of memory in its first two optimizer steps (where its heaviest micro-batches run)."""


def _out_of_memory(exc: BaseException) -> bool:
    """torch's CUDA out-of-memory error, its CPU allocator's failure (a cgroup or RLIMIT_AS limit), or
    Python's MemoryError."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def _smaller_micro_batch(cfg: TrainConfig, rt, launch: Launch, resume_from, info: dict, error: str) -> bool:
    """After an out-of-memory error before the first optimizer step of a run whose micro-batch was
    decided by `auto` (tokens_per_batch or batch_size): halve it and double grad_accum (an optimizer
    step holds what it held), once, and say so. Only a single process without DeepSpeed retries in
    place: with several ranks the others are waiting in a collective the failed one never reaches
    (the launcher stops them all), and a DeepSpeed engine is not rebuilt in one process; those runs
    stop with the settings to re-run with. A micro-batch the user fixed is not changed: the error
    says what to change."""

    t = cfg.training
    key = next((k for k, record in AUTO_RECORD.items() if info.get(record)), None)
    if key is None:
        key = "tokens_per_batch" if t.tokens_per_batch else "batch_size"
        raise ConfigError("memory", [(f"training.{key}", (
            f"ran out of memory in the first two optimizer steps ({error}). Lower training.{key} (and raise "
            f"training.grad_accum to keep the step), set it to auto, or turn on training.gradient_checkpointing; "
            f"`finetune plan --data` shows what fits"))])
    decided, value = info[AUTO_RECORD[key]], getattr(t, key)
    least = cfg.max_length if key == "tokens_per_batch" else 1
    half = value // 2
    why = ("it was already lowered once" if "retried" in decided else
           "a resumed run keeps its micro-batch" if resume_from else
           f"half of it would be under {least}" if half < least else None)
    if why:
        raise ConfigError("memory", [(f"training.{key}", (
            f"ran out of memory in the first two optimizer steps ({error}); not retried: {why}. Raise "
            f"training.memory_margin, or turn on training.gradient_checkpointing"))])
    unit = "tokens" if key == "tokens_per_batch" else "examples"
    said = (f"out of memory in the first two optimizer steps ({error}): retried once with {key} {half} x grad_accum "
            f"{2 * t.grad_accum} (was {value} x {t.grad_accum}); {unit} per optimizer step unchanged "
            f"({half * 2 * t.grad_accum * rt.world_size})")
    if rt.distributed or launch.uses_deepspeed:
        raise ConfigError("memory", [(f"training.{key}", (
            f"ran out of memory in the first two optimizer steps ({error}); a run of {rt.world_size} process(es)"
            f"{' under DeepSpeed' if launch.uses_deepspeed else ''} is not retried in place. Re-run with "
            f"training.{key}={half} training.grad_accum={2 * t.grad_accum} (the same {unit} per step), or raise "
            f"training.memory_margin"))])
    rank0_print(said)
    logger.warning(said)
    # The retry starts the run again from the model on disk: a checkpoint the failed attempt saved
    # (save_steps 1) is not a state of the retried run.
    for stale in (Path(cfg.output_dir) / "checkpoints").glob("checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    setattr(t, key, half)
    t.grad_accum = 2 * t.grad_accum
    info[AUTO_RECORD[key]] = f"{decided}; retried: {said}"
    return True


def _device_memory(rt) -> tuple[str, int, str]:
    """("gpu" | "cpu", the memory a run on this device may plan for, what sets it): the GPU's memory;
    on CPU what this process may still allocate (the system's available memory or its memory cgroup's
    headroom, shared by this node's processes, or its RLIMIT_AS; kitcore.runtime.host_memory_available)."""
    import torch

    if rt.device.startswith("cuda"):
        return "gpu", torch.cuda.get_device_properties(torch.device(rt.device)).total_memory, "the GPU's memory"
    from kitcore.runtime import host_memory_available

    mem, what = host_memory_available(rt.local_world_size)
    return "cpu", mem, what


# run.json's record of an `auto` micro-batch decision, per config key.
AUTO_RECORD = {"tokens_per_batch": "token_budget", "batch_size": "batch_size_auto"}
_STEP_KEY = {"tokens_per_batch": "tokens_per_step", "batch_size": "examples_per_step"}


def _auto_decided(info: dict | None) -> bool:
    """Whether `auto` decided this run's micro-batch (run.json's AUTO_RECORD entries are set)."""
    return any((info or {}).get(record) for record in AUTO_RECORD.values())


def _resolve_auto_batch(cfg: TrainConfig, rt, run_dir: Path, resume_from, key: str, train_ds) -> str:
    """`training.tokens_per_batch: auto` or `training.batch_size: auto` (`key`): decided by rank 0 from
    the plan and the device's memory (batch_size: planned for the data's longest example), sent to
    every rank, written into this run's config (config.yaml records what it trained with). A resumed
    run keeps the micro-batch and grad_accum it started with: other batches would make its position
    in the data meaningless."""
    import yaml

    from kitcore.runtime import process_group

    decided = [None]
    if rt.is_main:
        saved = run_dir / "config.yaml"
        before = (yaml.safe_load(saved.read_text()) or {}).get("training", {}) if resume_from and saved.is_file() else {}
        if isinstance(before.get(key), int):
            decided = [(before[key], before["grad_accum"],
                        f"{key} auto: {before[key]} x grad_accum {before['grad_accum']}, as the run being resumed decided")]
        else:
            from finetune.plan.command import resolve_batch_size, resolve_token_budget

            device, mem, what = _device_memory(rt)
            extra = {}
            if key == "batch_size":
                lengths = train_ds.data.column("length").to_numpy()
                extra = {"longest": int(lengths.max())} if len(lengths) else {}
            resolve = resolve_token_budget if key == "tokens_per_batch" else resolve_batch_size
            decided = [resolve(cfg, world_size=rt.world_size, gpus_per_node=rt.local_world_size,
                               device=device, device_memory=mem, memory_note=what, **extra)]
    dist = process_group()
    if dist is not None:
        dist.broadcast_object_list(decided, src=0)
    value, accum, said = decided[0]
    # The run's config becomes what it trains with (config.yaml reloads as a fixed micro-batch); the
    # decision itself is in the log and run.json (AUTO_RECORD).
    setattr(cfg.training, key, value)
    setattr(cfg.training, _STEP_KEY[key], None)
    cfg.training.grad_accum = accum
    rank0_print(said)
    return said


def _check_plan(cfg: TrainConfig, rt, train_ds, train_stats, *, refuse: bool = True,
                heavy_early: bool = False) -> dict | None:
    """Print the memory plan (rank 0) and refuse a run predicted not to fit unless force=true;
    return what the run's MemoryCheck compares its measured peak with.

    The plan is for the longest micro-batch this run's sampler will produce from its data (the data
    cache's token lengths; finetune.plan.batches), found by rank 0 and sent to the others.
    On GPUs the budget is the device's memory; on CPU it is the memory available now (psutil)
    shared by this node's processes, and the plan predicts RSS in CPU mode (fp32), the quantity
    scripts/validate_plan.py checks against measurements (docs/plan.md). Runs before the model is
    loaded: a run that cannot fit fails before minutes of loading."""
    from finetune.plan.command import plan_for_training
    from finetune.plan.memory import render_plan
    from kitcore.runtime import process_group

    device, mem, _ = _device_memory(rt)
    from finetune.plan.command import run_longest_batch, trained_counter

    batch = [None]
    if rt.is_main:
        batch = [run_longest_batch(cfg, train_ds.data.column("length").to_numpy(), world_size=rt.world_size,
                                   trained_of=trained_counter(train_ds),
                                   mean_trained=train_stats.trained_tokens / max(1, train_stats.kept),
                                   heavy_early=heavy_early)]
    dist = process_group()
    if dist is not None:
        dist.broadcast_object_list(batch, src=0)
    try:
        plan = plan_for_training(cfg, world_size=rt.world_size, gpus_per_node=rt.local_world_size,
                                 device=device, device_memory=mem, batch=batch[0])
    except (FileNotFoundError, ValueError, KeyError) as exc:
        logger.warning("no memory plan for %s: %s", cfg.model, exc)
        return None
    rank0_print(render_plan(plan))
    if refuse and not plan.fits and not cfg.force:
        raise ConfigError("memory plan", [("force", "predicted not to fit (see the table above); apply one of "
                                          "the listed changes, or pass --force / force=true to try anyway")])
    return {"device": device, "bytes": plan.device_total, "worst_case_bytes": plan.worst_case_total,
            "batch": plan.setup.batch_note or None}





def _setup_data(cfg: TrainConfig, tokenizer, rt=None):
    """The tokenized splits, memory-mapped from the data cache (finetune.data.cache): built once by
    one process per node (or job), then read by every rank; nothing is held as Python objects."""
    from finetune.data.cache import prepared_split

    train_ds, train_stats, _ = prepared_split(cfg, tokenizer, cfg.data.train, rt)
    stats = {"train": train_stats}
    eval_ds = None
    columns = list(kind(cfg.method_spec.data).columns)
    if cfg.data.eval:
        eval_ds, stats["eval"], _ = prepared_split(cfg, tokenizer, cfg.data.eval, rt)
        eval_ds = eval_ds.select_columns(columns)
    return train_ds.select_columns([*columns, "length"]), eval_ds, stats


def _model_type(cfg: TrainConfig) -> str | None:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code).model_type


def _setup_model(cfg: TrainConfig, tokenizer, launch: Launch):
    model = _build_model(cfg, tokenizer, launch)
    if cfg.training.compile:
        compiled = compile_decoder_layers(model)
        rank0_print(f"training.compile: {compiled} decoder layers compiled (torch.compile, dynamic shapes); the first "
                    "step compiles them")
    return model


def compile_decoder_layers(model) -> int:
    """Regional compilation: torch.compile each decoder layer in place (the classes transformers lists
    in the model's `_no_split_modules`), not the whole model. The layers share one compiled graph, so
    compiling costs one layer's time, not the model's; shapes are dynamic (every batch has its own
    length). Returns how many layers were compiled."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError("training config", [("training.compile", (
            f"{type(base).__name__} names no decoder layer class (_no_split_modules); set training.compile=false"))])
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def _build_model(cfg: TrainConfig, tokenizer, launch: Launch):
    quantize, kernels = launch.quantize, launch.kernels
    model = load_base_model(
        cfg.model, dtype=launch.weights_dtype, quantize=quantize, quant_kwargs=launch.quant_kwargs,
        trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation,
    )
    # Liger's kernels are applied by the Trainer (TrainingArguments.use_liger_kernel); its fused
    # linear cross-entropy, when on, is this run's chunked loss and replaces the model's forward.
    # Preference training scores sequences through TRL's own chunked LM head (add_fused_lm_head).
    if cfg.method_spec.token_loss and cfg.training.loss == "chunked" and not kernels.fused_loss:
        from finetune.models.losses import install_chunked_loss

        if not install_chunked_loss(model):
            logger.warning("%s does not split into a decoder and an LM head: training.loss=chunked falls back to "
                           "the model's own loss over full logits", cfg.model)
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
    if cfg.init_adapter:
        # Continue an adapter (SFT -> DPO): its own LoRA settings, trainable again.
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
        own = peft_model.peft_config["default"]
        if (own.r, own.lora_alpha) != (cfg.lora.r, cfg.lora.alpha):
            logger.warning("init_adapter %s has r=%s alpha=%s; the config's lora section says r=%s alpha=%s "
                           "(training continues the adapter as saved; `finetune plan` used the config's)",
                           cfg.init_adapter, own.r, own.lora_alpha, cfg.lora.r, cfg.lora.alpha)
        return peft_model
    return get_peft_model(model, lcfg)


def _setup_trainer(cfg, args, run_dir, model, tokenizer, train_ds, eval_ds, extra_callbacks=(), *,
                   memory_plan: dict | None = None, memory_baseline: int | None = None, heavy_early: bool = False):
    from transformers import EarlyStoppingCallback

    t = cfg.training
    has_eval = eval_ds is not None
    metrics = MetricsLogger(run_dir / "metrics.jsonl", resume=cfg.resume)
    callbacks = [metrics, CheckpointMarker(), Preemption(grace_s=t.preemption_grace_s)]
    if memory_plan is not None:  # every run checks the plan against its own first steps
        callbacks.append(MemoryCheck(memory_plan, memory_baseline, metrics, run_dir / "run.json"))
    if has_eval and t.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    callbacks.extend(extra_callbacks)
    common = dict(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                  callbacks=callbacks, group_by_length=t.group_by_length, group_window=t.group_window,
                  tokens_per_batch=t.tokens_per_batch, packing=cfg.packed, heavy_early=heavy_early)
    common["data_collator"] = make_collator(cfg, tokenizer)
    return cfg.method_spec.hook("trainer")(cfg, **common)


def _train_with_checkpoint_errors(trainer, resume_from) -> None:
    """trainer.train(), with a failed checkpoint write (full disk, quota, file-size limit) turned
    into one error naming the path: the partial checkpoint is removed, and the previous COMPLETE one
    is untouched (the Trainer rotates old checkpoints only after a successful save)."""
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except OSError as exc:
        ckpt_dir = Path(trainer.args.output_dir)
        folder = ckpt_dir / f"checkpoint-{trainer.state.global_step}"
        if not folder.is_dir() or (folder / "COMPLETE").is_file():
            raise  # not a checkpoint write
        if trainer.args.should_save:
            shutil.rmtree(folder, ignore_errors=True)
        previous = latest_complete_checkpoint(ckpt_dir)
        raise CheckpointWriteError(
            f"could not write checkpoint {folder}: {exc.strerror or exc}. The partial checkpoint "
            f"was removed; the previous one ({previous or 'none yet'}) is intact. Free space "
            "(or raise the quota / file-size limit) and re-run with resume=true."
        ) from exc


def make_collator(cfg: TrainConfig, tokenizer):
    """The collator of the run's method (finetune.methods): for chat data padding, or padding-free
    packing (finetune.methods.trainer.chat_collator); for pairs and unpaired examples TRL's."""
    return cfg.method_spec.hook("collator")(cfg, tokenizer)


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------
def _print_summary(cfg: TrainConfig, launch: Launch, trainer, model, data_stats: dict[str, DataStats]) -> None:
    numel = lambda p: getattr(p, "ds_numel", None) or p.numel()  # noqa: E731  (ZeRO-3: shard is empty)
    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    args = trainer.args
    world = args.world_size
    eff_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    st = data_stats["train"]
    mean_tokens = st.tokens / max(st.kept, 1)
    budget = cfg.training.tokens_per_batch
    accum = args.gradient_accumulation_steps
    generates = kind(cfg.method_spec.data).prompts
    group = getattr(cfg.method_spec.settings(cfg), "num_generations", 1) if generates else 1
    room = cfg.method_spec.completion_room(cfg)
    batch_lines = [
        f"effective batch  {eff_batch} completions = {args.per_device_train_batch_size} per device x {accum} accum x "
        f"{world} ranks: {eff_batch // group} prompts x {group} generations",
        f"tokens per step  up to ~{eff_batch * (mean_tokens + room):.0f} (mean prompt {mean_tokens:.0f} tokens + up to "
        f"{room} generated)",
    ] if generates else [
        f"effective batch  {eff_batch} = {args.per_device_train_batch_size} per device x "
        f"{accum} accum x {world} ranks",
        f"tokens per step  ~{eff_batch * mean_tokens:.0f} (mean {mean_tokens:.0f} tokens/example)",
    ] if not budget else [
        f"effective batch  up to {budget * accum * world} tokens = up to {budget} per micro-batch x {accum} accum x "
        f"{world} ranks (training.tokens_per_batch)",
    ]
    zero = str(launch.zero_stage or "off")
    rank0_print(
        "\n".join([
            f"model            {cfg.model} ({cfg.adapter})",
            f"parameters       {total / 1e6:.2f}M total, {trainable / 1e6:.3f}M trainable "
            f"({100 * trainable / max(total, 1):.2f}%)",
            f"world size       {world}   ZeRO stage {zero}   device {args.device}",
            *batch_lines,
            (f"train data       {st.kept} prompts, completions generated while training, dropped "
             f"{dict(st.dropped) or 0}" if generates else
             f"train data       {st.kept} examples, {st.trained_tokens} trained tokens, "
             f"{st.truncated} truncated, dropped {dict(st.dropped) or 0}"),
            f"attention        {launch.attn_implementation or 'the model default (sdpa)'}; {launch.packing_note}",
            f"kernels          {'liger' if launch.kernels.liger else 'none'}"
            + "".join(f"; {n}" for n in launch.kernels.notes),
        ])
    )


