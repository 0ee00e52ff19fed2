"""`method: dpo`: Direct Preference Optimization on preference pairs, TRL's DPOTrainer fed by the
kit's data cache (implementation: finetune.methods.preference)."""

from __future__ import annotations

from pydantic import Field, field_validator

from finetune.methods.registry import Method
from finetune.section import Section

__all__ = ["DPOSection", "DPO_LOSS_TYPES", "DPO", "METHODS"]

# TRL's DPO loss types (DPOConfig.loss_type), checked here so that a typo fails before anything loads.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


class DPOSection(Section):
    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference (DPO's beta).")
    loss_type: list[str] | str = Field(
        "sigmoid", description="TRL's DPO loss: sigmoid (DPO), ipo, hinge, robust, apo_zero, ...; a list combines "
        "several (with loss_weights).")
    loss_weights: list[float] | None = Field(None, description="Weights of the loss_type list.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Robust DPO / EXO label smoothing.")
    precompute_ref_log_probs: bool = Field(
        False, description="Score the training data under the reference once before training, instead of a "
        "reference forward pass per step (full fine-tuning: no reference model in memory while training).")

    @field_validator("loss_type")
    @classmethod
    def _known_loss(cls, v: list[str] | str) -> list[str] | str:
        bad = [x for x in ([v] if isinstance(v, str) else v) if x not in DPO_LOSS_TYPES]
        if bad:
            raise ValueError(f"unknown DPO loss {', '.join(map(repr, bad))}; one of {', '.join(DPO_LOSS_TYPES)}")
        return v


DPO = Method(
    name="dpo",
    description="preference pairs (prompt/chosen/rejected, OpenAI's preference format, or chosen/rejected "
    "conversations), against a reference (the starting model)",
    impl="finetune.methods.preference",
    data="pairs",
    section=DPOSection,
    reference=True,
    reference_off_key="dpo.precompute_ref_log_probs",
    own_head="TRL's trainer scores through its own chunked LM head",
    fused_lm_head=True,
    export_drops=("ref",),  # PEFT saves TRL's frozen copy of the starting adapter as a subdirectory
)
METHODS = (DPO,)
