"""The training methods by name: one record per method, which the rest of the kit asks instead of
testing names.

A record is declarative and imports nothing heavy, so that validating a config, `finetune plan` and
`finetune --help` never import TRL. What a method does at run time (its TrainingArguments class, its
collator, its Trainer) lives in its implementation module, named by `impl` and imported when a run
needs it. That module may define any of:

    arguments(cfg) -> (TrainingArguments class, extra keyword arguments)   default: TrainingArguments, {}
    collator(cfg, tokenizer) -> the data collator                          required
    trainer(cfg, **common) -> the Trainer                                  required
    before_model(cfg, tokenizer) -> None   checks that need the tokenizer, before any weights load
    run_info(cfg) -> dict                  what the exported adapter's finetune.json adds

Adding a method: a module with its record (and settings section, if any), its implementation, and
its name in BUILTIN below; or, from outside the kit, `register(Method(...))` before the config loads.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

__all__ = ["DEFAULT", "Method", "register", "get", "names", "methods", "Check", "BUILTIN"]

# A config check: (the field's validated value, the fields validated before it) -> None, or
# (key inside the field or None, message) when the value is wrong for this method.
Check = Callable[[Any, dict[str, Any]], "tuple[str | None, str] | None"]


def _no_teacher(cfg: Any) -> dict[str, Any] | None:
    return None


def _no_room(cfg: Any) -> int:
    return 0


def _one_group(cfg: Any) -> tuple[int, int]:
    return 1, 1


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    impl: str  # the implementation module (see the module docstring)
    data: str = "chat"  # the kind of training data it reads: finetune.data.kinds
    section: type | None = None  # its settings, under the config key `name`
    # Trained against a frozen reference model (the starting model): TRL's copy of the starting adapter
    # under LoRA, a second model under full fine-tuning.
    reference: bool = False
    # A reference that depends on the settings (grpo: only with beta > 0), from the config; else `reference`.
    reference_when: Callable[[Any], bool] | None = None
    # The config key that removes the reference model from memory under full fine-tuning, if any.
    reference_off_key: str | None = None
    packing: bool = False  # may train on packed (padding-free) rows
    # Its loss is the kit's per-token loss over the model's LM head (training.loss, and Liger's fused linear
    # cross-entropy on CUDA). Otherwise `own_head` says how it scores tokens instead.
    token_loss: bool = False
    own_head: str = ""
    # It scores tokens through TRL's fused LM head (trl.trainer.utils.add_fused_lm_head): per-token
    # log-probabilities over tiles of positions x vocabulary entries, never the full logits. The plan
    # counts that head's memory (finetune.plan.memory) instead of the kit's loss.
    fused_lm_head: bool = False
    export_drops: tuple[str, ...] = ()  # subdirectories of the saved adapter that are not the trained adapter
    # Section keys that hold paths (read from the YAML's directory, as the top-level paths are).
    path_keys: tuple[str, ...] = ()
    checks: dict[str, Check] = field(default_factory=dict)  # config field -> its check for this method
    # The frozen teacher a run of this method loads, from its config ({"model", "adapter", "load_in_4bit"}), or None.
    teacher: Callable[[Any], dict[str, Any] | None] = _no_teacher
    teacher_4bit_key: str | None = None  # the config key that loads that teacher in 4-bit
    # Methods that generate their completions while training (data kind `prompts`): the tokens a prompt
    # must leave under max_length for its completion, from the config (the data cache drops longer prompts).
    completion_room: Callable[[Any], int] = _no_room
    # ... and how it draws its prompts (TRL's RepeatSampler), from the config: (completions per prompt,
    # optimisation passes over each generation). The plan replays that order (finetune.plan.batches).
    rollout_groups: Callable[[Any], tuple[int, int]] = _one_group

    def implementation(self) -> ModuleType:
        return importlib.import_module(self.impl)

    def hook(self, name: str, default: Callable | None = None) -> Callable:
        fn = getattr(self.implementation(), name, default)
        if fn is None:
            raise TypeError(f"training method {self.name!r}: {self.impl} defines no {name}()")
        return fn

    def has_reference(self, cfg: Any) -> bool:
        """Whether a run of `cfg` trains against a reference model (or adapter)."""
        return self.reference_when(cfg) if self.reference_when is not None else self.reference

    def settings(self, cfg: Any) -> Any:
        """The method's section of `cfg` (None for a method without one)."""
        return getattr(cfg, self.name) if self.section is not None else None


DEFAULT = "sft"  # a config that names no method

# The methods that ship with the kit: finetune.methods.<module>.METHODS.
BUILTIN = ("sft", "dpo", "kto", "reference_free", "distill", "grpo")
_REGISTRY: dict[str, Method] = {}
_BUILTINS_LOADED = False
_LOADING_BUILTINS = False


def register(method: Method, *, replace: bool = False) -> Method:
    """Add a training method. One registered from outside the kit has no settings section of its own:
    the sections are fields of the config schema (finetune.config.TrainConfig), assembled from the
    built-in methods when it is imported."""
    if method.name in _REGISTRY and not replace and _REGISTRY[method.name] != method:
        raise ValueError(f"a training method named {method.name!r} is already registered")
    if method.section is not None and not _LOADING_BUILTINS:
        raise ValueError(f"training method {method.name!r}: a method registered at run time cannot add a config "
                         "section; read its settings from its own file or environment, or ship it in finetune/methods/")
    _REGISTRY[method.name] = method
    return method


def _builtins() -> None:
    global _BUILTINS_LOADED, _LOADING_BUILTINS
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = _LOADING_BUILTINS = True
        try:
            for module in BUILTIN:
                for m in importlib.import_module(f"finetune.methods.{module}").METHODS:
                    register(m)
        finally:
            _LOADING_BUILTINS = False


def get(name: str) -> Method:
    _builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown training method {name!r}; one of {', '.join(_REGISTRY)}") from None


def names() -> list[str]:
    _builtins()
    return list(_REGISTRY)


def methods() -> list[Method]:
    _builtins()
    return list(_REGISTRY.values())
