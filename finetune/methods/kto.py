"""`method: kto`: Kahneman-Tversky Optimization on unpaired examples (a pair is read as one desirable
and one undesirable example), TRL's KTOTrainer fed by the kit's data cache (implementation:
finetune.methods.preference)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from finetune.methods.registry import Method
from finetune.section import Section

__all__ = ["KTOSection", "KTO", "METHODS"]


class KTOSection(Section):
    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference (KTO's beta).")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto", description="kto (with the KL estimate from mismatched pairs of each batch) or apo_zero_unpaired.")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of desirable examples' losses.")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of undesirable examples' losses.")


KTO = Method(
    name="kto",
    description="unpaired examples (prompt, completion, label) or pairs, read as a desirable and an undesirable "
    "example, against a reference (the starting model)",
    impl="finetune.methods.preference",
    data="unpaired",
    section=KTOSection,
    reference=True,
    own_head="TRL's trainer scores through its own chunked LM head",
    fused_lm_head=True,
    export_drops=("ref",),
)
METHODS = (KTO,)
