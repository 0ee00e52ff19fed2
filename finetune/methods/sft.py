"""`method: sft`: supervised fine-tuning on chat JSONL, the loss on the assistant's tokens (the chat
template's masks). Implementation: finetune.methods.trainer (transformers' Trainer with the kit's
sampler, and the kit's chunked loss installed on the model)."""

from __future__ import annotations

from finetune.methods.registry import Method

SFT = Method(
    name="sft",
    description="supervised on chat JSONL",
    impl="finetune.methods.trainer",
    data="chat",
    packing=True,
    token_loss=True,
)
METHODS = (SFT,)
