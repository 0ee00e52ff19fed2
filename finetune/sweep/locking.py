"""The study lock: "is there budget left? then start a trial" as one step across every worker.

Optuna has no such lock (its MaxTrialsCallback counts after a trial ends, so N workers overshoot
`n_trials` by up to N - 1), hence this one: an flock on a file beside SQLite and journal files (all
workers on one host, or a shared filesystem with working locks), a session advisory lock on
PostgreSQL. It is held for milliseconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from finetune.config import ConfigError

logger = logging.getLogger(__name__)


class StudyLock:
    """Serializes "is there budget left? then start a trial" across every worker of a study."""

    def __init__(self, url: str, study_name: str):
        self.url = url
        self.key = int.from_bytes(hashlib.sha1(study_name.encode()).digest()[:8], "big", signed=True)
        self._engine = None
        self._lockfile: Path | None = None
        self._thread_lock = threading.Lock()
        # Not `<file>.lock`: Optuna's journal backend takes that name for its own symlink lock.
        if url.startswith("sqlite:///"):
            self._lockfile = Path(url.removeprefix("sqlite:///") + ".sweep-lock")
        elif url.startswith("journal://"):
            self._lockfile = Path(url.removeprefix("journal://") + ".sweep-lock")
        elif url.startswith("postgresql"):
            import sqlalchemy
            from sqlalchemy.pool import NullPool


            self._engine = sqlalchemy.create_engine(with_pg_driver(url), poolclass=NullPool)
        else:
            logger.warning("no cross-worker lock for %s: concurrent workers may start a few trials past "
                           "n_trials", url.split("://")[0])

    @contextlib.contextmanager
    def hold(self) -> Iterator[_Held]:
        """Held for the block, or until the handle's `release()` (called once the trial has started,
        inside `study.optimize`)."""
        with contextlib.ExitStack() as stack:
            self._thread_lock.acquire()
            stack.callback(self._thread_lock.release)
            if self._lockfile is not None:
                import fcntl

                self._lockfile.parent.mkdir(parents=True, exist_ok=True)
                fh = stack.enter_context(open(self._lockfile, "a"))
                fcntl.flock(fh, fcntl.LOCK_EX)
                stack.callback(fcntl.flock, fh, fcntl.LOCK_UN)
            elif self._engine is not None:
                import sqlalchemy

                conn = stack.enter_context(self._engine.connect())
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
                stack.callback(conn.execute, sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            held = _Held(stack.pop_all())
            try:
                yield held
            finally:
                held.release()


class _Held:
    def __init__(self, stack: contextlib.ExitStack):
        self._stack = stack

    def release(self) -> None:
        """Idempotent: the block's end releases only what is still held."""
        self._stack.close()


def with_pg_driver(url: str) -> str:
    """`postgresql://` names no driver; SQLAlchemy 2.1 then wants psycopg 3. Use whichever is installed."""
    if not url.startswith("postgresql://"):
        return url
    for module, scheme in (("psycopg", "postgresql+psycopg://"), ("psycopg2", "postgresql+psycopg2://")):
        if importlib.util.find_spec(module) is not None:
            return scheme + url.removeprefix("postgresql://")
    raise ConfigError("--storage", [("--storage", "PostgreSQL needs a driver: pip install psycopg2-binary "
                                     "(or psycopg[binary])")])
