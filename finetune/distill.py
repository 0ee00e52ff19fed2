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
  - the cross-entropy: the kit's chunked loss (finetune.losses.chunked_nll), on the same hidden states;
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

from finetune.chat_template import IGNORE_INDEX
from finetune.config import ConfigError, DistillSection, TrainConfig
from finetune.losses import chunked_nll, lm_parts
from finetune.training import LengthGroupedSampling
from finetune.utils import rank0_print

logger = logging.getLogger(__name__)

__all__ = ["divergence_beta", "token_divergence", "trained_hidden_states", "teacher_problems", "check_teacher",
           "load_teacher", "load_teacher_model", "install_teacher_hidden", "install_distill_loss", "teacher_kl_sum",
           "KitDistillTrainer", "teacher_summary"]


def divergence_beta(d: DistillSection) -> float:
    """TRL's beta for the configured divergence: 0 = forward KL, 1 = reverse KL, else generalized JSD."""
    return {"forward": 0.0, "reverse": 1.0}.get(d.divergence, d.jsd_beta)


def token_divergence(h_student, student, h_teacher, teacher, *, beta: float, temperature: float):
    """Per-position divergence [N] (fp32) between the next-token distributions of `student` and
    `teacher` (causal LMs, PEFT-wrapped or not) given their final hidden states at the same N
    positions. Differentiable in the student's hidden states and in a trainable student head."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    _, s_head, (s_scale, s_cap) = _parts(student)
    _, t_head, (t_scale, t_cap) = _parts(teacher)
    if h_teacher.device != h_student.device:
        h_teacher = h_teacher.to(h_student.device)
    div, _ = ChunkedDivergenceFunction.apply(
        h_student, s_head.weight, getattr(s_head, "bias", None), h_teacher, t_head.weight, getattr(t_head, "bias", None),
        beta, temperature, s_scale, s_cap, t_scale, t_cap)
    return div


def _parts(model):
    parts = lm_parts(model)
    if parts is None:
        raise ValueError(f"{type(model).__name__} does not split into a decoder and an LM head; method distill needs both")
    return parts


def _head_problem(model) -> str | None:
    """Why TRL's divergence cannot read this model's LM head as a weight matrix (a LoRA on the head:
    its update would be silently left out), or None."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    head = _parts(model)[1]
    if isinstance(head, BaseTunerLayer):
        return "a LoRA adapter on the output layer (lm_head)"
    return None


def trained_hidden_states(model, *args, labels, **kwargs):
    """Final hidden states [N, H] of `model` (its decoder, without the LM head) at the positions
    whose next token is trained (labels[:, 1:] != -100), in row-major order: position t predicts
    token t+1, as in the loss."""
    decoder = _parts(model)[0]
    kwargs["use_cache"] = False  # a cache lets packed sequences attend to each other (STACK: packed sequences)
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("skip_logits", None)
    hidden = decoder(*args, **kwargs)[0]  # [B, T, H]
    scored = labels[:, 1:].to(hidden.device) != IGNORE_INDEX
    return hidden[:, :-1][scored]


def _to_head(head, h):
    w = next(head.parameters(), None)
    return h.to(w.device) if w is not None and w.device != h.device else h


def teacher_kl_sum(model, teacher, input_ids, attention_mask, labels, *, chunk_bytes: int | None = None):
    """Sum over the trained positions of KL(teacher || model) at temperature 1, in nats (float64,
    on the model's device), without gradients: what `finetune eval` reports as the KL to the teacher.

    Both LM heads run as modules a chunk of positions at a time (finetune.losses.head_logits, so a
    head split onto another device, or carrying an adapter, scores as in the model's own forward),
    and torch's kl_div compares the two log-softmaxes: a computation independent of TRL's kernel
    that training uses."""
    import torch
    import torch.nn.functional as F

    from finetune.losses import LOGITS_CHUNK_BYTES, head_logits

    with torch.no_grad():
        h_s = trained_hidden_states(model, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        t_dev = next(teacher.parameters()).device
        h_t = trained_hidden_states(teacher, input_ids=input_ids.to(t_dev), attention_mask=attention_mask.to(t_dev),
                                    labels=labels.to(t_dev))
        _, s_head, s_post = _parts(model)
        _, t_head, t_post = _parts(teacher)
        vocab = (model.get_base_model() if hasattr(model, "get_base_model") else model).config.get_text_config().vocab_size
        step = max(1, (chunk_bytes or LOGITS_CHUNK_BYTES) // (4 * vocab))
        total = torch.zeros((), dtype=torch.float64, device=h_s.device)
        for i in range(0, h_s.shape[0], step):
            log_s = F.log_softmax(head_logits(s_head, _to_head(s_head, h_s[i:i + step]), s_post), -1)
            log_t = F.log_softmax(head_logits(t_head, _to_head(t_head, h_t[i:i + step]), t_post), -1).to(log_s.device)
            total += F.kl_div(log_s, log_t, reduction="sum", log_target=True).double().to(total.device)
    return total


# ----------------------------------------------------------------------------------------------
# the teacher
# ----------------------------------------------------------------------------------------------
def teacher_problems(tokenizer, student: str, teacher: str, *, chat_template: str | None = None,
                     trust_remote_code: bool = False) -> list[str]:
    """Why `teacher` cannot score the tokens of `student` (whose tokenizer, with the run's chat
    template, is `tokenizer`): the same vocabulary, token for token, and output layers of the same
    size are needed. Read from the tokenizers and config.json files, no weights."""
    from transformers import AutoConfig

    from finetune.modeling import load_tokenizer, model_ref

    try:
        t_tok = load_tokenizer(teacher, chat_template=chat_template, trust_remote_code=trust_remote_code)
        t_cfg = AutoConfig.from_pretrained(model_ref(teacher), trust_remote_code=trust_remote_code)
        s_cfg = AutoConfig.from_pretrained(model_ref(student), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        return [f"cannot load {teacher}: {exc}"]
    s_vocab, t_vocab = tokenizer.get_vocab(), t_tok.get_vocab()
    if s_vocab != t_vocab:
        differ = sorted(set(s_vocab.items()) ^ set(t_vocab.items()), key=lambda kv: kv[1])[:3]
        shown = ", ".join(f"{tok!r} (student id {s_vocab.get(tok)}, teacher id {t_vocab.get(tok)})"
                          for tok, _ in differ)
        return [f"{teacher}'s tokenizer differs from the student's ({len(t_vocab)} vs {len(s_vocab)} tokens; e.g. "
                f"{shown}): distillation compares the two models token by token, so they must share one tokenizer "
                "(a teacher and a student of the same model family)"]
    s_rows, t_rows = s_cfg.get_text_config().vocab_size, t_cfg.get_text_config().vocab_size
    if s_rows != t_rows:
        return [f"{teacher}'s output layer has {t_rows} rows, the student's ({student}) {s_rows}: the two "
                "distributions must be over the same vocabulary"]
    if len(tokenizer) > t_rows:
        return [f"the chat template adds tokens ({len(tokenizer)} in the tokenizer, {t_rows} in the models) that the "
                "teacher has never seen; set chat_template to a template written in the models' own tokens, or use "
                "models whose tokenizer has a chat template"]
    return []


def check_teacher(cfg: TrainConfig, tokenizer) -> None:
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
    from finetune.run_setup import four_bit_settings

    d = cfg.distill
    try:
        return load_teacher_model(d.teacher, adapter=d.teacher_adapter, dtype=cfg.dtype,
                                  quant_kwargs=four_bit_settings(cfg) if d.teacher_load_in_4bit else None,
                                  trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation)
    except ValueError as exc:
        raise ConfigError("training config", [("distill.teacher_adapter", str(exc))]) from None


def load_teacher_model(name: str, *, adapter: str | None = None, dtype: str = "auto",
                       quant_kwargs: dict[str, Any] | None = None, device_map: Any = None,
                       trust_remote_code: bool = False, attn_implementation: str | None = None):
    """A teacher, frozen and in evaluation mode, with `adapter` (a LoRA directory) applied; in 4-bit
    when `quant_kwargs` (finetune.modeling.quantization_config's settings) are given. Its forward
    with labels returns its hidden states at the trained positions (install_teacher_hidden)."""
    from finetune.modeling import load_base_model

    teacher = load_base_model(name, dtype=dtype, quantize="4bit" if quant_kwargs is not None else None,
                              quant_kwargs=quant_kwargs, device_map=device_map, trust_remote_code=trust_remote_code,
                              attn_implementation=attn_implementation)
    install_teacher_hidden(teacher)
    if adapter:
        from peft import PeftModel

        teacher = PeftModel.from_pretrained(teacher, adapter, is_trainable=False)
    problem = _head_problem(teacher)
    if problem:
        raise ValueError(f"{adapter} holds {problem}, which the divergence cannot read; merge it into the teacher "
                         "(`finetune merge`) and use the merged directory as the teacher")
    teacher.requires_grad_(False)
    teacher.eval()
    teacher.config.use_cache = False
    return teacher


def install_teacher_hidden(model) -> None:
    """`model(..., labels=L)` returns `trained_hidden_states` (no logits, no loss, no gradients),
    so that the teacher runs through its DeepSpeed wrapper's forward, which gathers its ZeRO-3
    partitions; without labels the original forward runs."""
    import torch

    original = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, labels=None, **kwargs):
        if labels is None:
            return original(*args, **kwargs)
        with torch.no_grad():
            return trained_hidden_states(self, *args, labels=labels, **kwargs)

    model.forward = types.MethodType(forward, model)


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
                             "train it with finetune.distill.KitDistillTrainer")
        h = trained_hidden_states(self, *args, labels=labels, **kwargs)  # [N, H]
        target = labels[:, 1:].to(h.device)
        target = target[target != IGNORE_INDEX]
        _, head, post = _parts(self)
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
    model._kit_chunked_loss = True  # its loss never returns logits (finetune.losses.installed)


class KitDistillTrainer(LengthGroupedSampling, Trainer):
    """`Trainer` with the kit's sampler and a teacher: before the student's forward, the teacher's
    hidden states at the trained positions are computed and handed to the student's loss.

    Logs, per logging window and over all ranks, `ce_loss` and `kd_loss` per trained token (and
    `eval_ce_loss`, `eval_kd_loss` at evaluations); `loss` is their alpha-weighted sum."""

    def __init__(self, *args, teacher, distill: DistillSection, **kwargs):
        model = kwargs["model"]
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        problem = _head_problem(model)
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


def teacher_summary(cfg: TrainConfig) -> dict[str, Any]:
    """What an exported run records about its teacher (finetune.json), so that `finetune eval` can
    load the same teacher: the distill section, absolute paths, and the 4-bit settings it used."""
    from finetune.modeling import model_ref

    d = cfg.distill
    return {**d.model_dump(), "teacher": model_ref(d.teacher),
            "teacher_adapter": model_ref(d.teacher_adapter) if d.teacher_adapter else None,
            "teacher_quantization": cfg.quantization.model_dump() if d.teacher_load_in_4bit else None}
