"""The small record that flows through every step, and the reject that keeps what was dropped."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]


@dataclass
class Record:
    """One chat example on its way to train/val/test (or to rejects).

    `group` ties records that must share a split (same source document); `context_key`
    names the shared context (a joined page, an inline passage) so that dedup compares
    examples on their own question/answer, not on the page they all quote.
    """

    source: str
    locator: str
    messages: list[Message] = field(default_factory=list)
    group: str = ""
    context_key: str = ""
    # passage prepended to the first user turn by the assemble step; a joined page arrives
    # already cleaned, redacted and trimmed (context_ready), an inline cell goes through the steps
    context: str = ""
    context_ready: bool = False
    # the example's own words (no shared context, no system prompt): what dedup looks at
    own_text: str | None = None

    @property
    def id(self) -> str:
        return f"{self.source}#{self.locator}"

    def dedup_text(self) -> str:
        if self.own_text is not None:
            return self.own_text
        return "\n".join(m["content"] for m in self.messages)

    # What the engines write, compare and measure; a preference record (data_prep.preference)
    # answers these for its prompt / chosen / rejected.
    def body(self) -> dict[str, Any]:
        """The record's line in train/val/test.jsonl (without `meta`), and in a reject."""
        return {"messages": self.messages}

    def exact_key(self) -> bytes:
        """What exact dedup compares (16 bytes)."""
        from data_prep.steps.dedup import exact_digest

        return exact_digest(self.dedup_text(), self.context_key)

    def near_text(self) -> str:
        """What near dedup compares (MinHash of its word shingles)."""
        return self.dedup_text()

    def length(self, count: Callable[[str], int]) -> int:
        """The example's length in the report, `count` being words or tokens of one text."""
        return sum(count(m["content"]) for m in self.messages)


@dataclass
class Reject:
    source: str
    locator: str
    step: str
    reason: str
    record: Any = None
    text: str | None = None

    def to_json(self, snippet_chars: int = 500) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source,
            "locator": self.locator,
            "step": self.step,
            "reason": self.reason,
        }
        if self.record is not None:
            out["record"] = self.record
        if self.text is not None:
            out["text"] = self.text[:snippet_chars]
        return out


def reason_kind(reason: str) -> str:
    """Counting key of a reason: `duplicate of X` and `near_duplicate of X` count as one kind each."""
    return reason.split(" of ", 1)[0].split(":", 1)[0].strip()
