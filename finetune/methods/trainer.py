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
    if not cfg.packed:  # the recipe has decided `auto` by now (finetune.training.launch.packing_settings)
        return pad_collate(tokenizer.pad_token_id)
    from transformers import DataCollatorWithFlattening

    flash = bool(cfg.attn_implementation and ("flash" in cfg.attn_implementation))
    return PackedRows(DataCollatorWithFlattening(return_flash_attn_kwargs=flash, return_position_ids=True))


class PackedRows:
    """The packing collator, guarded: a packed row must reach the model with its position ids and no
    2-D attention mask. transformers finds the examples' boundaries from the position ids only when
    there is no mask; beside an all-ones mask it would let every example attend to the ones before
    it in the row, silently. A collator that ever returns one (another transformers release, another
    option) fails the first step instead."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
            raise RuntimeError("packed rows came with a 2-D attention_mask: transformers would ignore the examples' "
                               "boundaries (position_ids) and let them attend to each other; set packing=false")
        if "position_ids" not in batch:
            raise RuntimeError("packed rows came without position_ids: the examples' boundaries would be lost")
        return batch


# ---- the method's hooks (finetune.methods.registry) ----
collator = chat_collator


def trainer(cfg: TrainConfig, **common):
    return KitTrainer(**common)
