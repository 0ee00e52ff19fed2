"""finetune: LoRA/QLoRA fine-tuning under DeepSpeed ZeRO, evaluation and inference.

Public API (imported lazily, so `import finetune` stays fast and torch loads only when used):

    from finetune import load_for_inference, chat
    model, tokenizer = load_for_inference("runs/my-run/adapter")
    chat(model, tokenizer, [{"role": "user", "content": "Hello"}])
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_for_inference": "finetune.inference.load",
    "chat": "finetune.inference.load",
    "generate_replies": "finetune.inference.load",
    "merge_adapter": "finetune.inference.load",
    "export_gguf": "finetune.export.gguf",
    "load_config": "finetune.config",
    "TrainConfig": "finetune.config",
    "train": "finetune.training.recipe",
    "evaluate": "finetune.eval.evaluation",
    "encode_chat": "finetune.data.chat_template",
    "build_tiny_model": "finetune.tiny",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
