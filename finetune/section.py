"""The base of every config section, and the checks that sections of several stages share.

A leaf module (pydantic only): the training methods declare their sections with it
(finetune.methods), and finetune.config assembles them into the run's schema.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

__all__ = ["Section", "model_present"]


class Section(BaseModel):
    """Base of every config section (the sweep's too)."""

    # An unknown key is an error, never ignored: a typo like `lora.rank` would otherwise train r=8.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def model_present(v: str) -> str:
    """A model named by a local path must exist; a hub id (org/name) is looked up when it loads."""
    looks_local = v.startswith((".", "/", "~")) or os.sep in v.rstrip(os.sep).split(os.sep, 1)[-1]
    if looks_local and not Path(v).expanduser().is_dir():
        raise ValueError(f"model directory not found: {v}")
    return v
