"""`method: distill`: logit-level knowledge distillation. The student learns a frozen teacher's
token distributions on chat JSONL, at the positions SFT trains (implementation:
finetune.methods.distill_trainer; the teacher: finetune.models.teacher)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from finetune.methods.registry import Method
from finetune.section import Section, model_present

__all__ = ["DistillSection", "DISTILL", "METHODS"]


class DistillSection(Section):
    teacher: str | None = Field(
        None, description="method distill: the teacher, a model directory or hub id (required). It must share the "
        "student's tokenizer (the same vocabulary, token for token).")
    teacher_adapter: str | None = Field(
        None, description="A LoRA adapter directory applied to the teacher (e.g. a fine-tuned teacher's RUN/adapter).")
    temperature: float = Field(
        1.0, gt=0, description="Softmax temperature of both distributions in the divergence term (no T^2 factor, "
        "as in TRL's DistillationTrainer).")
    alpha: float = Field(
        0.5, ge=0, le=1, description="Loss = alpha x cross-entropy on the data's answers + (1 - alpha) x divergence "
        "to the teacher, both per trained (assistant) token.")
    divergence: Literal["forward", "reverse", "jsd"] = Field(
        "forward", description="forward: KL from the teacher to the student, E_teacher[log p_teacher - log p_student] "
        "(mass-covering); reverse: E_student[log p_student - log p_teacher] (mode-seeking); jsd: the generalized "
        "Jensen-Shannon divergence (jsd_beta).")
    jsd_beta: float = Field(
        0.5, gt=0, lt=1, description="divergence jsd: the teacher's weight in the mixture "
        "m = (1 - jsd_beta) p_student + jsd_beta p_teacher (TRL's beta); 0.5 is the symmetric JSD.")
    teacher_load_in_4bit: bool = Field(
        False, description="Load the teacher in 4-bit (bitsandbytes, with the quantization section's quant_type, "
        "double_quant, compute and storage dtypes): a quarter of its 16-bit weight memory.")

    @field_validator("teacher")
    @classmethod
    def _teacher_present(cls, v: str | None) -> str | None:
        return None if v is None else model_present(v)

    @field_validator("teacher_adapter")
    @classmethod
    def _teacher_adapter_exists(cls, v: str | None) -> str | None:
        if v is not None and not (Path(v) / "adapter_config.json").is_file():
            raise ValueError(f"no adapter_config.json in {v} (expected a PEFT adapter directory, e.g. RUN/adapter)")
        return v

    @field_validator("jsd_beta")
    @classmethod
    def _beta_is_jsd(cls, v: float, info: ValidationInfo) -> float:
        divergence = info.data.get("divergence", "jsd")
        if v != 0.5 and divergence != "jsd":
            raise ValueError(f"set, but distill.divergence is {divergence!r}; jsd_beta weighs the mixture of "
                             "divergence: jsd only")
        return v


def _needs_teacher(section: DistillSection, data: dict[str, Any]):
    if section.teacher is None:
        return "teacher", "method distill needs a teacher: a model directory or hub id"
    return None


def _loss_is_chunked(training: Any, data: dict[str, Any]):
    if training.loss != "chunked":
        return "loss", ("method distill always computes its loss a chunk of trained positions at a time; set "
                        "training.loss: chunked")
    return None


def _teacher(cfg: Any) -> dict[str, Any] | None:
    d = cfg.distill
    return {"model": d.teacher, "adapter": d.teacher_adapter, "load_in_4bit": d.teacher_load_in_4bit} \
        if d.teacher else None


DISTILL = Method(
    name="distill",
    description="chat JSONL, cross-entropy plus a divergence to a teacher's token distributions (the distill "
    "section)",
    impl="finetune.methods.distill_trainer",
    data="chat",
    section=DistillSection,
    packing=True,
    own_head="the distillation loss projects through both models' LM heads itself",
    path_keys=("teacher", "teacher_adapter"),
    checks={"distill": _needs_teacher, "training": _loss_is_chunked},
    teacher=_teacher,
    teacher_4bit_key="distill.teacher_load_in_4bit",
)
METHODS = (DISTILL,)
