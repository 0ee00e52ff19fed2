"""Preference training on TRL, fed by the kit's data cache: `method: dpo` (TRL's DPOTrainer), `kto`
(TRL's KTOTrainer), `orpo` and `simpo` (TRL's losses on a reference-free trainer, below).

What the kit adds around TRL's trainer, and nothing else: the pairs are tokenized once by the chat
template module (finetune.data.chat_template.encode_completion, the same masks rule as SFT) into the
data cache (finetune.data.preference), so TRL's own tokenization is skipped; batches come from the
kit's length-grouped sampler; the run directory, checkpoints, pre-emption, metrics and export are
the SFT recipe's (finetune.training.recipe).

ORPO and SimPO need no reference model. TRL has their losses (ORPOTrainer.odds_ratio_loss,
CPOTrainer.cpo_loss with loss_type "simpo"), but only inside experimental trainers that tokenize the
data again with their own rule, compute full [batch, seq, vocab] logits, and (ORPO) train the NLL term
on the prompt tokens too. KitReferenceFreeTrainer keeps TRL's losses and scores the pairs the way
DPOTrainer does: TRL's fused LM head (per-token log-probabilities in chunks, only at completion
positions, gathered under ZeRO-3), on the kit's cached pairs; the NLL term is the chosen completion's.

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
import logging
import os
import types
import warnings
from collections import defaultdict
from typing import Any

import torch
from transformers import Trainer
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from finetune.config import TrainConfig
from finetune.data.kinds import PAIRS, UNPAIRED
from finetune.data.sampler import LengthGroupedSampling
from finetune.training.throughput import ThroughputAccounting

__all__ = ["dpo_arguments", "kto_arguments", "arguments", "collator", "trainer", "KitDPOTrainer",
           "KitKTOTrainer", "KitReferenceFreeTrainer", "KTOBatchCollator"]

logger = logging.getLogger(__name__)


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
        # TRL's defaults that differ from the kit's recipe: dropout follows lora.dropout (and its
        # checkpointing default is turned off with every other config's by finetune.compat).
        "disable_dropout": False,
        "dataset_num_proc": None,
    }


def kto_arguments(cfg: TrainConfig) -> tuple[type, dict[str, Any]]:
    """KTOConfig and the fields the kit sets on it beyond the SFT recipe's TrainingArguments."""
    k = cfg.kto
    return KTOConfig, {
        "beta": k.beta,
        "loss_type": k.loss_type,
        "desirable_weight": k.desirable_weight,
        "undesirable_weight": k.undesirable_weight,
        "max_length": cfg.max_length,
        # TRL checks that loss_type "kto" samples sequentially: its KL completions are paired by dataset
        # position. The kit pairs them inside each batch instead (KTOBatchCollator), so any order is
        # right; KitKTOTrainer restores the kit's sampling after TRL's check.
        "train_sampling_strategy": "sequential",
        "disable_dropout": False,
        "dataset_num_proc": None,
    }


# ---- the hooks of methods dpo, kto, orpo and simpo (finetune.methods.registry) ----
def arguments(cfg: TrainConfig) -> tuple[type, dict[str, Any]]:
    """The TrainingArguments class of a preference method and its method fields."""
    from transformers import TrainingArguments

    if cfg.method == "dpo":
        return dpo_arguments(cfg)
    if cfg.method == "kto":
        return kto_arguments(cfg)
    return TrainingArguments, {}


def collator(cfg: TrainConfig, tokenizer):
    """KTO: TRL's unpaired collator with in-batch KL pairs (KTOBatchCollator). Pairs: TRL's, prompt +
    chosen and prompt + rejected of each pair, padded, with completion masks."""
    if cfg.method == "kto":
        return KTOBatchCollator(tokenizer.pad_token_id, cfg.max_length, kl=cfg.kto.loss_type == "kto")
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=cfg.max_length)


def trainer(cfg: TrainConfig, **common):
    """The Trainer of a preference method."""
    if cfg.method == "dpo":
        return KitDPOTrainer(**common)
    if cfg.method == "kto":
        return KitKTOTrainer(**common)
    return KitReferenceFreeTrainer(method=cfg.method, settings=getattr(cfg, cfg.method), **common)


class KitDPOTrainer(ThroughputAccounting, LengthGroupedSampling, DPOTrainer):
    """TRL's DPOTrainer with the kit's sampler, on data the kit has already tokenized."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # The data cache holds prompt_ids/chosen_ids/rejected_ids, made by the kit's chat template;
        # TRL would otherwise look for text columns and tokenize them again with its own rule.
        missing = set(PAIRS.columns) - set(dataset.column_names)
        if missing:
            raise ValueError(f"the {dataset_name} data lacks {sorted(missing)}: build it with finetune's data cache")
        return dataset


class KTOBatchCollator:
    """TRL's KTO collator, with each example's KL completion taken from the next example of the
    same batch: KTO's KL term is estimated from mismatched (prompt, completion) pairs, "the same set
    of completions as the batch, paired with other prompts" (the KTO paper). TRL builds them by
    dataset position, which only holds when the data is read in order; here they follow the batch,
    whatever the sampler. Batches of one have no other completion: TRL refuses them for loss kto."""

    def __init__(self, pad_token_id: int, max_length: int, kl: bool = True):
        from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

        self.inner = DataCollatorForUnpairedPreference(pad_token_id=pad_token_id, max_length=max_length)
        self.kl = kl

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.kl:
            rotated = [examples[-1]["completion_ids"]] + [e["completion_ids"] for e in examples[:-1]]
            examples = [{**e, "KL_completion_ids": r} for e, r in zip(examples, rotated)]
        return self.inner(examples)


class KitKTOTrainer(ThroughputAccounting, LengthGroupedSampling, KTOTrainer):
    """TRL's KTOTrainer with the kit's sampler, on unpaired examples the kit has already tokenized."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # TRL required sequential order for its KL pairing; the kit's collator pairs within the batch.
        self.args.train_sampling_strategy = "random"

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        missing = set(UNPAIRED.columns) - set(dataset.column_names)
        if missing:
            raise ValueError(f"the {dataset_name} data lacks {sorted(missing)}: build it with finetune's data cache")
        if dataset_name == "train":
            # TRL's advice when desirable and undesirable examples are unbalanced (KTO paper, eq. 8),
            # counted from the Arrow column.
            n_good = int(dataset.data.column("label").to_numpy(zero_copy_only=False).sum())
            n_bad = len(dataset) - n_good
            lo = round(max(n_bad, 1) * args.undesirable_weight / max(n_good, 1), 2)
            hi = round(lo * 1.33, 2)
            if n_good != n_bad and not lo <= args.desirable_weight <= hi:
                logger.warning("%d desirable vs %d undesirable examples: kto.desirable_weight in [%s, %s] "
                               "balances them (KTO paper, eq. 8)", n_good, n_bad, lo, hi)
        return dataset


def _trl_pair_losses():
    """TRL's ORPO and SimPO losses (trl.experimental; imported when a run uses them)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer
    params = ["self", "policy_chosen_logps", "policy_rejected_logps"]
    for name, fn in (("ORPOTrainer.odds_ratio_loss", ORPOTrainer.odds_ratio_loss),
                     ("CPOTrainer.cpo_loss", CPOTrainer.cpo_loss)):
        got = list(inspect.signature(fn).parameters)
        if got != params:
            raise ImportError(f"TRL's {name} now takes {got}; finetune.methods.preference.KitReferenceFreeTrainer "
                              "must be updated for it")
    return ORPOTrainer.odds_ratio_loss, CPOTrainer.cpo_loss


class KitReferenceFreeTrainer(ThroughputAccounting, LengthGroupedSampling, Trainer):
    """ORPO and SimPO: TRL's losses on length-normalised completion log-probabilities, no reference.

    Batches are TRL's DataCollatorForPreference's (chosen rows, then rejected rows, with completion
    masks). Per-token log-probabilities come from TRL's fused LM head (`add_fused_lm_head`, the one
    DPOTrainer uses): no full logits, and under ZeRO-3 the LM head is gathered for it.
      orpo:  NLL(chosen completion) - beta * log sigmoid(log odds(chosen) - log odds(rejected))
      simpo: -log sigmoid(beta * (avg logp(chosen) - avg logp(rejected)) - gamma) [+ sft_weight * NLL]
    Metrics are TRL's names (rewards/chosen, rewards/accuracies, nll_loss, log_odds_ratio, ...).
    """

    # compute_loss returns the micro-batch mean: the Trainer scales it for gradient accumulation.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, method: str, settings, **kwargs):
        super().__init__(*args, **kwargs)
        from accelerate.utils import is_peft_model
        from trl.trainer.utils import add_fused_lm_head

        self.method = method
        self._orpo_loss, self._cpo_loss = _trl_pair_losses()
        if method == "orpo":
            self._loss_self = types.SimpleNamespace(beta=settings.beta, accelerator=self.accelerator)
            self.nll_weight = 1.0
        else:
            self._loss_self = types.SimpleNamespace(
                beta=settings.beta, simpo_gamma=settings.gamma, label_smoothing=settings.label_smoothing,
                loss_type="simpo", alpha=0.0, accelerator=self.accelerator)
            self.nll_weight = settings.sft_weight
        add_fused_lm_head(self.model.get_base_model() if is_peft_model(self.model) else self.model)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                        fused_lm_head=True, use_cache=False)
        mask = completion_mask[:, 1:].to(outputs.log_probs.dtype)
        per_token = outputs.log_probs[:, -mask.size(1):] * mask
        sums, counts = per_token.sum(dim=1), mask.sum(dim=1)
        avg = sums / counts.clamp(min=1.0)
        chosen, rejected = avg.chunk(2, dim=0)  # batch is [chosen, rejected]
        c_sum, _ = sums.chunk(2, dim=0)
        c_count, _ = counts.chunk(2, dim=0)
        nll = -c_sum.sum() / c_count.sum().clamp(min=1.0)  # per chosen completion token
        metrics = {}
        if self.method == "orpo":
            ratio_terms, chosen_r, rejected_r, log_odds_ratio, log_odds_chosen = self._orpo_loss(
                self._loss_self, chosen, rejected)
            loss = nll - ratio_terms.mean()
            metrics["log_odds_ratio"], metrics["log_odds_chosen"] = log_odds_ratio, log_odds_chosen
        else:
            losses, chosen_r, rejected_r = self._cpo_loss(self._loss_self, chosen, rejected)
            loss = losses.mean() + (self.nll_weight * nll if self.nll_weight else 0.0)
        gather = self.accelerator.gather_for_metrics
        metrics.update({
            "rewards/chosen": gather(chosen_r).mean(), "rewards/rejected": gather(rejected_r).mean(),
            "rewards/accuracies": gather((chosen_r > rejected_r).float()).mean(),
            "rewards/margins": gather(chosen_r - rejected_r).mean(),
            "logps/chosen": gather(chosen.detach()).mean(), "logps/rejected": gather(rejected.detach()).mean(),
            "nll_loss": gather(nll.detach()).mean(),
        })
        for key, value in metrics.items():
            self._metrics[mode][key].append(float(value.detach()) if torch.is_tensor(value) else float(value))
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The batch has no "labels": the Trainer would skip the loss; evaluation is the loss.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v})
        self._metrics[mode].clear()
        super().log(logs, start_time)


# The private TRL methods the kit overrides (TRL has no hook for data that is already tokenized): if
# their signature changes, importing this module fails here, and a test names it.
_PREPARE_HOOK = ["self", "dataset", "processing_class", "args", "dataset_name"]
for _trainer in (DPOTrainer, KTOTrainer):
    _hook = list(inspect.signature(_trainer._prepare_dataset).parameters)
    if _hook != _PREPARE_HOOK:
        raise ImportError(f"TRL's {_trainer.__name__}._prepare_dataset now takes {_hook}; finetune.methods.preference."
                          f"Kit{_trainer.__name__}._prepare_dataset must be updated for it")
