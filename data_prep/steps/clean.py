"""Unicode repair (ftfy) and whitespace normalization."""

from __future__ import annotations

import re

import ftfy

_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")
# zero-width characters survive ftfy and break exact dedup of otherwise equal strings
_ZERO_WIDTH = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")


def _line(line: str) -> str:
    # leading indentation is kept: it is meaning in code and nested lists
    body = line.lstrip(" \t")
    return line[: len(line) - len(body)] + _SPACES.sub(" ", body).rstrip()


def clean_text(text: str, fix_unicode: bool = True) -> str:
    """Repair mojibake and HTML entities, then normalize whitespace, keeping paragraph breaks.

    Quotes and full-width characters are left as written: ftfy's uncurl/width fixes change
    what an annotator typed (and CJK text), which is not a repair.
    """
    if fix_unicode:
        text = ftfy.fix_text(text, uncurl_quotes=False, fix_character_width=False, normalization="NFC")
    text = _ZERO_WIDTH.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [_line(line) for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
