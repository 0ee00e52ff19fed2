"""Quality filters: Gopher-style checks for long scraped text, per-field checks for chat pairs.

Each filter returns None to keep or a reason string to drop (datatrove's convention). The Gopher
rules (Rae et al. 2021, table A1) are hand-written: datatrove, which has them, is not a
dependency of this kit, and they are a few lines of counting.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from data_prep.record import Message, message_text

_WORD = re.compile(r"\S+")
_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})


@dataclass
class GopherThresholds:
    # The defaults live here only; recipe.py's QualityConfig reads them.
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.6
    min_stop_words: int = 2
    max_duplicate_line_fraction: float = 0.3
    max_top_2gram_char_fraction: float = 0.2
    max_dup_5gram_char_fraction: float = 0.15


def _dup_ngram_char_fraction(words: list[str], n: int) -> float:
    """Share of characters covered by word n-grams that occur more than once."""
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = [False] * len(words)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            for j in range(i, i + n):
                covered[j] = True
    total = sum(len(w) for w in words)
    return sum(len(w) for w, c in zip(words, covered) if c) / max(total, 1)


def gopher_quality(text: str, t: GopherThresholds) -> str | None:
    """Keep (None) or the first failing Gopher rule as `gopher_<rule>`.

    Texts under `min_words` are not judged: the rules are statistics that mean nothing on a
    two-line answer, which the chat checks cover instead.
    """
    words = _WORD.findall(text)
    n = len(words)
    if n < t.min_words:
        return None
    if n > t.max_words:
        return f"gopher_too_many_words: {n} > {t.max_words}"
    mean_len = sum(len(w) for w in words) / n
    if not t.min_mean_word_length <= mean_len <= t.max_mean_word_length:
        return f"gopher_mean_word_length: {mean_len:.1f}"
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    if symbols / n > t.max_symbol_word_ratio:
        return f"gopher_symbol_ratio: {symbols / n:.2f}"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines:
        bullets = sum(ln.lstrip().startswith(("•", "-", "*", "·")) for ln in lines)
        if bullets / len(lines) > t.max_bullet_lines_ratio:
            return f"gopher_bullet_lines: {bullets / len(lines):.2f}"
        ellipsis = sum(ln.rstrip().endswith(("...", "\u2026")) for ln in lines)
        if ellipsis / len(lines) > t.max_ellipsis_lines_ratio:
            return f"gopher_ellipsis_lines: {ellipsis / len(lines):.2f}"
        dup_lines = len(lines) - len(set(lines))
        if dup_lines / len(lines) > t.max_duplicate_line_fraction:
            return f"gopher_duplicate_lines: {dup_lines / len(lines):.2f}"
    alpha = sum(any(c.isalpha() for c in w) for w in words)
    if alpha / n < t.min_alpha_words_ratio:
        return f"gopher_alpha_words: {alpha / n:.2f}"
    lower = [w.lower().strip(".,;:!?\"'()") for w in words]
    if sum(w in _STOP_WORDS for w in lower) < t.min_stop_words:
        return "gopher_stop_words"
    if n >= 2:
        bigrams = Counter(zip(lower, lower[1:]))
        ((top, count),) = bigrams.most_common(1)
        frac = count * (len(top[0]) + len(top[1])) / max(sum(len(w) for w in lower), 1)
        if count > 1 and frac > t.max_top_2gram_char_fraction:
            return f"gopher_top_2gram: {frac:.2f}"
    frac5 = _dup_ngram_char_fraction(lower, 5)
    if frac5 > t.max_dup_5gram_char_fraction:
        return f"gopher_dup_5gram: {frac5:.2f}"
    return None


@dataclass
class ChatThresholds:
    min_user_chars: int = 1
    min_assistant_chars: int = 1
    max_message_words: int = 8192


def chat_checks(messages: list[Message], t: ChatThresholds, *, require_assistant: bool = True) -> str | None:
    """Per-field checks of one chat example: empty, too short, too long, no assistant turn (a prompt,
    `require_assistant=False`, needs none)."""
    if not messages:
        return "empty_messages"
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        return "no_assistant_message"
    if require_assistant and all(m.get("weight", 1) == 0 for m in messages if m["role"] == "assistant"):
        return "no_trained_assistant_message: every assistant turn has weight 0"
    if not any(m["role"] == "user" for m in messages):
        return "no_user_message"
    for i, m in enumerate(messages):
        # An assistant turn that calls tools says its calls too (its text may be short or null);
        # the calls themselves are checked by the schema.
        content = message_text(m) if m.get("tool_calls") else m.get("content") or ""
        if not content.strip():
            return f"empty_{m['role']}: message {i}"
        minimum = {"user": t.min_user_chars, "assistant": t.min_assistant_chars}.get(m["role"], 0)
        if len(content.strip()) < minimum:
            return f"too_short_{m['role']}: {len(content.strip())} < {minimum} chars"
        words = len(content.split())
        if words > t.max_message_words:
            return f"too_long_{m['role']}: {words} > {t.max_message_words} words"
    return None
