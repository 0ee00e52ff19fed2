"""Bytes -> str with encoding detection; binary and empty files become a reason, never an exception."""

from __future__ import annotations

import codecs
import re

from charset_normalizer import from_bytes

_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_:.-]+)""", re.I)


class DecodeError(ValueError):
    """`args[0]` is the reject reason (`empty_file`, `binary_file`, `undecodable`)."""


def detect_encoding(data: bytes) -> str:
    """Encoding name for `data`; UTF-8 first because it is both the common case and the cheap one."""
    if not data.strip():
        raise DecodeError("empty_file")
    for bom, name in _BOMS:
        if data.startswith(bom):
            return name
    # NUL bytes never occur in text of a BOM-less 8-bit or UTF-8 file: images, archives, PDFs
    if b"\x00" in data[:8192]:
        raise DecodeError("binary_file")
    try:
        data.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError as err:
        # a sample cut in the middle of a multi-byte character is still UTF-8
        if err.start >= len(data) - 3 and err.reason == "unexpected end of data":
            return "utf-8"
    declared = _declared_charset(data[:4096])
    if declared:
        try:
            data.decode(declared)
            return declared
        except (UnicodeDecodeError, LookupError):
            pass  # a wrong declaration is common; fall through to detection
    results = from_bytes(data[:200_000])
    best = results.best()
    if best is None:
        raise DecodeError("undecodable")
    # Short Western texts score the same under cp1250/cp1252/cp1257; browsers (WHATWG) default
    # an undeclared page to windows-1252, so among equally plausible candidates take that one.
    for m in results:
        if m.chaos <= best.chaos + 0.005 and m.coherence >= best.coherence - 0.05:
            if "cp1252" in m.could_be_from_charset:
                return "cp1252"
    return best.encoding


def _declared_charset(head: bytes) -> str | None:
    m = _META_CHARSET.search(head)
    return m.group(1).decode("ascii").lower() if m else None


def decode_bytes(data: bytes) -> str:
    enc = detect_encoding(data)
    try:
        text = data.decode(enc)
    except (UnicodeDecodeError, LookupError) as err:
        raise DecodeError(f"undecodable: {enc}") from err
    controls = sum(1 for c in text[:4096] if ord(c) < 32 and c not in "\n\r\t\f")
    if controls > 0.05 * min(len(text), 4096):
        raise DecodeError("binary_file")
    return text
