"""Prompt builds (`task: prompts`): annotated rows -> prompt records for online training from rewards
(`method: grpo`), through the SFT build's steps, dedup and split.

One line of train/val/test.jsonl is the schema training reads (kitcore.prompts):

    {"messages": [system?, ..., user], "tools": [...]?, "<column>": ..., ...}
    {"messages": [system?, ..., user, {"role": "assistant", "content": "42"}], "<column>": ...}

the prompt, its reference answer (when the row has one) as the trailing assistant turn (the built-in
rewards compare with it; the same file also trains `method: sft`), and every other column of the row
kept under its own name: the reward functions receive them by name (`tests`, `schema`, `difficulty`, ...).

Rows are read from CSV/TSV/XLSX/JSON/JSONL: the kit's prompt formats (chat records ending on the user's
turn or on the reference answer, TRL's `{"prompt": ..., "answer": ...}`), ShareGPT, Alpaca (`output`
is the answer, and optional), or columns mapped as an SFT build maps them (`columns.user`, `assistant`,
`system`, `context`, `tools`, `tool_calls`; unset: the first default name present). Unlike an SFT build,
the answer is optional: a row with an empty or missing answer is a prompt without a reference. Pages
and plain text hold no prompts: such a source is one reject, not read.

What each step does to a prompt record:
  clean, redact  every message (the answer turn too); redaction also covers the string values of the
                 kept columns (an e-mail address in a reference `answer` column is `[EMAIL]` there as
                 in the prompt); the columns are not cleaned (they are values: code, schemas, numbers).
  chat filter    the prompt's messages as an SFT build checks them (no assistant turn required); the
                 answer turn must not be empty.
  split group    the prompt (as for preference builds): every record of one prompt lands in one split,
                 and near-similar prompts join one group, so no reworded test prompt is in train.
  exact dedup    the whole record (prompt, answer and columns): the same example twice counts double.
  length         the prompt's (what must leave `grpo.max_completion_length` under max_length).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from data_prep.convert import (
    ColumnMapping,
    RowError,
    checked_record,
    detect_kind,
    sharegpt_record,
    text_value,
    tool_values,
)
from data_prep.preference import PREFERENCE_TASKS, PreferenceRecord, prompt_words
from data_prep.record import Message, Record, message_text
from data_prep.steps.base import Step
from data_prep.steps.chat import ChatFilterStep, RedactStep
from data_prep.steps.filters import chat_checks
from data_prep.steps.redact import redact_strings
from kitcore.prompts import RESERVED_KEYS, PromptError, normalize_prompt

__all__ = ["PROMPTS_TASK", "PROMPT_KEYED_TASKS", "PromptExample", "prompt_example", "PromptRedactStep",
           "PromptChatFilterStep", "PromptStep"]

PROMPTS_TASK = "prompts"
# Builds whose records are keyed by their prompt: split group, near dedup on the prompt, no page joins.
PROMPT_KEYED_TASKS = (*PREFERENCE_TASKS, PROMPTS_TASK)
# The line's own keys: a row column of one of these names would be overwritten or dropped.
_LINE_KEYS = frozenset({"meta", "parallel_tool_calls"})


@dataclass
class PromptExample(PreferenceRecord):
    """A prompt record on its way to train/val/test: `messages` is the prompt, then its answer turn when
    it has one (`parts`: (prompt messages,) or (prompt messages, 1)); `columns` go to the reward functions."""

    columns: dict[str, Any] = field(default_factory=dict)

    @property
    def paired(self) -> bool:
        return False

    @property
    def answer(self) -> Message | None:
        return self.messages[-1] if len(self.parts) == 2 else None

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = Record.example(self)
        out.update(self.columns)
        return out

    def _prompt_words(self) -> list[list[str]]:
        # a prompt may hold earlier assistant turns that only call tools (no content)
        return [[m["role"], prompt_words(message_text(m))] for m in self.split_parts()[0] if m["role"] != "system"]

    def exact_key(self) -> bytes:
        msgs = [[m["role"], prompt_words(message_text(m))] for m in self.messages]
        text = json.dumps([msgs, self.columns], sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.blake2b(text.encode(), digest_size=16).digest()

    def length(self, count) -> int:
        return sum(count(m["content"] or "") for m in self.split_parts()[0])


# ---- one row -> a prompt record ------------------------------------------------------------------
def _answer_turn(answer: Any, calls: Any) -> Message | None:
    """The reference answer as an assistant turn (text and/or the schema's tool calls), or None."""
    text = answer if isinstance(answer, str) else ""
    if not text.strip() and not calls:
        return None
    turn: Message = {"role": "assistant", "content": text if text.strip() else None}
    if calls:
        turn["tool_calls"] = calls
    return turn


def _record_of(row: dict[str, Any], mapping: ColumnMapping, strict: bool) -> tuple[dict[str, Any], set[str]]:
    """The row as a kitcore.prompts record, and the row keys it used for the prompt and the answer (the
    others are the reward columns)."""
    kind = detect_kind(row) if mapping.user is None and mapping.assistant is None else "columns"
    if kind == "columns" and mapping.user is None and mapping.assistant is None and "prompt" in row and (
            isinstance(row["prompt"], list) or (strict and "answer" in row)):
        kind = "trl"  # TRL's {"prompt": ..., "answer": ...}: read as kitcore.prompts reads it
    if kind in ("openai", "trl"):
        used = {"messages", "prompt", "tools", "functions", "parallel_tool_calls"}
        return {k: v for k, v in row.items() if k in used}, used
    if kind == "sharegpt":
        rec = sharegpt_record(row)
        return rec, {"conversations", "system", "tools"}
    if kind == "alpaca":
        instruction = text_value(row.get("instruction"), "instruction", strict)
        extra = text_value(row.get("input"), "input", strict)
        system = text_value(row.get("system"), "system", strict)
        msgs: list[Message] = [{"role": "system", "content": system}] if system.strip() else []
        msgs.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction})
        answer = _answer_turn(text_value(row.get("output"), "output", strict), None)
        return {"messages": msgs + ([answer] if answer else [])}, {"instruction", "input", "output", "system"}
    cols = {part: mapping.column(part, row) for part in ("user", "assistant", "context", "system")}
    if cols["user"] is None:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise RowError(f"no_prompt_column: no question/prompt column (columns: {present})")
    for part in ("user", "assistant"):
        if cols[part] is not None and getattr(mapping, part) is not None and cols[part] not in row:
            raise RowError(f"missing_column: {cols[part]!r} (columns.{part})")
    tools, calls = tool_values(row, mapping)
    values = {p: text_value(row.get(c), c, strict) if c else "" for p, c in cols.items()}
    msgs = [{"role": "system", "content": values["system"]}] if values["system"].strip() else []
    msgs.append({"role": "user", "content": values["user"]})
    answer = _answer_turn(values["assistant"], calls)
    rec: dict[str, Any] = {"messages": msgs + ([answer] if answer else [])}
    if tools:
        rec["tools"] = tools
    used = {c for c in cols.values() if c} | {c for c in (mapping.column("tools", row),
                                                          mapping.column("tool_calls", row)) if c}
    rec["_context"] = values["context"]
    return rec, used


def prompt_example(source: str, locator: str, row: dict[str, Any], mapping: ColumnMapping, *, strict: bool,
                   system: str | None = None, provenance: bool = True) -> PromptExample:
    """The prompt record of one row, or RowError with the reject reason. `strict` for JSON sources;
    `system` is added first to a prompt that has none."""
    rec, used = _record_of(row, mapping, strict)
    context = rec.pop("_context", "")
    for key in row:
        if key in used or key in rec:
            continue
        if key in RESERVED_KEYS or (key in _LINE_KEYS and (key != "meta" or provenance)):
            raise RowError(f"reserved_column: {key!r} is a name the prompt line uses itself (or TRL gives its "
                           "own arguments); rename the column" + ("" if key != "meta" else " or build without provenance"))
        rec[key] = row[key]
    try:
        p = normalize_prompt(rec)
    except PromptError as err:
        raise RowError(f"{err.kind}: {err}") from None
    columns = dict(p.columns)
    calls = columns.pop("tool_calls", None) if isinstance(columns.get("tool_calls"), list) else None
    answer = _answer_turn(columns.pop("answer"), calls) if isinstance(columns.get("answer"), str) else None
    if answer is None and calls is not None:
        columns["tool_calls"] = calls
    prompt = [dict(m) for m in p.messages]
    if system and not any(m["role"] == "system" for m in prompt):
        prompt.insert(0, {"role": "system", "content": system})
    if answer is not None and answer.get("tool_calls"):
        # the calls in the schema's form, to functions the record declares
        answer = checked_record({"messages": [*prompt, answer], **({"tools": p.tools} if p.tools else {})})["messages"][-1]
    out = PromptExample(source=source, locator=locator, messages=prompt + ([answer] if answer else []),
                        context=context if context.strip() else "", tools=p.tools,
                        parts=(len(prompt), 1) if answer else (len(prompt),), columns=columns)
    if isinstance(rec.get("parallel_tool_calls"), bool):
        out.parallel_tool_calls = rec["parallel_tool_calls"]
    return out


# ---- the steps ------------------------------------------------------------------------------------
class PromptRedactStep(RedactStep):
    """The SFT redaction on every message, and on the string values of the reward columns."""

    def process(self, rec: Record) -> str | None:
        super().process(rec)
        assert isinstance(rec, PromptExample)
        found: Counter = Counter()
        rec.columns = redact_strings(rec.columns, self.types, found)
        self.counts.update(found)
        return None


class PromptChatFilterStep(ChatFilterStep):
    """SFT's per-field checks on the prompt (no assistant turn required); the answer must say something."""

    def process(self, rec: Record) -> str | None:
        assert isinstance(rec, PromptExample)
        prompt = rec.split_parts()[0]
        reason = chat_checks(prompt, self.t, require_assistant=False)
        if reason is not None:
            return reason
        answer = rec.answer
        if answer is not None and not (answer.get("content") or "").strip() and not answer.get("tool_calls"):
            return "empty_answer: the reference answer is empty after cleaning"
        if answer is not None:
            words = len((answer.get("content") or "").split())
            if words > self.t.max_message_words:
                return f"too_long_assistant: {words} > {self.t.max_message_words} words"
        return None


class PromptStep(Step):
    """After assemble: a kept record gets its split group, the prompt's (near dedup compares prompts across
    the whole build)."""

    name = "prompt"

    def process(self, rec: Record) -> str | None:
        assert isinstance(rec, PromptExample)
        rec.group = rec.prompt_group()
        rec.context_key = ""
        return None
