"""Preference training (`method: dpo`) on TRL's DPOTrainer, fed by the kit's data cache.

What the kit adds around TRL's trainer, and nothing else: the pairs are tokenized once by the chat
template module (finetune.chat_template.encode_completion, the same masks rule as SFT) into the
data cache (finetune.preference_data), so TRL's own tokenization is skipped; batches come from the
kit's length-grouped sampler; the run directory, checkpoints, pre-emption, metrics and export are
the SFT recipe's (finetune.train).

The reference model is TRL's decision, which is the one wanted here:
  - LoRA / QLoRA: no second copy of the weights. TRL adds a frozen copy of the starting adapter
    ("ref") and scores the reference with it, so a fresh adapter (B = 0) gives the base model and
    `init_adapter: SFT_RUN/adapter` gives the SFT policy, the usual SFT -> DPO reference.
  - full fine-tuning: a second model loaded from the same path, prepared for DeepSpeed (partitioned
    under ZeRO-3) in evaluation mode; or none at all with `dpo.precompute_ref_log_probs: true`, which
    scores the training data under the reference once before training.
"""

from __future__ import annotations

import inspect
from typing import Any

from trl import DPOConfig, DPOTrainer

from finetune.config import TrainConfig
from finetune.train import LengthGroupedSampling

__all__ = ["dpo_arguments", "KitDPOTrainer"]


def dpo_arguments(cfg: TrainConfig) -> tuple[type, dict[str, Any]]:
    """DPOConfig and the fields the kit sets on it beyond the SFT recipe's TrainingArguments."""
    d = cfg.dpo
    return DPOConfig, {
        "beta": d.beta,
        "loss_type": [d.loss_type] if isinstance(d.loss_type, str) else list(d.loss_type),
        "loss_weights": d.loss_weights,
        "label_smoothing": d.label_smoothing,
        "precompute_ref_log_probs": d.precompute_ref_log_probs,
        # The cache already fits every pair into max_length (data.too_long); TRL's collator would cut
        # the same way, so it is given the same limit.
        "max_length": cfg.max_length,
        # TRL's defaults that differ from the kit's recipe: checkpointing is set on the model by
        # finetune.train._setup_model (training.gradient_checkpointing), dropout follows lora.dropout.
        "gradient_checkpointing": False,
        "disable_dropout": False,
        "dataset_num_proc": None,
    }


class KitDPOTrainer(LengthGroupedSampling, DPOTrainer):
    """TRL's DPOTrainer with the kit's sampler, on data the kit has already tokenized."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # The data cache holds prompt_ids/chosen_ids/rejected_ids, made by the kit's chat template;
        # TRL would otherwise look for text columns and tokenize them again with its own rule.
        missing = {"prompt_ids", "chosen_ids", "rejected_ids"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"the {dataset_name} data lacks {sorted(missing)}: build it with finetune's data cache")
        return dataset


# The private TRL method the kit overrides (TRL has no hook for data that is already tokenized): if
# its signature changes, importing this module fails here, and a test names it.
_PREPARE_HOOK = list(inspect.signature(DPOTrainer._prepare_dataset).parameters)
if _PREPARE_HOOK != ["self", "dataset", "processing_class", "args", "dataset_name"]:
    raise ImportError(f"TRL's DPOTrainer._prepare_dataset now takes {_PREPARE_HOOK}; "
                      "finetune.preference.KitDPOTrainer._prepare_dataset must be updated for it")
