"""The implementation of `method: sft` (finetune.methods.sft), and the pieces other methods on chat
data share: `KitTrainer` (transformers' Trainer with the kit's length-grouped sampler) and
`chat_collator` (padding, or padding-free packing)."""

from __future__ import annotations

import inspect

from transformers import Trainer

from finetune.config import TrainConfig
from finetune.data.files import pad_collate
from finetune.data.sampler import LengthGroupedSampling
from finetune.training.throughput import ThroughputAccounting

__all__ = ["KitTrainer", "chat_collator", "collator", "trainer"]


class KitTrainer(ThroughputAccounting, LengthGroupedSampling, Trainer):
    """`Trainer` with the kit's train sampler (LengthGroupedSampling) and its throughput and MFU in every
    training log (ThroughputAccounting)."""


# The one private Trainer method the kit overrides: transformers has no public hook for the train
# sampler. If its signature changes, importing the kit fails here (and a test names it) instead of
# the override silently never being called.
SAMPLER_HOOK = list(inspect.signature(Trainer._get_train_sampler).parameters)
if SAMPLER_HOOK != ["self", "train_dataset"]:
    raise ImportError(f"transformers' Trainer._get_train_sampler now takes {SAMPLER_HOOK}; finetune.data.sampler."
                      "LengthGroupedSampling._get_train_sampler (the length-grouped sampler) must be updated for it")


def chat_collator(cfg: TrainConfig, tokenizer):
    """Padding to the longest in the batch, or (`packing: true`) one padding-free row per batch.

    Packing concatenates the batch's examples into one row with position_ids restarting at 0 for
    each: transformers then builds a block-diagonal mask (sdpa/eager) or passes sequence boundaries
    to flash attention, so no example attends to another; the first label of every example is
    -100, so no token predicts across a boundary. Needs the model's cache off, which the recipe
    does: with a cache, transformers' sdpa path lets the second sequence attend to the first
    (logits off by 0.77, measured on CPU).
    """
    if not cfg.packing:
        return pad_collate(tokenizer.pad_token_id)
    from transformers import DataCollatorWithFlattening

    flash = bool(cfg.attn_implementation and cfg.attn_implementation.startswith("flash"))
    return DataCollatorWithFlattening(return_flash_attn_kwargs=flash, return_position_ids=True)


# ---- the method's hooks (finetune.methods.registry) ----
collator = chat_collator


def trainer(cfg: TrainConfig, **common):
    return KitTrainer(**common)
