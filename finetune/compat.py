"""Where two releases inside the supported ranges (pyproject.toml) differ, the kit asks here.

Each function names the releases it bridges, so that it can go when the older one leaves the range.
"""

from __future__ import annotations

import dataclasses

__all__ = ["checkpointing_off"]

# transformers 5.23 renamed TrainingArguments' `gradient_checkpointing` to `activation_checkpointing`
# (the old name stays as a deprecated alias until v6); 5.17 knows only the old name and refuses the new
# one as an unexpected keyword. TRL's configs redeclare `gradient_checkpointing` with default True.
_CHECKPOINTING_FIELDS = ("activation_checkpointing", "gradient_checkpointing")


def checkpointing_off(args_class: type) -> dict[str, bool]:
    """Keyword arguments that leave the Trainer's own activation checkpointing off, for every name of
    that switch `args_class` (TrainingArguments or a TRL config) has: the kit enables checkpointing on
    the model itself, where PEFT needs it."""
    names = {f.name for f in dataclasses.fields(args_class)}
    return {name: False for name in _CHECKPOINTING_FIELDS if name in names}
