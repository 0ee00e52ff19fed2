"""`method: grpo`: online reinforcement learning from rewards a program checks (Group Relative Policy
Optimization, and its Dr. GRPO and DAPO losses), TRL's GRPOTrainer fed by the kit's data cache
(implementation: finetune.methods.grpo_trainer; reward functions: finetune.methods.rewards).

Each step samples `num_generations` completions per prompt from the policy, scores each with the
configured reward functions (weighted sum), and trains on the completions' advantages: each reward
minus its group's mean (divided by the group's std with scale_rewards: group). Batches count
completions: `training.batch_size` completions per device per micro-batch, so batch_size x ranks x
grad_accum (one optimizer step's completions) must be a multiple of `num_generations`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from finetune.methods.registry import Method
from finetune.section import Section

__all__ = ["GRPOSection", "RewardSpec", "BUILTIN_REWARDS", "GRPO", "METHODS"]

# The reward functions the kit ships (finetune.methods.rewards); any other `type` is a `module:function` path.
BUILTIN_REWARDS = ("exact_match", "regex", "json_schema", "tool_call", "length_penalty")


class RewardSpec(Section):
    """One reward function and its weight in the total reward."""

    type: str = Field(description="A built-in reward (" + ", ".join(BUILTIN_REWARDS) + ") or a Python function as "
                      "`module:function` (TRL's reward signature: prompts, completions, completion_ids, **columns -> "
                      "one float or None per completion).")
    weight: float = Field(1.0, description="Its weight in the total reward (the advantages are computed from the "
                          "weighted sum).")
    name: str | None = Field(None, description="Its name in the logs (default: the type, or the function's name).")
    column: str | None = Field(None, description="The record column holding the reference: exact_match `answer`, "
                               "tool_call `tool_calls`, json_schema a per-record schema (default none: `schema`).")
    extract: str | None = Field(None, description="exact_match: a regular expression whose first group (or whole "
                                "match) is the completion's answer; its last match counts. Default: the whole text.")
    pattern: str | None = Field(None, description="regex: the pattern the completion must contain.")
    full_match: bool = Field(False, description="regex: the whole completion (stripped) must match the pattern.")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="json_schema: the JSON schema the "
                                           "completion must satisfy (default: any JSON value parses).")
    soft_tokens: int | None = Field(None, gt=0, description="length_penalty: the last tokens before "
                                    "grpo.max_completion_length over which the penalty grows from 0 to -1 (DAPO's "
                                    "soft over-length punishment; default a quarter of max_completion_length).")
    on_error: float = Field(0.0, description="The score of a completion whose reward function raises (counted, "
                            "with the reason, in the logs; the run goes on).")

    model_config = {**Section.model_config, "populate_by_name": True}

    @field_validator("type")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in BUILTIN_REWARDS and (":" not in v or not all(v.split(":", 1))):
            raise ValueError(f"{v!r} is neither a built-in reward ({', '.join(BUILTIN_REWARDS)}) nor a "
                             "`module:function` path")
        return v

    @model_validator(mode="after")
    def _settings_of_its_type(self) -> RewardSpec:
        if self.type == "regex" and not self.pattern:
            raise ValueError("a regex reward needs `pattern`")
        if self.pattern is not None:
            import re

            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {exc}") from None
        if self.extract is not None:
            import re

            try:
                re.compile(self.extract)
            except re.error as exc:
                raise ValueError(f"extract {self.extract!r} is not a regular expression: {exc}") from None
        if self.schema_ is not None:
            import jsonschema

            try:
                jsonschema.validators.validator_for(self.schema_).check_schema(self.schema_)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"schema is not a valid JSON schema: {exc.message}") from None
        return self

    @property
    def label(self) -> str:
        return self.name or (self.type if ":" not in self.type else self.type.rsplit(":", 1)[1])


class GRPOSection(Section):
    rewards: list[RewardSpec] = Field(default_factory=list, description="The reward functions (at least one), each "
                                      "with its weight.")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(
        "dapo", description="How token losses are averaged: grpo (per completion, then over completions), dr_grpo "
        "(summed, divided by max_completion_length: Dr. GRPO), dapo (over every completion token of the optimizer "
        "step: DAPO), bnpo (over the micro-batch's completion tokens).")
    beta: float = Field(0.0, ge=0, description="KL penalty towards the reference (0: no reference at all). Under "
                        "LoRA the reference is the starting adapter (a frozen copy of its A/B weights, the base for a "
                        "fresh adapter); under full fine-tuning a second copy of the model.")
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (the group an advantage is "
                                 "relative to).")
    max_completion_length: int = Field(256, ge=1, description="The most tokens generated per completion; prompts "
                                       "that leave less room under max_length are dropped from the data.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    top_k: int = Field(0, ge=0, description="Top-k sampling of the rollouts (0: off).")
    epsilon: float = Field(0.2, gt=0, description="Clipping of the probability ratio (lower bound 1 - epsilon).")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clipping bound 1 + epsilon_high (DAPO's "
                                       "clip-higher: 0.28); default epsilon.")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the group's reward std (group), the batch's (batch), or not at "
        "all (none: Dr. GRPO's recommendation).")
    num_iterations: int = Field(1, ge=1, description="Optimizer passes over each batch of rollouts (GRPO's mu).")
    mask_truncated_completions: bool = Field(False, description="Leave completions cut at max_completion_length "
                                             "out of the loss (DAPO).")

    @model_validator(mode="after")
    def _names_unique(self) -> GRPOSection:
        labels = [r.label for r in self.rewards]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"two rewards are named {', '.join(map(repr, dup))} in the logs; give one a `name`")
        return self


def _needs_rewards(value: Any, before: dict[str, Any]):
    if not value.rewards:
        return "rewards", ("method grpo trains from rewards: list at least one, e.g. rewards: [{type: exact_match}] "
                           "(built-ins: " + ", ".join(BUILTIN_REWARDS) + ", or `module:function`)")
    return None


def _reference(cfg: Any) -> bool:
    return cfg.grpo.beta > 0


def _completion_room(cfg: Any) -> int:
    return cfg.grpo.max_completion_length


def _rollout_groups(cfg: Any) -> tuple[int, int]:
    return cfg.grpo.num_generations, cfg.grpo.num_iterations


GRPO = Method(
    name="grpo",
    description="prompts (chat records ending on the user's turn, or with a reference answer as the last assistant "
    "turn) and reward functions: completions are generated and scored while training",
    impl="finetune.methods.grpo_trainer",
    data="prompts",
    section=GRPOSection,
    reference_when=_reference,
    export_drops=("ref",),  # with beta > 0 under LoRA, PEFT saves TRL's frozen copy of the starting adapter
    checks={"grpo": _needs_rewards},
    completion_room=_completion_room,
    rollout_groups=_rollout_groups,
    # TRL's GRPOTrainer scores the completions through its fused LM head (add_fused_lm_head).
    fused_lm_head=True,
)
METHODS = (GRPO,)
