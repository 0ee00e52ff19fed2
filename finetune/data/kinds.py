"""The kinds of training data, and what the data cache stores for each.

A training method names the kind it reads (finetune.methods); the cache, the preview and the
Trainer's columns follow from the kind, never from the method:

    chat      chat JSONL, encoded by the chat template with loss masks (input_ids, labels)
    pairs     preference pairs: a prompt, a chosen and a rejected completion
    unpaired  single completions labelled desirable or undesirable (pairs are read as one of each)
    prompts   prompts to generate from (online training from rewards), each with the columns its reward
              functions read (the prompt as JSON text, the other columns as one JSON object)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DataKind", "CHAT", "PAIRS", "UNPAIRED", "PROMPTS", "KINDS", "kind"]


@dataclass(frozen=True)
class DataKind:
    name: str
    # What the cache key records for this kind. None for chat: chat caches were keyed before kinds existed,
    # and a cache built then stays valid. The others keep the names their caches were built under.
    cache_id: str | None
    columns: tuple[str, ...]  # what a Trainer reads from the cache (the sampler also reads "length")
    chat: bool = False  # encoded by the chat template with per-token masks (else prompt + completion)
    unpaired: bool = False
    sequences_per_example: int = 1  # rows a Trainer runs per example (pairs: chosen and rejected)
    prompts: bool = False  # prompts only: the completions are generated while training


CHAT = DataKind("chat", None, ("input_ids", "labels"), chat=True)
PAIRS = DataKind("pairs", "preference", ("prompt_ids", "chosen_ids", "rejected_ids"), sequences_per_example=2)
UNPAIRED = DataKind("unpaired", "kto", ("prompt_ids", "completion_ids", "label"), unpaired=True)  # layout: not a method
PROMPTS = DataKind("prompts", "prompts", ("prompt_ids", "prompt", "columns"), prompts=True)
KINDS = {k.name: k for k in (CHAT, PAIRS, UNPAIRED, PROMPTS)}


def kind(name: str) -> DataKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown data kind {name!r} (one of {', '.join(KINDS)})") from None
