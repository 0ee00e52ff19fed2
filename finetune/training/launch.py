"""What a run's config and its launch decide together, checked before anything loads: which DeepSpeed
JSON, the ZeRO stage, the dtype the weights load in, autocast, the 4-bit settings and the kernels.

`resolve_launch` decides all of it once, at the start of `finetune train`, into one frozen `Launch`
that the recipe passes down (training arguments, model loading, the run directory, the summary);
nothing downstream reads the DeepSpeed JSON or the launcher's environment again. The functions it
is made of stay public: each is one decision, tested on its own."""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.config import ConfigError, TrainConfig
from finetune.models.loading import resolve_dtype

logger = logging.getLogger(__name__)

__all__ = ["Launch", "resolve_launch", "deepspeed_config", "read_deepspeed_json", "uses_deepspeed", "zero_stage", "quantization_settings", "autocast_flags",
           "deepspeed_dtype", "check_quantized_storage", "weights_dtype", "Kernels", "kernel_settings",
           "four_bit_settings"]


def read_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed JSON's settings (the one reader: the launch, the plan), read from disk once per
    version of the file."""
    p = Path(path)
    st = p.stat()
    return copy.deepcopy(_read_json(str(p.resolve()), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=16)
def _read_json(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def deepspeed_config(cfg: TrainConfig) -> str | None:
    """The run's one DeepSpeed JSON (None without one), whichever way it is named.

    `accelerate launch --config_file <deepspeed yaml>` exports the yaml's `deepspeed_config_file` as
    ACCELERATE_DEEPSPEED_CONFIG_FILE. Rule: the training config's `deepspeed` key wins when the
    launcher names no file; when it is unset, the launcher's file is used (and written to the run's
    config.yaml); when both are set they must be the same file or hold the same JSON, else it is an
    error, since DeepSpeed would otherwise run with a config the user did not read.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return cfg.deepspeed
    launcher = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if launcher in ("", "none"):
        return cfg.deepspeed
    if not Path(launcher).is_file():
        raise ConfigError("accelerate launch", [(
            "deepspeed_config_file",
            f"file not found: {launcher} (relative paths are read from {os.getcwd()}; launch from the "
            "repository root or make the path absolute)",
        )])
    if not cfg.deepspeed:
        return launcher
    same = Path(cfg.deepspeed).resolve() == Path(launcher).resolve() or (
        read_deepspeed_json(cfg.deepspeed) == read_deepspeed_json(launcher))
    if not same:
        raise ConfigError("training config vs accelerate launch", [(
            "deepspeed",
            f"{cfg.deepspeed} differs from the accelerate config's deepspeed_config_file {launcher}; "
            "unset `deepspeed` (the launcher's file is used) or point both at the same JSON",
        )])
    return cfg.deepspeed


def uses_deepspeed(cfg: TrainConfig) -> bool:
    """A DeepSpeed JSON in the config, or `accelerate launch` with a DeepSpeed yaml (which may hold
    its DeepSpeed settings inline instead of in a file)."""
    return bool(cfg.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def zero_stage(cfg: TrainConfig) -> int:
    """The ZeRO stage of this run: 0 without DeepSpeed."""
    if cfg.deepspeed:
        stage = read_deepspeed_json(cfg.deepspeed).get("zero_optimization", {}).get("stage", 0)
        return int(stage) if str(stage).isdigit() else 0
    if uses_deepspeed(cfg):  # accelerate launch with inline DeepSpeed settings
        return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)
    return 0


def quantization_settings(cfg: TrainConfig) -> tuple[str | None, dict[str, Any] | None]:
    """("4bit" | "8bit" | None, bitsandbytes settings) for this run's student."""
    if cfg.adapter != "qlora":
        return None, None
    if cfg.quantization.bits == 8:
        return "8bit", {}
    return "4bit", four_bit_settings(cfg)


def four_bit_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The bitsandbytes 4-bit settings of the quantization section (the student's for QLoRA, the
    teacher's for `distill.teacher_load_in_4bit`)."""
    import torch

    q = cfg.quantization
    compute = resolve_dtype(cfg.dtype if q.compute_dtype == "auto" else q.compute_dtype)
    storage = compute if q.storage_dtype == "auto" else getattr(torch, q.storage_dtype)
    return dict(quant_type=q.quant_type, double_quant=q.double_quant, compute_dtype=compute, storage_dtype=storage)


def autocast_flags(cfg: TrainConfig, rt) -> tuple[bool, bool]:
    """(bf16, fp16) for the Trainer, and so for DeepSpeed's "auto" precision fields. The compute
    dtype (resolve_dtype: bf16 on GPUs that have it, else fp32) decides, whatever dtype the weights
    were loaded in (weights_dtype)."""
    import torch

    compute = resolve_dtype(cfg.dtype) if cfg.training.precision == "auto" else None
    bf16 = cfg.training.precision == "bf16" or (compute is torch.bfloat16 and rt.on_accelerator)
    fp16 = cfg.training.precision == "fp16" or (compute is torch.float16 and rt.on_accelerator)
    return bf16, fp16


def deepspeed_dtype(cfg: TrainConfig, rt):
    """The dtype DeepSpeed casts the model's floating-point parameters to (None without DeepSpeed)."""
    import torch

    if not cfg.deepspeed:
        return None
    ds = read_deepspeed_json(cfg.deepspeed)
    bf16, fp16 = autocast_flags(cfg, rt)

    def enabled(section: str, auto: bool) -> bool:
        v = (ds.get(section) or {}).get("enabled", False)
        return auto if v == "auto" else bool(v)

    if enabled("bf16", bf16) or enabled("bfloat16", bf16):
        return torch.bfloat16
    if enabled("fp16", fp16):
        return torch.float16
    return torch.float32


def check_quantized_storage(cfg: TrainConfig, rt) -> None:
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

    quantize, _ = quantization_settings(cfg)
    teacher = cfg.method_spec.teacher(cfg)
    four_bit_teacher = bool(teacher and teacher["load_in_4bit"])  # a 4-bit teacher: the same settings
    ds_dtype = deepspeed_dtype(cfg, rt)
    if (quantize != "4bit" and not four_bit_teacher) or ds_dtype is None:
        return
    storage = four_bit_settings(cfg)["storage_dtype"]
    stage = zero_stage(cfg)
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


def weights_dtype(cfg: TrainConfig, rt) -> str:
    """The dtype the base weights are loaded in.

    Full fine-tuning on a GPU without DeepSpeed at `dtype: auto` loads fp32 weights and trains
    with bf16 autocast: the optimizer then updates fp32 master weights. Loaded in bf16, AdamW would
    update bf16 weights in place and lose every update below bf16's resolution (~0.4% of the
    weight). DeepSpeed keeps fp32 master weights itself, and LoRA trains fp32 adapter weights
    (PEFT upcasts them) over a frozen base, so those load the base in the compute dtype.
    An explicit `dtype: bfloat16` keeps pure bf16 training, with a warning."""
    if cfg.adapter == "full" and not uses_deepspeed(cfg) and rt.on_accelerator:
        if cfg.dtype == "auto":
            return "float32"
        if cfg.dtype in ("bfloat16", "float16"):
            logger.warning("dtype=%s with full fine-tuning and no DeepSpeed trains without fp32 master weights "
                           "(updates below %s resolution are lost); dtype=auto trains fp32 weights with "
                           "autocast", cfg.dtype, cfg.dtype)
    return cfg.dtype


@dataclass(frozen=True)
class Kernels:
    """The GPU kernels a run uses. `liger` holds the keyword arguments of Liger's
    apply_liger_kernel_to_<model> (what transformers' TrainingArguments.liger_kernel_config passes on);
    None: no kernel library. `fused_loss`: Liger's fused linear cross-entropy replaces the kit's
    chunked loss (finetune.models.losses), so the kit must not install its own."""

    liger: dict[str, bool] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def fused_loss(self) -> bool:
        return bool(self.liger and self.liger.get("fused_linear_cross_entropy"))


def auto_kernels(device: str, model_type: str | None) -> tuple[str, str]:
    """`training.kernels: auto` -> ("liger" | "none", why): Liger on CUDA when liger-kernel imports and
    has kernels for the model's family (transformers' model_type)."""
    if not (device.startswith("cuda") or device == "gpu"):
        return "none", "kernels auto: none (Triton kernels need CUDA)"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return "none", "kernels auto: none (liger-kernel is not installed: pip install 'finetune-kit[liger]')"
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return "none", f"kernels auto: none (Liger has no kernels for model type {model_type!r})"
    return "liger", f"kernels auto: liger (model type {model_type})"


def kernel_settings(cfg: TrainConfig, rt, model_type: str | None) -> Kernels:
    """What `training.kernels` means on this device, for this model and loss; checked before the
    model loads.

    liger on a CUDA device: RMSNorm, RoPE and SwiGLU kernels, and for `training.loss: chunked`
    Liger's fused linear cross-entropy (logits a chunk at a time, gradient computed in the forward,
    in the compute dtype), except under ZeRO-3: Liger's loss reads `lm_head.weight` directly, and
    ZeRO-3 gathers a weight only when its module's forward runs, so the kernel would see the
    0-element shard; there the kit's chunked loss (which calls the head module) stays and the other
    kernels still apply. `training.loss: full` gets Liger's cross-entropy kernel on full logits.
    Triton kernels need CUDA: on CPU (and MPS) the run goes on without them and says so."""
    if cfg.training.kernels == "none":
        return Kernels()
    if cfg.training.kernels == "auto":
        chosen, why = auto_kernels(rt.device, model_type)
        if chosen == "none":
            return Kernels(notes=[why] if rt.device.startswith("cuda") else [])
    if not rt.device.startswith("cuda"):
        note = (f"training.kernels=liger: Liger's Triton kernels need a CUDA GPU; this run on {rt.device} "
                "trains without them")
        logger.warning(note)
        return Kernels(notes=[note])
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        raise ConfigError("training config", [("training.kernels", (
            f"liger-kernel is not importable ({e}); pip install 'finetune-kit[liger]' (needs CUDA and Triton), "
            "or set training.kernels=none"))]) from e
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        supported = ", ".join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))
        raise ConfigError("training config", [("training.kernels", (
            f"Liger has no kernels for model type {model_type!r} ({cfg.model}); supported: {supported}. "
            "Set training.kernels=none"))])
    notes = []
    method = cfg.method_spec
    fused = cfg.training.loss == "chunked" and method.token_loss
    if not method.token_loss:
        notes.append(f"method {method.name}: {method.own_head or 'its loss is its own'}; Liger's fused loss stays "
                     "off (its RMSNorm/RoPE/SwiGLU kernels apply)")
    if fused and zero_stage(cfg) == 3:
        fused = False
        notes.append("ZeRO-3: Liger's fused linear cross-entropy cannot see the partitioned lm_head weight; "
                     "the kit's chunked loss is used, with Liger's RMSNorm/RoPE/SwiGLU kernels")
    liger = {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": fused,
             "cross_entropy": cfg.training.loss == "full"}
    if cfg.training.kernels == "auto":
        notes.insert(0, auto_kernels(rt.device, model_type)[1])
    return Kernels(liger=liger, notes=notes)


# Attention implementations that keep packed examples apart without a dense [tokens, tokens] mask:
# flex_attention (a document block mask, compiled; torch's, no extra wheel) and flash-attention
# (sequence boundaries; the flash-attn wheel, or a Hub kernel "kernels-community/...").
PACKING_ATTENTION = ("flex_attention", "flash_attention_2", "flash_attention_3")


# Hub flash-attention kernels (the `kernels` package; transformers loads one named as the attention
# implementation) that pack without a dense mask, best first, by the CUDA capability they need.
HUB_FLASH_KERNELS = (((9, 0), "kernels-community/vllm-flash-attn3"), ((9, 0), "kernels-community/flash-attn3"),
                     ((8, 0), "kernels-community/flash-attn2"))


def cached_attention_kernel(device: str) -> str | None:
    """The best Hub flash-attention kernel whose build for this torch/CUDA is already in the local Hugging
    Face cache (nothing is downloaded: a cluster node is often offline, and a kernel fetched mid-launch
    by every rank is a surprise), or None: not CUDA, `kernels` not installed, or nothing cached."""
    import importlib.util

    import torch

    if not (device.startswith("cuda") and torch.cuda.is_available()) or importlib.util.find_spec("kernels") is None:
        return None
    from kernels import install_kernel
    from transformers.integrations.hub_kernels import get_attn_kernel_version

    capability = torch.cuda.get_device_capability(torch.device(device))
    for needs, repo in HUB_FLASH_KERNELS:
        if capability < needs:
            continue
        try:
            # the version of the repository transformers itself loads
            install_kernel(repo, version=get_attn_kernel_version(repo), local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached, no build for this torch/CUDA, or a `kernels` older than version=
            continue
        return repo
    return None


def packing_settings(cfg: TrainConfig, device: str) -> tuple[bool, str | None, str]:
    """(pack the batches?, the attention implementation, what was decided, in words) for `device`
    ("cuda:N", "cpu", ..., or the plan's "gpu"/"cpu").

    `packing: auto` (the default) packs on CUDA when the method can (chat data: sft, distill) and
    the attention keeps examples apart without a dense mask: the config's flash-attention (a wheel or a
    Hub kernel), else a Hub flash-attention kernel already in the local cache (cached_attention_kernel),
    else flex_attention; on CPU it does not pack (flex_attention has no
    backward pass there, and padded batches of similar length are as fast). `packing: true` packs
    on any device; on CPU through sdpa's block-diagonal mask (quadratic in the row, correct). Refused:
    flex_attention for training on CPU (torch raises in backward), and packing for a method that
    scores sequences one by one (config validation)."""
    from finetune.config import ConfigError

    cuda = device.startswith("cuda") or device == "gpu"
    attn = cfg.attn_implementation
    if not cuda and attn == "flex_attention":
        raise ConfigError("training config", [("attn_implementation", (
            "flex_attention cannot train on CPU: torch's FlexAttention has no backward pass there "
            "(NotImplementedError); leave attn_implementation unset (sdpa) on CPU"))])
    fast = attn is None or attn in PACKING_ATTENTION or str(attn).startswith("kernels-")
    want = cfg.packing
    if want == "auto":
        if not cuda:
            return False, attn, "packing auto: off on CPU (padded batches of similar length)"
        if not cfg.method_spec.packing:
            return False, attn, f"packing auto: off (method {cfg.method} scores each sequence on its own)"
        if not fast:
            return False, attn, (f"packing auto: off (attn_implementation {attn} would need a dense mask per "
                                 "packed row; flex_attention or flash-attention keep examples apart without one)")
        want = True
    if not want:
        return False, attn, "packing off"
    cached = ""
    if cuda and attn is None:
        attn = cached_attention_kernel(device) if device != "gpu" else None  # the plan: flex's memory
        cached = " (a Hub kernel in the local cache)" if attn else ""
        attn = attn or "flex_attention"
    how = {"flex_attention": "flex_attention's document mask",
           None: "sdpa's block-diagonal mask from the position ids (quadratic in the row's length)",
           "sdpa": "sdpa's block-diagonal mask from the position ids (quadratic in the row's length)",
           "eager": "eager attention's block-diagonal mask (quadratic in the row's length)"}.get(
        attn, f"{attn}'s sequence boundaries{cached}")
    return True, attn, f"packing on: one padding-free row per micro-batch, examples kept apart by {how}"


@dataclass(frozen=True)
class Launch:
    """What this run's config and launch decided, once (resolve_launch)."""

    rt: Any  # kitcore.runtime.Runtime: the device and the process group
    deepspeed: str | None  # the one DeepSpeed JSON (the config's or the launcher's)
    uses_deepspeed: bool
    zero_stage: int  # 0 without DeepSpeed
    bf16: bool  # autocast for the Trainer (and DeepSpeed's "auto" precision)
    fp16: bool
    weights_dtype: str  # the dtype the base weights load in
    quantize: str | None  # "4bit" | "8bit" | None: the student's quantization
    quant_kwargs: dict[str, Any] | None
    kernels: Kernels
    packing: bool = False  # `packing` as decided for this device (packing_settings)
    attn_implementation: str | None = None  # the attention the model loads with
    packing_note: str = ""

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


def resolve_launch(cfg: TrainConfig, rt, *, model_type: str | None = None) -> Launch:
    """Decide everything `Launch` holds and check the combinations that would be silently wrong, before
    any weights load. `cfg.deepspeed` must already be the run's JSON (deepspeed_config); `model_type`
    (the model's config.json) is needed only for `training.kernels` other than none."""
    check_quantized_storage(cfg, rt)
    if cfg.training.compile and zero_stage(cfg) == 3:
        raise ConfigError("training config", [("training.compile", (
            "not with ZeRO-3: its hooks gather each layer's parameters as the layer runs, which a compiled "
            "layer would trace as empty shards; set training.compile=false or use ZeRO-2"))])
    bf16, fp16 = autocast_flags(cfg, rt)
    quantize, qkw = quantization_settings(cfg)
    packing, attn, packing_note = packing_settings(cfg, rt.device)
    return Launch(rt=rt, deepspeed=cfg.deepspeed, uses_deepspeed=uses_deepspeed(cfg), zero_stage=zero_stage(cfg),
                  bf16=bf16, fp16=fp16, weights_dtype=weights_dtype(cfg, rt), quantize=quantize, quant_kwargs=qkw,
                  kernels=kernel_settings(cfg, rt, model_type), packing=packing, attn_implementation=attn,
                  packing_note=packing_note)
