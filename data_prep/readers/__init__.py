"""Readers: files -> records. Format by extension, then by content; `format` overrides."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from data_prep import storage

EXTENSIONS = {
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    ".shtml": "html",
    ".txt": "text",
    ".md": "text",
    ".markdown": "text",
    ".rst": "text",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".xlsx": "xlsx",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}


def sniff_format(path: str) -> str:
    """Format of a file whose extension says nothing, from its first bytes."""
    try:
        head = storage.read_head(path, 4096)
    except OSError:
        return "text"
    if head.startswith(b"PK\x03\x04"):
        return "xlsx"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in stripped[:1024]:
        return "html"
    if stripped.startswith(b"["):
        return "json"
    if stripped.startswith(b"{"):
        return "jsonl"
    return "text"


def detect_format(path: str, override: str = "auto") -> str:
    if override != "auto":
        return override
    return EXTENSIONS.get(Path(path).suffix.lower()) or sniff_format(path)


def discover(spec: str) -> tuple[list[tuple[str, str]], int]:
    """(path, root) pairs of a file, directory (recursive, sorted) or glob; and hidden files skipped.

    `root` is what a join key may be relative to (the directory given, or the file's parent).
    A URL (`s3://`, `file://`, `memory://` ...) is listed through fsspec, in the same order.
    """
    if storage.is_url(spec):
        return storage.discover(spec)
    if os.path.isfile(spec):
        return [(spec, os.path.dirname(spec))], 0
    if os.path.isdir(spec):
        out, hidden = [], 0
        for dirpath, dirnames, filenames in os.walk(spec):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    hidden += 1  # .DS_Store and editor swap files are not data
                    continue
                out.append((os.path.join(dirpath, name), spec))
        return out, hidden
    matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    root = spec.split("*", 1)[0].rsplit("/", 1)[0] if "*" in spec else os.path.dirname(spec)
    return [(p, root) for p in matches], 0
