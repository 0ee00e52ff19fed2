"""Where inputs are read from and outputs written to: local paths, or fsspec URLs.

A source or output written as `s3://bucket/dir`, `gs://...`, `file:///shared/dir` or `memory://x`
goes through fsspec (s3 and gs need their filesystem package: s3fs, gcsfs); anything else is a
local path and keeps using the standard library, so a local build behaves exactly as before.
"""

from __future__ import annotations

import glob as globlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

__all__ = [
    "discover",
    "exists",
    "is_url",
    "join",
    "listdir",
    "open_read",
    "open_write",
    "os_reason",
    "read_bytes",
    "read_head",
    "remove",
    "url_fs",
    "write_bytes",
]


def is_url(path: str) -> bool:
    return "://" in str(path)


def url_fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path without protocol) of a URL."""
    try:
        import fsspec
    except ImportError as err:  # fsspec comes with `datasets`; a trimmed install may lack it
        raise ImportError(f"{url}: reading URLs needs fsspec: pip install fsspec") from err
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        # e.g. s3:// without s3fs: fsspec names the package to install
        raise ImportError(f"{url}: {err}") from err


def read_bytes(path: str) -> bytes:
    if not is_url(path):
        with open(path, "rb") as fh:
            return fh.read()
    fs, p = url_fs(path)
    return fs.cat_file(p)


def read_head(path: str, n: int) -> bytes:
    if not is_url(path):
        with open(path, "rb") as fh:
            return fh.read(n)
    fs, p = url_fs(path)
    with fs.open(p, "rb") as fh:
        return fh.read(n)


@contextmanager
def open_read(path: str) -> Iterator[IO[bytes]]:
    """A binary file object (iterable by lines) for a path or URL."""
    if not is_url(path):
        with open(path, "rb") as fh:
            yield fh
        return
    fs, p = url_fs(path)
    with fs.open(p, "rb") as fh:
        yield fh


def exists(spec: str) -> bool:
    """A file, a directory or at least one glob match."""
    if not is_url(spec):
        return os.path.exists(spec) or bool(globlib.glob(spec, recursive=True))
    fs, p = url_fs(spec)
    if "*" in p or "?" in p or "[" in p:
        return bool(fs.glob(p))
    return fs.exists(p)


def _walk_order(rel: str) -> list[tuple[int, str]]:
    """The order `os.walk` with sorted names gives: a directory's files, then its subdirectories."""
    parts = rel.split("/")
    return [(1, d) for d in parts[:-1]] + [(0, parts[-1])]


def discover(spec: str) -> tuple[list[tuple[str, str]], int]:
    """`readers.discover` for a URL: (url, root) pairs in the same order, and hidden files skipped.

    Results keep the spelling of `spec` (`memory://shop/pages/a.html`, not fsspec's stripped
    `/shop/pages/a.html`), so sources and join keys read the same whatever the filesystem.
    """
    fs, p = url_fs(spec)
    if "*" in p or "?" in p or "[" in p:
        base_url = spec[: spec.index("*")].rsplit("/", 1)[0] if "*" in spec else spec.rsplit("/", 1)[0]
        base = fs._strip_protocol(base_url)
        matches = sorted(m for m in fs.glob(p) if fs.isfile(m))
        return [(base_url + m[len(base) :], base_url) for m in matches], 0
    if fs.isfile(p):
        return [(spec, spec.rsplit("/", 1)[0])], 0
    root = spec.rstrip("/")
    base = p.rstrip("/")
    out, hidden = [], 0
    for f in fs.find(p):
        rel = f[len(base) :].lstrip("/")
        *dirs, name = rel.split("/")
        if any(d.startswith(".") for d in dirs):
            continue  # a hidden directory is not walked, as locally
        if name.startswith("."):
            hidden += 1
            continue
        out.append(rel)
    return [(f"{root}/{rel}", root) for rel in sorted(out, key=_walk_order)], hidden


def join(base: str, *names: str) -> str:
    if not is_url(base):
        return os.path.join(base, *names)
    return "/".join([base.rstrip("/"), *names])


@contextmanager
def open_write(path: str) -> Iterator[IO[bytes]]:
    """A new file, binary: atomic on a local path (temp file renamed into place when the block
    ends); an object store makes an object visible only once its upload completes."""
    if not is_url(path):
        from kitcore.io import atomic_write

        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with atomic_write(path, "wb") as fh:
            yield fh  # type: ignore[misc]
        return
    fs, p = url_fs(path)
    parent = p.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(p, "wb") as fh:
        yield fh


def write_bytes(path: str, data: bytes) -> None:
    with open_write(path) as fh:
        fh.write(data)


def listdir(path: str) -> list[str]:
    """Names in a directory (empty when it does not exist)."""
    if not is_url(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, p = url_fs(path)
    if not fs.isdir(p):
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(p, detail=False))


def remove(path: str) -> None:
    if not is_url(path):
        if os.path.isfile(path):
            os.remove(path)
        return
    fs, p = url_fs(path)
    if fs.isfile(p):
        fs.rm(p)


def os_reason(err: OSError) -> str:
    """The short reason of a read error: `strerror` locally; fsspec's errors often carry none."""
    return err.strerror or type(err).__name__
