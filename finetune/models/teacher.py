"""A frozen teacher model: loading it (optionally 4-bit, with an adapter), checking that it can
score a student's tokens, its final hidden states at the trained positions, and the KL of a
student to it (what `finetune eval` reports). Used by `method: distill` (finetune.methods) and by
evaluation."""

from __future__ import annotations

import functools
import types
from typing import Any

from finetune.data.chat_template import IGNORE_INDEX
from finetune.models.losses import lm_parts

__all__ = ["RECORD_KEY", "decoder_and_head", "head_problem", "trained_hidden_states", "teacher_kl_sum",
           "teacher_problems", "load_teacher_model", "install_teacher_hidden"]

# The key of finetune.json (an exported adapter's metadata) under which a run records the teacher it
# was trained against, so that `finetune eval` can score the KL to the same teacher.
RECORD_KEY = "distill"  # layout: not a method (a key of finetune.json, which predates the registry)


def decoder_and_head(model):
    """(decoder, LM head, (logit scale, soft cap)) of a causal LM, PEFT-wrapped or not."""
    parts = lm_parts(model)
    if parts is None:
        raise ValueError(f"{type(model).__name__} does not split into a decoder and an LM head; a teacher and a distilled student need both")
    return parts


def head_problem(model) -> str | None:
    """Why TRL's divergence cannot read this model's LM head as a weight matrix (a LoRA on the head:
    its update would be silently left out), or None."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    head = decoder_and_head(model)[1]
    if isinstance(head, BaseTunerLayer):
        return "a LoRA adapter on the output layer (lm_head)"
    return None


def trained_hidden_states(model, *args, labels, **kwargs):
    """Final hidden states [N, H] of `model` (its decoder, without the LM head) at the positions
    whose next token is trained (labels[:, 1:] != -100), in row-major order: position t predicts
    token t+1, as in the loss."""
    decoder = decoder_and_head(model)[0]
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

    Both LM heads run as modules a chunk of positions at a time (finetune.models.losses.head_logits, so a
    head split onto another device, or carrying an adapter, scores as in the model's own forward),
    and torch's kl_div compares the two log-softmaxes: a computation independent of TRL's kernel
    that training uses."""
    import torch
    import torch.nn.functional as F

    from finetune.models.losses import LOGITS_CHUNK_BYTES, head_logits

    with torch.no_grad():
        h_s = trained_hidden_states(model, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        t_dev = next(teacher.parameters()).device
        h_t = trained_hidden_states(teacher, input_ids=input_ids.to(t_dev), attention_mask=attention_mask.to(t_dev),
                                    labels=labels.to(t_dev))
        _, s_head, s_post = decoder_and_head(model)
        _, t_head, t_post = decoder_and_head(teacher)
        vocab = (model.get_base_model() if hasattr(model, "get_base_model") else model).config.get_text_config().vocab_size
        step = max(1, (chunk_bytes or LOGITS_CHUNK_BYTES) // (4 * vocab))
        total = torch.zeros((), dtype=torch.float64, device=h_s.device)
        for i in range(0, h_s.shape[0], step):
            log_s = F.log_softmax(head_logits(s_head, _to_head(s_head, h_s[i:i + step]), s_post), -1)
            log_t = F.log_softmax(head_logits(t_head, _to_head(t_head, h_t[i:i + step]), t_post), -1).to(log_s.device)
            total += F.kl_div(log_s, log_t, reduction="sum", log_target=True).double().to(total.device)
    return total


def teacher_problems(tokenizer, student: str, teacher: str, *, chat_template: str | None = None,
                     trust_remote_code: bool = False) -> list[str]:
    """Why `teacher` cannot score the tokens of `student` (whose tokenizer, with the run's chat
    template, is `tokenizer`): the same vocabulary, token for token, and output layers of the same
    size are needed. Read from the tokenizers and config.json files, no weights."""
    from transformers import AutoConfig

    from finetune.models.loading import load_tokenizer, model_ref

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


def load_teacher_model(name: str, *, adapter: str | None = None, dtype: str = "auto",
                       quant_kwargs: dict[str, Any] | None = None, device_map: Any = None,
                       trust_remote_code: bool = False, attn_implementation: str | None = None):
    """A teacher, frozen and in evaluation mode, with `adapter` (a LoRA directory) applied; in 4-bit
    when `quant_kwargs` (finetune.models.loading.quantization_config's settings) are given. Its forward
    with labels returns its hidden states at the trained positions (install_teacher_hidden)."""
    from finetune.models.loading import load_base_model

    teacher = load_base_model(name, dtype=dtype, quantize="4bit" if quant_kwargs is not None else None,
                              quant_kwargs=quant_kwargs, device_map=device_map, trust_remote_code=trust_remote_code,
                              attn_implementation=attn_implementation)
    install_teacher_hidden(teacher)
    if adapter:
        from peft import PeftModel

        teacher = PeftModel.from_pretrained(teacher, adapter, is_trainable=False)
    problem = head_problem(teacher)
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
