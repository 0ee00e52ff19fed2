"""Errors a user can fix; the CLI prints them without a traceback."""

from __future__ import annotations

from finetune.config import ConfigError
from finetune.data.chat_template import ChatFormatError
from finetune.data.files import DataError
from kitcore.integrity import IntegrityError


class AdapterError(ValueError):
    """A directory is not a usable adapter, or its base model cannot be found."""


class RunDirError(RuntimeError):
    """The output directory holds a run and the user did not say what to do with it."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, file-size limit)."""


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGUSR1 after saving a checkpoint; the CLI exits with 75."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"pre-empted at step {step}")


class UnsafeCheckpointError(ValueError):
    """A pickle-based weights file holds more than tensors; it is not loaded."""


class ExportError(ValueError):
    """A model or adapter cannot be exported as asked (architecture, quantization, tokenizer, layout)."""


class GenerateError(ValueError):
    """`finetune generate` cannot run as asked (its settings, or the output it would continue)."""


USER_ERRORS = (ConfigError, DataError, ChatFormatError, AdapterError, RunDirError, FileNotFoundError,
               CheckpointWriteError, UnsafeCheckpointError, ExportError, GenerateError, IntegrityError)
