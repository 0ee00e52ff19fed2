"""Length in words (default) or in tokens of a local tokenizer, and trimming to a budget."""

from __future__ import annotations

import os
import re
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


def distribution(values: list[int]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    v = sorted(values)

    def pct(p: float) -> int:
        return v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))]

    return {
        "n": len(v),
        "min": v[0],
        "mean": round(sum(v) / len(v), 1),
        "p50": pct(0.5),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "max": v[-1],
    }
