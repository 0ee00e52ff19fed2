"""The training methods: one module per method, each declaring one record (registry.Method) that
the rest of the kit asks instead of testing names, with its implementation beside it.

    registry.py        the Method record and the registry (names -> records)
    sft.py             supervised fine-tuning on chat JSONL              impl: trainer.py
    dpo.py             DPO on preference pairs (TRL's DPOTrainer)        impl: preference.py
    kto.py             KTO on unpaired examples (TRL's KTOTrainer)       impl: preference.py
    reference_free.py  ORPO and SimPO (TRL's losses, no reference)       impl: preference.py
    distill.py         logit distillation from a teacher                 impl: distill_trainer.py
    grpo.py            online RL from rewards (TRL's GRPOTrainer)        impl: grpo_trainer.py
                       (its reward functions: rewards.py)
"""

from finetune.methods.registry import BUILTIN, Method, get, methods, names, register

__all__ = ["BUILTIN", "Method", "get", "methods", "names", "register"]
