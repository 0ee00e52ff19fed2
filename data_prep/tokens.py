"""Length in words (default) or in tokens of a local tokenizer, and trimming to a budget."""

from __future__ import annotations

import bisect
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

_WORD = re.compile(r"\S+")


class Lengths:
    """`count(text)` and `trim(text, budget)` in one unit: "words" or "tokens"."""

    def __init__(self, tokenizer_dir: str | os.PathLike | None = None) -> None:
        self.tok = None
        self.unit = "words"
        if tokenizer_dir is not None:
            self.tok = _load_tokenizer(Path(tokenizer_dir))
            self.unit = "tokens"

    def count(self, text: str) -> int:
        if self.tok is None:
            return len(_WORD.findall(text))
        return len(self.tok.encode(text, add_special_tokens=False).ids)

    def trim(self, text: str, budget: int) -> str:
        """The longest prefix of `text` within `budget`, cut at a word/token boundary."""
        if self.tok is None:
            for i, m in enumerate(_WORD.finditer(text), start=1):
                if i == budget:
                    return text[: m.end()]
            return text
        enc = self.tok.encode(text, add_special_tokens=False)
        if len(enc.ids) <= budget:
            return text
        return text[: enc.offsets[budget - 1][1]].rstrip()


def _load_tokenizer(path: Path):
    """A `tokenizers.Tokenizer` from a local dir (tokenizer.json); never touches the network."""
    from tokenizers import Tokenizer

    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"{path}: no tokenizer.json; save one with PreTrainedTokenizerFast.save_pretrained(dir)"
        )
    return Tokenizer.from_file(str(file))


def distribution(values) -> dict[str, float]:
    """n, min, mean, p50/p90/p99 and max of integer lengths."""
    return distribution_of_counts(Counter(values))


def distribution_of_counts(counts: Mapping[int, int]) -> dict[str, float]:
    """`distribution` from a histogram (length -> how many): what shards written on different
    workers can each count and add up, with the same figures as on the whole list."""
    n = sum(counts.values())
    if not n:
        return {"n": 0}
    items = sorted((int(k), int(c)) for k, c in counts.items() if c)
    cum, total = [], 0
    for _, c in items:
        total += c
        cum.append(total)

    def at(i: int) -> int:  # the i-th smallest value (0-based)
        return items[bisect.bisect_right(cum, i)][0]

    def pct(p: float) -> int:
        return at(min(n - 1, int(p * (n - 1) + 0.5)))

    return {
        "n": n,
        "min": items[0][0],
        "mean": round(sum(v * c for v, c in items) / n, 1),
        "p50": pct(0.5),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "max": items[-1][0],
    }
