"""One annotated row -> chat messages: OpenAI chat, ShareGPT, Alpaca, or mapped columns.

The format is detected per record, so one JSONL file may mix them. Tool calling is kept in the
form kitcore.schema defines (top-level `tools`, assistant `tool_calls`, `tool` messages with
`tool_call_id`), read from: OpenAI records (legacy `functions`/`function_call` rewritten);
ShareGPT records with `function_call` / `observation` turns and a top-level `tools` (a JSON
string or a list), as LLaMA-Factory, glaive and xLAM-derived function-calling sets write them; and
`tools` / `tool_calls` columns of a sheet or JSONL. A record whose tool calling the schema refuses
is rejected with the schema's reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from data_prep.record import Message
from kitcore.schema import RENAMED_ROLES, ROLES, normalize_record, record_problems, training_example

DEFAULT_COLUMNS: dict[str, list[str]] = {
    "user": ["question", "prompt", "instruction", "input", "query"],
    "assistant": ["answer", "response", "output", "completion"],
    "context": ["context", "passage", "document"],
    "join": ["page", "url", "doc_id", "page_id"],
    "system": ["system", "system_prompt"],
    "tools": ["tools"],
    "tool_calls": ["tool_calls", "tool_call", "function_call"],
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
    # function-calling ShareGPT (LLaMA-Factory's `sharegpt` tool format): a call, and its result
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
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
    tools: str | None = None
    tool_calls: str | None = None
    aliases: dict[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_COLUMNS))

    def column(self, part: str, row: dict[str, Any]) -> str | None:
        return find_column(getattr(self, part), self.aliases[part], row)


def find_column(explicit: str | None, aliases: list[str], row: dict[str, Any]) -> str | None:
    """The column a part is read from: the one the recipe names, else the first of `aliases` the
    row has (header case and surrounding spaces ignored), else None."""
    if explicit is not None:
        return explicit
    lowered = {k.lower().strip(): k for k in row if isinstance(k, str)}
    return next((lowered[name] for name in aliases if name in lowered), None)


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
    tools: list | None = None
    tool_calls: list | None = None  # the assistant turn of a mapped row calls these
    parallel_tool_calls: bool | None = None


def text_value(value: Any, what: str, strict: bool) -> str:
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


def _json_field(value: Any, what: str) -> Any:
    """A field that holds JSON: parsed from a string (a CSV cell, LLaMA-Factory's `tools`), or as
    is; an empty cell is None."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise RowError(f"invalid_tool_call: {what} is not valid JSON ({err.msg} at column {err.colno})") from None


def _tools(value: Any, what: str) -> list | None:
    """Declared tools in the schema's form; bare function schemas ({name, parameters}) are wrapped."""
    value = _json_field(value, what)
    if value is None or value == "" or value == []:
        return None
    if not isinstance(value, list):
        raise RowError(f"invalid_tools: {what} is a {type(value).__name__}, not a list")
    return [t if isinstance(t, dict) and "function" in t else {"type": "function", "function": t} for t in value]


def _calls(value: Any, what: str, first_id: int) -> list[dict]:
    """Tool calls in the schema's form from {name, arguments} objects (or a list of them, or
    OpenAI's own form); arguments given as an object are serialized to the JSON string."""
    value = _json_field(value, what)
    items = value if isinstance(value, list) else [value]
    calls = []
    for k, item in enumerate(items):
        if not isinstance(item, dict):
            raise RowError(f"invalid_tool_call: {what} is a {type(item).__name__}, not {{name, arguments}}")
        fn = item.get("function") if isinstance(item.get("function"), dict) else item
        args = fn.get("arguments", fn.get("parameters", {}))
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        calls.append({"id": item.get("id") or f"call_{first_id + k}", "type": "function",
                      "function": {"name": fn.get("name"), "arguments": args}})
    return calls


def checked_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record as training reads it (kitcore.schema.training_example), or RowError with the
    schema's reason for its tool calling (roles and content are checked by the callers)."""
    problems = record_problems(record, require_assistant=False)
    if problems:
        p = problems[0]
        raise RowError(f"{p.kind}: {p.detail}" + (f"; {p.fix}" if p.fix else ""))
    out = training_example(record)
    if isinstance(record.get("parallel_tool_calls"), bool):
        out["parallel_tool_calls"] = record["parallel_tool_calls"]
    return out


def _openai(row: dict[str, Any]) -> dict[str, Any]:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise RowError("invalid_messages: `messages` must be a non-empty list")
    row = normalize_record(row)
    for i, m in enumerate(row["messages"]):
        if not isinstance(m, dict):
            raise RowError(f"invalid_messages: message {i} is {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            fix = f"; rename it to {RENAMED_ROLES[role]!r}" if isinstance(role, str) and role in RENAMED_ROLES else ""
            raise RowError(f"invalid_messages: message {i} has role {role!r}{fix}")
        if not isinstance(content, str) and not (role == "assistant" and content is None and m.get("tool_calls")):
            raise RowError(f"wrong_type: message {i} content is {type(content).__name__}")
    return checked_record(row)


def sharegpt_record(row: dict[str, Any]) -> dict[str, Any]:
    conv = row["conversations"]
    if not isinstance(conv, list) or not conv:
        raise RowError("invalid_conversations: `conversations` must be a non-empty list")
    out: list[Message] = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        out.append({"role": "system", "content": row["system"]})
    n_calls = 0
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise RowError(f"invalid_conversations: turn {i} is {type(turn).__name__}")
        # from/value as ShareGPT writes them; role/content as some exports of it do
        who = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        role = SHAREGPT_ROLES.get(str(who).lower()) if who is not None else None
        if role is None:
            raise RowError(f"invalid_conversations: turn {i} has unknown speaker {who!r}")
        is_call = str(who).lower() == "function_call"
        if not isinstance(value, str) and not (is_call and isinstance(value, (dict, list))):
            raise RowError(f"wrong_type: turn {i} value is {type(value).__name__}")
        if is_call:
            calls = _calls(value, f"turn {i} (function_call)", n_calls)
            n_calls += len(calls)
            prev = out[-1] if out else None
            if prev is not None and prev["role"] == "assistant" and not prev.get("tool_calls"):
                prev["tool_calls"] = calls  # the text the assistant said before calling
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": calls})
        else:
            out.append({"role": role, "content": value})
    # ShareGPT gives no ids: a result answers the next unanswered call of the latest turn that
    # called (the calls of an earlier turn left unanswered are not carried over to later results).
    pending: list[str] = []
    for m in out:
        if m.get("tool_calls"):
            pending = [c["id"] for c in m["tool_calls"]]
        if m["role"] == "tool" and pending:
            m["tool_call_id"] = pending.pop(0)
    record: dict[str, Any] = {"messages": out}
    tools = _tools(row.get("tools"), "`tools`")
    if tools:
        record["tools"] = tools
    return checked_record(record)


def convert_row(row: dict[str, Any], mapping: ColumnMapping, strict_types: bool) -> Converted:
    """Messages of a row; raises RowError with the reject reason. `strict_types` for JSON sources."""
    kind = detect_kind(row) if mapping.user is None and mapping.assistant is None else "columns"
    if kind in ("openai", "sharegpt"):
        rec = _openai(row) if kind == "openai" else sharegpt_record(row)
        return Converted(rec["messages"], kind=kind, tools=rec.get("tools"),
                         parallel_tool_calls=rec.get("parallel_tool_calls"))
    if kind == "alpaca":
        instruction = text_value(row.get("instruction"), "instruction", strict_types)
        extra = text_value(row.get("input"), "input", strict_types)
        output = text_value(row.get("output"), "output", strict_types)
        question = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        system = text_value(row.get("system"), "system", strict_types)
        conv = Converted([], question=question, answer=output, system=system, kind=kind)
        return _with_tool_columns(conv, *tool_values(row, mapping))
    cols = {part: mapping.column(part, row) for part in ("user", "assistant", "context", "join", "system")}
    tools, calls = tool_values(row, mapping)
    # A row whose answer is a tool call needs no answer column.
    if cols["user"] is None or (cols["assistant"] is None and not calls):
        present = ", ".join(sorted(map(str, row))) or "none"
        raise RowError(f"no_chat_structure: no question/answer columns (columns: {present})")
    for part in ("user", "assistant"):
        if cols[part] is not None and cols[part] not in row:
            raise RowError(f"missing_column: {cols[part]!r}")
    values = {p: text_value(row.get(c), c, strict_types) if c else "" for p, c in cols.items()}
    conv = Converted(
        [],
        question=values["user"],
        answer=values["assistant"],
        context=values["context"],
        join_key=values["join"].strip(),
        system=values["system"],
    )
    return _with_tool_columns(conv, tools, calls)


def tool_values(row: dict[str, Any], mapping: ColumnMapping) -> tuple[list | None, list[dict]]:
    """The row's declared tools and the calls its answer makes, from the `tools` / `tool_calls`
    columns (an empty cell, null or [] is none). A column the recipe names must exist."""
    found = {}
    for part in ("tools", "tool_calls"):
        col = mapping.column(part, row)
        if col is not None and getattr(mapping, part) is not None and col not in row:
            raise RowError(f"missing_column: {col!r} (columns.{part})")
        found[part] = (col, row.get(col) if col else None)
    col, raw = found["tools"]
    tools = _tools(raw, f"column {col!r}") if col else None
    col, raw = found["tool_calls"]
    raw = _json_field(raw, f"column {col!r}") if col else None
    calls = _calls(raw, f"column {col!r}", 0) if raw not in (None, []) else []
    return tools, calls


def _with_tool_columns(conv: Converted, tools: list | None, calls: list[dict]) -> Converted:
    """`conv` with the row's tools and calls, once the schema has accepted them (declared
    functions, arguments JSON, well-formed `tools`): what the build writes, training reads."""
    if not tools and not calls:
        return conv
    answer: dict[str, Any] = {"role": "assistant", "content": conv.answer}
    if calls:
        answer = {"role": "assistant", "content": conv.answer or None, "tool_calls": calls}
    checked_record({"messages": [{"role": "user", "content": conv.question}, answer], **({"tools": tools} if tools else {})})
    conv.tools, conv.tool_calls = tools, calls or None
    return conv


def join_keys_of_row(row: dict[str, Any], mapping: ColumnMapping) -> str:
    col = mapping.column("join", row)
    value = row.get(col) if col else None
    return value.strip() if isinstance(value, str) else ""
