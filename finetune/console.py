"""Small helpers shared by the commands: rank-0 output, and atomic writes (from kitcore.io)."""

from __future__ import annotations

import sys

# Re-exported: train, evaluate, inference and sweep import it from here.
from kitcore.io import atomic_write_text

__all__ = ["atomic_write_text", "is_main_process", "rank0_print"]


def is_main_process() -> bool:
    """Global rank 0 (what the launcher announced; see kitcore.runtime)."""
    from kitcore.runtime import launch_env

    return launch_env()[0] == 0


def rank0_print(*args, file=None, **kwargs) -> None:
    """User-facing output, once per job (not once per rank)."""
    if is_main_process():
        print(*args, file=file or sys.stdout, flush=True, **kwargs)
