"""`method: orpo` and `method: simpo`: preference tuning without a reference model, TRL's losses on
the kit's reference-free trainer (implementation: finetune.methods.preference)."""

from __future__ import annotations

from pydantic import Field

from finetune.methods.registry import Method
from finetune.section import Section

__all__ = ["ORPOSection", "SimPOSection", "ORPO", "SIMPO", "METHODS"]


class ORPOSection(Section):
    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio term against the chosen reply's NLL "
                        "(ORPO's lambda; TRL's ORPOConfig.beta).")


class SimPOSection(Section):
    beta: float = Field(2.0, gt=0, description="Scale of the length-normalised reward (SimPO's beta).")
    gamma: float = Field(0.5, ge=0, description="Target reward margin (SimPO's gamma; TRL's simpo_gamma).")
    sft_weight: float = Field(0.0, ge=0, description="Weight of the chosen reply's NLL added to the loss "
                              "(TRL's cpo_alpha; 0 is SimPO as published).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative (label-smoothed) SimPO.")


_HEAD = "TRL's trainer scores through its own chunked LM head"
ORPO = Method(name="orpo", description="preference pairs, no reference (odds ratio + NLL)",
              impl="finetune.methods.preference", data="pairs", section=ORPOSection, own_head=_HEAD,
              fused_lm_head=True)
SIMPO = Method(name="simpo", description="preference pairs, no reference (length-normalised margin)",
               impl="finetune.methods.preference", data="pairs", section=SimPOSection, own_head=_HEAD,
               fused_lm_head=True)
METHODS = (ORPO, SIMPO)
