"""One annotated row -> chat messages: OpenAI chat, ShareGPT, Alpaca, or mapped columns.

The format is detected per record, so one JSONL file may mix them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from data_prep.record import Message
from kitcore.schema import RENAMED_ROLES, ROLES

DEFAULT_COLUMNS: dict[str, list[str]] = {
    "user": ["question", "prompt", "instruction", "input", "query"],
    "assistant": ["answer", "response", "output", "completion"],
    "context": ["context", "passage", "document"],
    "join": ["page", "url", "doc_id", "page_id"],
    "system": ["system", "system_prompt"],
}

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}
# The training schema's roles (kitcore.schema), so that a build never keeps what training refuses.
CHAT_ROLES = ROLES


class RowError(ValueError):
    """`args[0]` is the reject reason."""


@dataclass
class ColumnMapping:
    """Which column plays which part; None means "first default name present in the row"."""

    user: str | None = None
    assistant: str | None = None
    context: str | None = None
    join: str | None = None
    system: str | None = None
    aliases: dict[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_COLUMNS))

    def column(self, part: str, row: dict[str, Any]) -> str | None:
        explicit = getattr(self, part)
        if explicit is not None:
            return explicit
        lowered = {k.lower().strip(): k for k in row if isinstance(k, str)}
        for name in self.aliases[part]:
            if name in lowered:
                return lowered[name]
        return None


@dataclass
class Converted:
    """A row's own messages, plus the context/join parts the builder resolves."""

    messages: list[Message]
    question: str = ""
    answer: str = ""
    context: str = ""
    join_key: str = ""
    system: str = ""
    kind: str = "columns"


def _text(value: Any, what: str, strict: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not strict and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise RowError(f"wrong_type: {what} is {type(value).__name__}, expected string")


def detect_kind(row: dict[str, Any]) -> str:
    if "messages" in row:
        return "openai"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return "columns"


def _openai(row: dict[str, Any]) -> list[Message]:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise RowError("invalid_messages: `messages` must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RowError(f"invalid_messages: message {i} is {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            fix = f"; rename it to {RENAMED_ROLES[role]!r}" if isinstance(role, str) and role in RENAMED_ROLES else ""
            raise RowError(f"invalid_messages: message {i} has role {role!r}{fix}")
        if not isinstance(content, str):
            raise RowError(f"wrong_type: message {i} content is {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _sharegpt(row: dict[str, Any]) -> list[Message]:
    conv = row["conversations"]
    if not isinstance(conv, list) or not conv:
        raise RowError("invalid_conversations: `conversations` must be a non-empty list")
    out = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        out.append({"role": "system", "content": row["system"]})
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise RowError(f"invalid_conversations: turn {i} is {type(turn).__name__}")
        who, value = turn.get("from"), turn.get("value")
        role = SHAREGPT_ROLES.get(str(who).lower()) if who is not None else None
        if role is None:
            raise RowError(f"invalid_conversations: turn {i} has unknown speaker {who!r}")
        if not isinstance(value, str):
            raise RowError(f"wrong_type: turn {i} value is {type(value).__name__}")
        out.append({"role": role, "content": value})
    return out


def convert_row(row: dict[str, Any], mapping: ColumnMapping, strict_types: bool) -> Converted:
    """Messages of a row; raises RowError with the reject reason. `strict_types` for JSON sources."""
    kind = detect_kind(row) if mapping.user is None and mapping.assistant is None else "columns"
    if kind == "openai":
        return Converted(_openai(row), kind=kind)
    if kind == "sharegpt":
        return Converted(_sharegpt(row), kind=kind)
    if kind == "alpaca":
        instruction = _text(row.get("instruction"), "instruction", strict_types)
        extra = _text(row.get("input"), "input", strict_types)
        output = _text(row.get("output"), "output", strict_types)
        question = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        system = _text(row.get("system"), "system", strict_types)
        return Converted([], question=question, answer=output, system=system, kind=kind)
    cols = {part: mapping.column(part, row) for part in ("user", "assistant", "context", "join", "system")}
    if cols["user"] is None or cols["assistant"] is None:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise RowError(f"no_chat_structure: no question/answer columns (columns: {present})")
    for part in ("user", "assistant"):
        if cols[part] not in row:
            raise RowError(f"missing_column: {cols[part]!r}")
    values = {p: _text(row.get(c), c, strict_types) if c else "" for p, c in cols.items()}
    return Converted(
        [],
        question=values["user"],
        answer=values["assistant"],
        context=values["context"],
        join_key=values["join"].strip(),
        system=values["system"],
    )


def join_keys_of_row(row: dict[str, Any], mapping: ColumnMapping) -> str:
    col = mapping.column("join", row)
    value = row.get(col) if col else None
    return value.strip() if isinstance(value, str) else ""
