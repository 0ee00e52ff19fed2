"""Loading a base model (full precision or 4/8-bit) and its tokenizer; attaching adapters.

Everything goes through `from_pretrained` on a directory or hub id, so the tiny local models used
here and a 70B model on a cluster take the same path. bitsandbytes is imported only for QLoRA.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from finetune.data.chat_template import ensure_chat_template

logger = logging.getLogger(__name__)

__all__ = ["load_tokenizer", "load_base_model", "resolve_dtype", "model_ref"]


def model_ref(name: str) -> str:
    """A local directory becomes an absolute path, so adapters saved with it load from anywhere."""
    p = Path(name).expanduser()
    return str(p.resolve()) if p.is_dir() else name


def resolve_dtype(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def load_tokenizer(name: str, *, chat_template: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if trust_remote_code:
        logger.warning("trust_remote_code=True: code shipped with %s will run on this machine", name)
    tok = AutoTokenizer.from_pretrained(model_ref(name), trust_remote_code=trust_remote_code)
    ensure_chat_template(tok, chat_template)
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so any token will do.
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(bits: int, *, quant_type: str = "nf4", double_quant: bool = True,
                        compute_dtype: Any = None, storage_dtype: Any = None):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise RuntimeError("QLoRA needs bitsandbytes: pip install bitsandbytes") from exc
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        # ZeRO-3 partitions parameters by dtype; 4-bit weights stored as uint8 cannot be flattened
        # with the rest, so the storage dtype must equal the compute dtype (PEFT docs).
        bnb_4bit_quant_storage=storage_dtype or compute_dtype,
    )


def verify_model_dir(name: str) -> None:
    """A model directory the kit wrote (a merge, a full fine-tune's export) is checked against its
    checksums before it loads. One process per node checks (under a launch the others would only
    repeat it; when it finds damage it stops with the error and the launcher ends the job)."""
    from kitcore.integrity import require_intact
    from kitcore.runtime import launch_env

    path = Path(name).expanduser()
    if not path.is_dir() or launch_env()[1] != 0:
        return
    # A model directory from elsewhere (the Hub, a download) has no checksums and is not noted.
    require_intact(path, "model", note=logging.WARNING if (path / "finetune.json").is_file() else logging.DEBUG)


def load_base_model(
    name: str,
    *,
    dtype: str = "auto",
    quantize: str | None = None,
    quant_kwargs: dict[str, Any] | None = None,
    device_map: Any = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """A causal LM from a directory or hub id; weights from safetensors when present."""
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    if trust_remote_code:
        logger.warning("trust_remote_code=True: code shipped with %s will run on this machine", name)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantize:
        bits = 4 if quantize in ("4bit", 4) else 8
        qk = dict(quant_kwargs or {})
        qk.setdefault("compute_dtype", torch_dtype)
        kwargs["quantization_config"] = quantization_config(bits, **qk)
        from transformers.integrations import is_deepspeed_zero3_enabled

        if device_map is None and not is_deepspeed_zero3_enabled():
            # bitsandbytes quantizes as the weights are placed, so they must land on this rank's
            # device. Under ZeRO-3 transformers refuses a device_map and puts the whole 4-bit model
            # on the current device itself (it does not load quantized models under zero.Init).
            from kitcore.runtime import current

            device_map = {"": current().device}
    if device_map is not None:
        kwargs["device_map"] = device_map
    verify_model_dir(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_ref(name), **kwargs)
    except Exception as exc:
        # transformers reads `.bin` checkpoints with torch.load(weights_only=True): a pickle that
        # carries code (not just tensors) fails there, and is never executed.
        if _refused_pickle(exc):
            from finetune.errors import UnsafeCheckpointError

            bins = sorted(p.name for p in Path(model_ref(name)).glob("*.bin")) if Path(name).is_dir() else []
            raise UnsafeCheckpointError(
                f"refusing to load {name}/{', '.join(bins) or 'its pickle checkpoint'}: the file holds more "
                "than tensors (a pickle can run code). Only tensors are loaded (weights_only=True); use "
                "a safetensors copy of the weights, or convert a checkpoint you trust."
            ) from None
        raise
    if quantize:
        _keep_cpu_4bit_layers_unpacked_where_unsupported(model)
    return model


def _refused_pickle(exc: BaseException) -> bool:
    """torch.load(weights_only=True) refused a pickle: an UnpicklingError in the exception chain."""
    import pickle

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, pickle.UnpicklingError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _keep_cpu_4bit_layers_unpacked_where_unsupported(model) -> None:
    """bitsandbytes 0.50 repacks a CPU `Linear4bit` for its AVX512-BF16 kernel on the first forward
    in eval mode, and that kernel asserts out_features % 32 == 0 and in_features % blocksize == 0
    ("N must be divisible by block_n"): any other layer crashes at evaluation (training mode never
    repacks). Such layers keep the generic dequantize path; real models' sizes keep the fast kernel.
    """
    for module in model.modules():
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        if quant_state is None or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        if module.out_features % 32 or module.in_features % quant_state.blocksize:
            module.support_avx512bf16_for_cpu = False
