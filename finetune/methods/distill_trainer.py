"""Logit-level knowledge distillation (`method: distill`): the student learns the teacher's token
distributions on the kit's SFT data.

    loss = [alpha * sum CE(student, data) + (1 - alpha) * sum D_T(teacher, student)] / trained tokens

over the trained (assistant) positions only, the same positions SFT trains (labels != -100 in the
data cache), where D_T is TRL's divergence at temperature T between the two next-token
distributions: forward KL(teacher || student), reverse KL(student || teacher), or the generalized
Jensen-Shannon divergence with mixture weight `jsd_beta` (TRL's `beta`: 0 forward, 1 reverse).
The sums are divided by the trained tokens of the whole accumulated batch (`num_items_in_batch`),
as the SFT loss is, so gradient accumulation and data parallelism weigh every token alike.

Where the pieces come from:
  - the divergence: TRL's `ChunkedDivergenceFunction`, the loss of its (on-policy)
    DistillationTrainer. It projects both models' final hidden states through their LM heads a tile
    of positions and vocabulary at a time, so neither [tokens, vocab] logit tensor exists, and it
    gathers ZeRO-3-partitioned heads for that (trl.trainer.utils.maybe_gather_lm_head_ctx). TRL's
    trainer itself does not fit: it generates the completions on-policy from prompts, while this
    method trains on the data cache's fixed answers (sequence-level distillation, fixed answers
    written by the teacher, is `finetune generate` followed by SFT);
  - the cross-entropy: the kit's chunked loss (finetune.models.losses.chunked_nll), on the same hidden states;
  - the teacher under DeepSpeed: TRL's `prepare_deepspeed` (partitioned under ZeRO-3, replicated
    at the other stages, evaluation mode, no optimizer), as DPO's reference model; without DeepSpeed
    accelerate's `prepare_model(evaluation_mode=True)` (on this rank's device, no DDP wrapper).

Both losses run inside the student's own forward (installed on the model, as the chunked SFT loss
is), so the call goes through DDP's and DeepSpeed's wrappers: their gradient hooks and ZeRO-3's
parameter gathering need that. The teacher runs first, in its own wrapper's forward, without
gradients; it returns only its final hidden states at the trained positions ([N, H_teacher]).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import types
from typing import Any

from transformers import Trainer
from transformers.modeling_outputs import CausalLMOutputWithPast

from finetune.config import ConfigError, TrainConfig
from finetune.console import rank0_print
from finetune.data.chat_template import IGNORE_INDEX
from finetune.data.sampler import LengthGroupedSampling
from finetune.methods.distill import DistillSection
from finetune.methods.trainer import chat_collator
from finetune.models.losses import chunked_nll
from finetune.models.teacher import (
    RECORD_KEY,
    decoder_and_head,
    head_problem,
    load_teacher_model,
    teacher_problems,
    trained_hidden_states,
)
from finetune.training.throughput import ThroughputAccounting

logger = logging.getLogger(__name__)

__all__ = ["divergence_beta", "token_divergence", "install_distill_loss", "DistillOutput", "KitDistillTrainer",
           "before_model", "collator", "trainer", "load_teacher", "run_info"]


def divergence_beta(d: DistillSection) -> float:
    """TRL's beta for the configured divergence: 0 = forward KL, 1 = reverse KL, else generalized JSD."""
    return {"forward": 0.0, "reverse": 1.0}.get(d.divergence, d.jsd_beta)


def token_divergence(h_student, student, h_teacher, teacher, *, beta: float, temperature: float):
    """Per-position divergence [N] (fp32) between the next-token distributions of `student` and
    `teacher` (causal LMs, PEFT-wrapped or not) given their final hidden states at the same N
    positions. Differentiable in the student's hidden states and in a trainable student head."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    _, s_head, (s_scale, s_cap) = decoder_and_head(student)
    _, t_head, (t_scale, t_cap) = decoder_and_head(teacher)
    if h_teacher.device != h_student.device:
        h_teacher = h_teacher.to(h_student.device)
    div, _ = ChunkedDivergenceFunction.apply(
        h_student, s_head.weight, getattr(s_head, "bias", None), h_teacher, t_head.weight, getattr(t_head, "bias", None),
        beta, temperature, s_scale, s_cap, t_scale, t_cap)
    return div


# ----------------------------------------------------------------------------------------------
# the student's loss
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DistillOutput(CausalLMOutputWithPast):
    """The student's loss and, for the logs, this micro-batch's summed CE and divergence over its
    `tokens` trained positions (detached). Fields, not attributes set on a CausalLMOutputWithPast:
    under mixed precision accelerate rebuilds a model's outputs from their items
    (convert_outputs_to_fp32), and an attribute outside them is dropped on the way."""

    ce_sum: Any = None
    kd_sum: Any = None
    tokens: Any = None


def install_distill_loss(model, teacher, d: DistillSection) -> None:
    """Make `model(..., labels=L, teacher_hidden=H_t)` return the distillation loss (see the module
    docstring) with `.ce_sum`, `.kd_sum`, `.tokens` (this micro-batch, detached) for the logs.
    Install on the transformers model before PEFT wraps it; `teacher` is the unwrapped teacher,
    whose LM head the divergence reads."""
    import torch

    original = model.forward
    beta, alpha, temperature = divergence_beta(d), d.alpha, d.temperature

    @functools.wraps(type(model).forward)
    def forward(self, *args, labels=None, num_items_in_batch=None, teacher_hidden=None, **kwargs):
        if labels is None:
            return original(*args, **kwargs)
        if teacher_hidden is None:
            raise ValueError("method distill: the student's loss needs the teacher's hidden states (teacher_hidden=); "
                             "train it with finetune.methods.distill.KitDistillTrainer")
        h = trained_hidden_states(self, *args, labels=labels, **kwargs)  # [N, H]
        target = labels[:, 1:].to(h.device)
        target = target[target != IGNORE_INDEX]
        _, head, post = decoder_and_head(self)
        vocab = self.config.get_text_config().vocab_size
        if alpha > 0:
            ce, _ = chunked_nll(h, head, target, vocab=vocab, post=post)
        else:  # for the logs only
            with torch.no_grad():
                ce, _ = chunked_nll(h.detach(), head, target, vocab=vocab, post=post)
        if alpha < 1:
            kd = token_divergence(h, self, teacher_hidden, teacher, beta=beta, temperature=temperature).sum()
        else:  # for the logs only
            with torch.no_grad():
                kd = token_divergence(h.detach(), self, teacher_hidden, teacher, beta=beta,
                                      temperature=temperature).sum()
        n = num_items_in_batch if num_items_in_batch is not None else max(1, target.numel())
        loss = (alpha * ce + (1 - alpha) * kd) / n
        return DistillOutput(loss=loss, ce_sum=ce.detach(), kd_sum=kd.detach(),
                             tokens=torch.tensor(float(target.numel()), device=h.device))

    model.forward = types.MethodType(forward, model)
    model._kit_chunked_loss = True  # its loss never returns logits (finetune.models.losses.installed)


class KitDistillTrainer(ThroughputAccounting, LengthGroupedSampling, Trainer):
    """`Trainer` with the kit's sampler and a teacher: before the student's forward, the teacher's
    hidden states at the trained positions are computed and handed to the student's loss.

    Logs, per logging window and over all ranks, `ce_loss` and `kd_loss` per trained token (and
    `eval_ce_loss`, `eval_kd_loss` at evaluations); `loss` is their alpha-weighted sum."""

    def __init__(self, *args, teacher, distill: DistillSection, **kwargs):
        model = kwargs["model"]
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        problem = head_problem(model)
        if problem:
            raise ConfigError("training config", [("lora.target_modules", (
                f"the student has {problem}, which the divergence cannot read; leave lm_head out of "
                "lora.target_modules (all-linear does), or train it in full with lora.modules_to_save: [lm_head]"))])
        self._teacher_module = teacher
        install_distill_loss(base, teacher, distill)
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            self.teacher = prepare_deepspeed(teacher, self.accelerator)
        else:
            self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self._kd_sums: dict[str, list] = {"train": [], "eval": []}
        n = sum(getattr(p, "ds_numel", None) or p.numel() for p in teacher.parameters())
        # Under ZeRO-3 a parameter's own tensor is empty and this rank's partition is its ds_tensor.
        here = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in teacher.parameters())
        where = f", {here / 1e6:.2f}M of them on this rank (ZeRO-3)" if here < n else ""
        rank0_print(f"teacher          {distill.teacher} ({n / 1e6:.2f}M params{where}, frozen"
                    f"{', 4-bit' if distill.teacher_load_in_4bit else ''}"
                    f"{', adapter ' + distill.teacher_adapter if distill.teacher_adapter else ''}); "
                    f"loss = {distill.alpha:g} x CE + {1 - distill.alpha:g} x {distill.divergence}"
                    f"{f' (beta {distill.jsd_beta:g})' if distill.divergence == 'jsd' else ''} at T={distill.temperature:g}")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch

        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        self.teacher.eval()
        with torch.no_grad():
            teacher_hidden = self.teacher(**teacher_inputs, labels=inputs["labels"])
        loss, outputs = super().compute_loss(model, {**inputs, "teacher_hidden": teacher_hidden}, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        mode = "train" if model.training else "eval"
        self._kd_sums[mode].append(torch.stack([outputs.ce_sum, outputs.kd_sum, outputs.tokens]).float())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Every rank logs (the Trainer calls log on all of them), so the sums can be reduced here.
        # Every rank logs (the Trainer calls log on all of them), so the sums are reduced here, always:
        # a rank that skipped the collective would leave the others waiting in it.
        import torch

        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        sums = sum(self._kd_sums[mode]) if self._kd_sums[mode] else torch.zeros(3, device=self.args.device)
        self._kd_sums[mode] = []
        ce, kd, tokens = self.accelerator.reduce(sums, reduction="sum").tolist()
        if tokens:
            prefix = "eval_" if mode == "eval" else ""
            logs[f"{prefix}ce_loss"] = ce / tokens
            logs[f"{prefix}kd_loss"] = kd / tokens
        super().log(logs, start_time)


# ---- the method's hooks (finetune.methods.registry) ----
def before_model(cfg: TrainConfig, tokenizer) -> None:
    """`teacher_problems` for a training run, as a ConfigError naming distill.teacher."""
    problems = teacher_problems(tokenizer, cfg.model, cfg.distill.teacher, chat_template=cfg.chat_template,
                                trust_remote_code=cfg.trust_remote_code)
    if problems:
        raise ConfigError("training config", [("distill.teacher", p) for p in problems])


def load_teacher(cfg: TrainConfig):
    """The run's teacher (`load_teacher_model`) in the compute dtype (bf16 on GPUs that have it, fp32
    on CPU: it needs no fp32 master weights), 4-bit with the quantization section's settings when
    `distill.teacher_load_in_4bit`. Call it after the TrainingArguments exist: under ZeRO-3 the
    weights are then partitioned as they load (zero.Init), as the student's are."""
    from finetune.training.launch import four_bit_settings

    d = cfg.distill
    try:
        return load_teacher_model(d.teacher, adapter=d.teacher_adapter, dtype=cfg.dtype,
                                  quant_kwargs=four_bit_settings(cfg) if d.teacher_load_in_4bit else None,
                                  trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation)
    except ValueError as exc:
        raise ConfigError("training config", [("distill.teacher_adapter", str(exc))]) from None


collator = chat_collator  # chat JSONL, padded or packed, as SFT


def trainer(cfg: TrainConfig, **common):
    # The teacher is loaded here, after the TrainingArguments: under ZeRO-3 it is partitioned as it loads.
    return KitDistillTrainer(**common, teacher=load_teacher(cfg), distill=cfg.distill)


def teacher_summary(cfg: TrainConfig) -> dict[str, Any]:
    """What an exported run records about its teacher, so that `finetune eval` can load the same
    teacher: the distill section, absolute paths, and the 4-bit settings it used."""
    from finetune.models.loading import model_ref

    d = cfg.distill
    return {**d.model_dump(), "teacher": model_ref(d.teacher),
            "teacher_adapter": model_ref(d.teacher_adapter) if d.teacher_adapter else None,
            "teacher_quantization": cfg.quantization.model_dump() if d.teacher_load_in_4bit else None}


def run_info(cfg: TrainConfig) -> dict[str, Any]:
    """finetune.json's record of the teacher (finetune.models.teacher.RECORD_KEY)."""
    return {RECORD_KEY: teacher_summary(cfg)}
