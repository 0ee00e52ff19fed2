"""Errors a user can fix; the CLI prints them without a traceback."""

from __future__ import annotations

from finetune.chat_template import ChatFormatError
from finetune.config import ConfigError
from finetune.data import DataError


class AdapterError(ValueError):
    """A directory is not a usable adapter, or its base model cannot be found."""


class RunDirError(RuntimeError):
    """The output directory holds a run and the user did not say what to do with it."""


USER_ERRORS = (ConfigError, DataError, ChatFormatError, AdapterError, RunDirError, FileNotFoundError)
