"""The small record that flows through every step, and the reject that keeps what was dropped."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]  # kitcore.schema's message: role, content (None: only tool calls), tool_calls, ...


def message_text(m: Message) -> str:
    """A message's words for dedup and length counts: its content, then each tool call it makes as
    `name arguments` (two turns that call different functions are different examples)."""
    parts = [m["content"]] if isinstance(m.get("content"), str) else []
    for call in m.get("tool_calls") or []:
        fn = call.get("function") or {}
        parts.append(f"{fn.get('name', '')} {fn.get('arguments', '')}")
    return "\n".join(parts)


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
    # the record's top-level tool fields (kitcore.schema), written with its messages
    tools: list | None = None
    parallel_tool_calls: bool | None = None

    @property
    def id(self) -> str:
        return f"{self.source}#{self.locator}"

    def dedup_text(self) -> str:
        if self.own_text is not None:
            return self.own_text
        return "\n".join(message_text(m) for m in self.messages)

    def example(self) -> dict[str, Any]:
        """The record as a split file (and a reject) holds it: `messages`, and the top-level tool
        fields when it has them."""
        out: dict[str, Any] = {"messages": self.messages}
        if self.tools:
            out["tools"] = self.tools
        if self.parallel_tool_calls is not None:
            out["parallel_tool_calls"] = self.parallel_tool_calls
        return out

    # What the engines write, compare and measure; a preference record (data_prep.preference)
    # answers these for its prompt / chosen / rejected.
    def body(self) -> dict[str, Any]:
        """The record's line in train/val/test.jsonl (without `meta`), and in a reject: its example."""
        return self.example()

    def exact_key(self) -> bytes:
        """What exact dedup compares (16 bytes)."""
        from data_prep.steps.dedup import exact_digest

        return exact_digest(self.dedup_text(), self.context_key)

    def near_text(self) -> str:
        """What near dedup compares (MinHash of its word shingles)."""
        return self.dedup_text()

    def length(self, count: Callable[[str], int]) -> int:
        """The example's length in the report, `count` being words or tokens of one text."""
        return sum(count(message_text(m)) for m in self.messages)  # tool calls count with the text


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
