"""Model shapes for the plan, from `config.json` alone (never weights): the shape, parameter counts
(total, by kind, LoRA's trainable ones), sizes and counts as people write them, and where a model's
config.json comes from (a local directory, a file bundled in finetune/model_configs/, or the hub
when online)."""

from __future__ import annotations

import importlib.resources
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GiB", "MODELS_DIR", "ModelShape", "parse_size", "fmt_bytes", "fmt_count", "param_counts",
           "lora_trainable_params", "lora_target_names", "hub_id_to_key", "resolve_model_config"]

# Package data, so that a wheel install plans hub ids offline too.
MODELS_DIR = importlib.resources.files("finetune") / "model_configs"
GiB = 1024**3

# Hub ids resolve to model_configs/<key>.json: lowercase, organisation dropped, "meta-" prefix and
# "-instruct"/"-chat"/"-hf" suffixes dropped (instruct and base models share one architecture):
#   meta-llama/Llama-3.1-70B-Instruct -> llama-3.1-70b, mistralai/Mistral-7B-Instruct-v0.3 -> mistral-7b-v0.3
_DROP = re.compile(r"-(instruct|chat|hf|base)(?=-|$)")


# ----------------------------------------------------------------------------------------------
# sizes
# ----------------------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int | float) -> int:
    """'80GiB' -> 85899345920, '80GB' -> 8e10 (a GPU sold as "80 GB" has 80 GiB usable: say GiB)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 80GiB, 24GB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:8.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:8.1f} MiB"


# (scale, suffix, fewest decimals): B keeps the two decimals the plan always printed (8.03B, 70.55B)
_COUNT_UNITS = ((1e3, "K", 0), (1e6, "M", 1), (1e9, "B", 2), (1e12, "T", 2))


def fmt_count(n: float) -> str:
    """A parameter count readable at any size, with at least 3 significant digits:
    950K, 2.50M, 124.7M, 8.03B, 70.55B."""
    if abs(n) < 1000:
        return f"{n:.0f}"
    for scale, suffix, fewest in _COUNT_UNITS:
        number = f"{n / scale:.{max(fewest, 3 - len(str(int(abs(n) / scale))))}f}"
        text = number + suffix
        if abs(float(number)) < 1000:  # 999,960 is 1.00M, not 1000K
            break
    return text


# ----------------------------------------------------------------------------------------------
# the model: config.json -> shapes
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelShape:
    """What memory depends on in a Llama-style decoder (Llama, Mistral, Qwen2)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    mlp_bias: bool = False
    max_position_embeddings: int | None = None
    torch_dtype: str = "bfloat16"
    model_type: str = "llama"
    source: str = ""

    @classmethod
    def from_config(cls, cfg: dict[str, Any], source: str = "") -> ModelShape:
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if k not in cfg]
        if missing:
            raise ValueError(f"{source}: config.json lacks {missing}; `finetune plan` handles Llama-style "
                             "decoders (Llama, Mistral, Qwen2)")
        if cfg.get("num_local_experts") or cfg.get("num_experts"):
            raise ValueError(f"{source}: mixture-of-experts models are not modelled by `finetune plan` yet")
        heads = cfg["num_attention_heads"]
        mt = cfg.get("model_type", "llama")
        return cls(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            vocab_size=cfg["vocab_size"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", mt == "qwen2")),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            max_position_embeddings=cfg.get("max_position_embeddings"),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            model_type=mt,
            source=source,
        )

    # (input features, output features, bias) of every linear in one decoder layer, by module name.
    def linears(self) -> dict[str, tuple[int, int, bool]]:
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        ab, mb = self.attention_bias, self.mlp_bias
        return {"q_proj": (h, q, ab), "k_proj": (h, kv, ab), "v_proj": (h, kv, ab), "o_proj": (q, h, False),
                "gate_proj": (h, i, mb), "up_proj": (h, i, mb), "down_proj": (i, h, mb)}


def param_counts(shape: ModelShape) -> dict[str, int]:
    """Parameters by group; `total` equals sum(p.numel()) of the transformers model (tested)."""
    lin_w = sum(a * b for a, b, _ in shape.linears().values())
    lin_b = sum(b for _, b, bias in shape.linears().values() if bias)
    layer_norms = 2 * shape.hidden_size  # input_layernorm + post_attention_layernorm (RMSNorm weights)
    embed = shape.vocab_size * shape.hidden_size
    lm_head = 0 if shape.tie_word_embeddings else embed
    layers = shape.num_hidden_layers
    out = {
        "embed_tokens": embed,
        "lm_head": lm_head,
        "linear_weights": layers * lin_w,  # what NF4 quantizes
        "other": layers * (lin_b + layer_norms) + shape.hidden_size,  # biases, norms, final norm
        "per_layer": lin_w + lin_b + layer_norms,
        "largest_module": max(embed, max(a * b for a, b, _ in shape.linears().values())),
    }
    out["total"] = embed + lm_head + out["linear_weights"] + out["other"]
    return out


def lora_target_names(shape: ModelShape, targets: list[str] | str) -> list[str]:
    """PEFT's matching: `all-linear` = every linear except the output layer; else names match suffixes."""
    names = list(shape.linears())
    if targets == "all-linear":
        return names
    if isinstance(targets, str):
        return [n for n in names if re.fullmatch(targets, n) or n == targets]
    return [n for n in names if n in targets]


def lora_trainable_params(shape: ModelShape, r: int, targets: list[str] | str,
                          modules_to_save: list[str] | None = None) -> int:
    """r*(in+out) per adapted linear (A: in x r, B: r x out), plus full copies of modules_to_save.

    Equals peft's `get_nb_trainable_parameters` (tested)."""
    lin = shape.linears()
    per_layer = sum(r * (lin[n][0] + lin[n][1]) for n in lora_target_names(shape, targets))
    extra = 0
    for m in modules_to_save or []:
        if m in ("embed_tokens", "lm_head"):
            extra += shape.vocab_size * shape.hidden_size
        elif m.endswith("norm"):
            extra += shape.hidden_size * (shape.num_hidden_layers if "layernorm" in m else 1)
    return shape.num_hidden_layers * per_layer + extra


# ----------------------------------------------------------------------------------------------
# model config resolution
# ----------------------------------------------------------------------------------------------
def hub_id_to_key(model: str) -> str:
    name = model.rstrip("/").split("/")[-1].lower()
    name = name.removeprefix("meta-")
    return _DROP.sub("", name)


def resolve_model_config(model: str, *, allow_network: bool | None = None) -> tuple[dict[str, Any], str]:
    """config.json as a dict and where it came from: local dir / json file / bundled model_configs / hub."""
    p = Path(model).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text()), str(p / "config.json")
    if p.is_file() and p.suffix == ".json":
        return json.loads(p.read_text()), str(p)
    key = hub_id_to_key(model)
    bundled = MODELS_DIR.joinpath(f"{key}.json")
    if bundled.is_file():
        return json.loads(bundled.read_text()), str(bundled)
    if allow_network is None:
        allow_network = os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True")
    known = ", ".join(sorted(q.name.removesuffix(".json") for q in MODELS_DIR.iterdir() if q.name.endswith(".json")))
    if allow_network:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model, "config.json")  # config only, never weights
            return json.loads(Path(path).read_text()), f"hub:{model}/config.json"
        except Exception as exc:  # offline, gated or unknown: say what would work
            raise FileNotFoundError(
                f"no config.json for {model!r}: not a local directory, not a bundled model_configs/{key}.json "
                f"(bundled: {known}), and the hub said: {type(exc).__name__}: {exc}") from None
    raise FileNotFoundError(
        f"no config.json for {model!r}: not a local directory and no bundled model_configs/{key}.json "
        f"(bundled: {known}); offline, so the hub was not asked. Pass a directory holding config.json.")
