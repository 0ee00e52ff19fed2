"""The LM-head loss in chunks, at trained positions only: no [batch, seq, vocab] tensor ever exists.

At a real vocabulary the logits dominate a LoRA step's memory (batch 8 x 4,096 tokens x 128,256
in fp32: 16.8 GB, and as much again for their gradient). Here the final hidden states of the
positions that are trained (labels != -100; a fraction of all positions in chat data, where only
assistant turns are trained) go through the LM head a chunk at a time: each chunk's fp32 logits
give its summed NLL and are freed, and backward recomputes them chunk by chunk (activation
checkpointing per chunk). Peak extra memory: one chunk of logits and their gradient
(LOGITS_CHUNK_BYTES each). Pure PyTorch, so it runs on CPU and on any GPU.

`install_chunked_loss(model)` makes the model's own forward compute its loss this way whenever it is
given labels, so the call still goes through DDP's and DeepSpeed's wrappers (their gradient hooks
need the wrapper's forward) and the Trainer's token-weighted gradient accumulation
(`num_items_in_batch`) applies unchanged; without labels (generation) the original forward runs.
Evaluation scores with the same function (finetune.eval.evaluation.scored_token_sums).
"""

from __future__ import annotations

import functools
import types
from typing import Any

__all__ = ["LOGITS_CHUNK_BYTES", "lm_parts", "head_logits", "chunked_nll", "install_chunked_loss"]

# At most this many bytes of fp32 logits exist at once (256 MiB: 512 positions at a 128k vocabulary).
LOGITS_CHUNK_BYTES = 256 << 20


def lm_parts(model):
    """(decoder, head, (scale, softcap)) of a causal LM or a PEFT model around one: the network up to
    the final hidden states, the output projection, and the logit post-processing some
    architectures apply in forward (Cohere/Granite-style scaling, Gemma-2 soft-capping). None when
    the model does not split this way."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head, _logit_post(getattr(base, "config", None))


def _logit_post(cfg) -> tuple[float, float | None]:
    if cfg is None:
        return 1.0, None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    scale = getattr(cfg, "logit_scale", None)
    if scale is None and getattr(cfg, "logits_scaling", None):
        scale = 1.0 / cfg.logits_scaling
    return float(scale) if scale else 1.0, getattr(cfg, "final_logit_softcapping", None)


def head_logits(head, h, post: tuple[float, float | None] = (1.0, None)):
    """fp32 logits of the hidden states `h` [N, H] through `head`, with the architecture's logit
    scaling and soft-capping (`post`, from lm_parts)."""
    import torch

    scale, cap = post
    z = head(h).float()
    if scale != 1.0:
        z = z * scale
    if cap:
        z = cap * torch.tanh(z / cap)
    return z


def chunked_nll(h, head, targets, *, vocab: int, post: tuple[float, float | None] = (1.0, None),
                chunk_bytes: int = LOGITS_CHUNK_BYTES):
    """(sum of NLL, argmax hits) of `targets` [N] given the hidden states `h` [N, H] and the LM head.

    Each chunk runs under activation checkpointing: its logits are freed after its loss, and
    recomputed in backward when its gradient is needed, so one chunk of logits (and of their
    gradient) exists at a time. Autograd does the rest, so a trained head (modules_to_save), a LoRA
    on the head, a bias and soft-capping all get their gradients as in the unchunked path."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def chunk_nll(hc, tc):
        z = head_logits(head, hc, post)
        # The hits come from the same logits: no second pass through the head for them.
        return F.cross_entropy(z, tc, reduction="sum"), (z.argmax(-1) == tc).sum().float()

    step = max(1, chunk_bytes // (4 * vocab))
    w = next(head.parameters(), None)
    if w is not None and w.device != h.device:  # a model split over devices ends on another one
        h, targets = h.to(w.device), targets.to(w.device)
    nll = torch.zeros((), dtype=torch.float32, device=h.device)
    hits = torch.zeros((), dtype=torch.float32, device=h.device)
    grad = torch.is_grad_enabled() and h.requires_grad
    for i in range(0, h.shape[0], step):
        hc, tc = h[i:i + step], targets[i:i + step]
        c_nll, c_hits = checkpoint(chunk_nll, hc, tc, use_reentrant=False) if grad else chunk_nll(hc, tc)
        nll = nll + c_nll
        hits += c_hits.detach()
    return nll, hits


def install_chunked_loss(model, *, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> bool:
    """Make `model(..., labels=...)` compute its loss with `chunked_nll` at trained positions (and
    return no logits). Install on the transformers model before PEFT wraps it. Returns False (and
    changes nothing) for a model that does not split into decoder + LM head."""
    if lm_parts(model) is None:
        return False
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = model.forward

    # The original signature stays visible: the Trainer decides from it whether to pass
    # num_items_in_batch, and generate() validates its kwargs against it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return original(*args, **kwargs)
        decoder, head, post = lm_parts(self)  # looked up per call: PEFT and DeepSpeed wrap them later
        kwargs["use_cache"] = False
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("skip_logits", None)  # the Trainer's eval flag for Liger's loss: this one never has logits
        hidden = decoder(*args, **kwargs)[0]  # [B, T, H]
        target = labels[:, 1:].to(hidden.device)
        scored = target != -100
        h = hidden[:, :-1][scored]  # [N, H]: only the positions that are trained
        nll, _ = chunked_nll(h, head, target[scored], vocab=self.config.get_text_config().vocab_size,
                             post=post, chunk_bytes=chunk_bytes)
        n = num_items_in_batch if num_items_in_batch is not None else scored.sum().clamp(min=1)
        return CausalLMOutputWithPast(loss=nll / n, logits=None)

    model.forward = types.MethodType(forward, model)
    model._kit_chunked_loss = True
    return True


def installed(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "_kit_chunked_loss", False))
