"""Preference builds: annotated pairs -> TRL's conversational preference JSONL, through the SFT
build's steps, dedup and split.

    task: preference   {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
                       (method: dpo, orpo, simpo; kto reads each pair as two examples)
    task: kto          the same, plus unpaired {"prompt": [messages], "completion": [messages], "label": bool}

A row of a CSV/TSV/XLSX/JSON/JSONL file is one of kitcore.preference's formats (TRL explicit or
implicit prompt, OpenAI's preference format, KTO unpaired, plain strings), or a sheet whose columns
name the parts (`columns.prompt` / `chosen` / `rejected`, or `prompt` / `completion` / `label`;
unset: the first default name present). Every row is read by kitcore.preference.normalize_preference,
the schema training reads; this module only maps columns onto it and turns HH-RLHF's conversation
strings ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages, whose shared beginning is the prompt.

A pair travels as one PreferenceRecord whose messages are prompt + chosen + rejected, so the SFT
steps (clean, redact, chat filter, assemble) run unchanged on every message of every part: the same
text is cleaned and redacted the same way wherever it is (the placeholders are typed, not numbered:
an email in chosen and in rejected is `[EMAIL]` in both). Then the preference step rejects a pair
whose chosen and rejected came out the same, and names its split group.

The keys, and why each is what it is:

  split group   `prompt:` + a hash of the prompt's non-system messages (role and words, normalized
                as exact dedup normalizes: case, punctuation, spacing; a message without words by its
                text). Every pair of one prompt lands
                in one split whatever file, line, order or worker it came from, so no prompt is in
                both train and test. A system prompt does not make another prompt: the question asked
                is the same one, and a build-wide `system:` must not move prompts between splits.
  exact dedup   the whole record (every message of every part, and the label). Several pairs per
                prompt are the normal shape of preference data (UltraFeedback, HH-RLHF), so only the
                same judgement twice is a duplicate: it would count double in the loss.
  near dedup    the prompt's words, compared across prompt groups (MinHash LSH, `dedup.threshold`).
                Near-similar prompts join one split group (`near_action: group`, the only action of a
                preference build); nothing is dropped. A MinHash over a whole pair cannot tell an
                edited copy from another comparison of the same prompt and chosen answer (their shared
                words dominate the estimate), so dropping on it would throw away real judgements;
                grouping on the prompt closes the leak that matters: a reworded test prompt in train.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from data_prep.convert import RowError, find_column
from data_prep.record import Message, Record
from data_prep.steps.base import Step
from data_prep.steps.chat import ChatFilterStep
from data_prep.steps.dedup import Deduplicator, duplicate_reason, normalize_for_hash
from data_prep.steps.filters import chat_checks
from kitcore.preference import PreferenceError, normalize_preference

__all__ = [
    "PREFERENCE_TASKS",
    "PREFERENCE_COLUMNS",
    "PreferenceColumns",
    "PreferenceChatFilterStep",
    "PreferenceRecord",
    "PreferenceStep",
    "PromptDedupStep",
    "hh_messages",
    "preference_record",
]

PREFERENCE_TASKS = ("preference", "kto")
OPENAI_KEYS = ("input", "preferred_output", "non_preferred_output")

DEFAULT_COLUMNS: dict[str, list[str]] = {
    "prompt": ["prompt", "question", "instruction", "query", "input"],
    "chosen": ["chosen", "preferred", "chosen_response", "better", "accepted"],
    "rejected": ["rejected", "dispreferred", "rejected_response", "worse", "non_preferred"],
    "completion": ["completion", "response", "answer", "output"],
    "label": ["label", "desirable"],
    "system": ["system", "system_prompt"],
    "context": ["context", "passage", "document"],
}
# the recipe's `columns` keys a preference build reads (the others are SFT's)
PREFERENCE_COLUMNS = tuple(DEFAULT_COLUMNS)
UNPAIRED_COLUMNS = ("completion", "label")
_TRUE = {"true", "1", "yes", "y", "good", "desirable"}
_FALSE = {"false", "0", "no", "n", "bad", "undesirable"}


@dataclass
class PreferenceColumns:
    """Which column plays which part; None means "first default name present in the row"."""

    prompt: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    label: str | None = None
    system: str | None = None
    context: str | None = None

    @classmethod
    def of(cls, columns: Any) -> PreferenceColumns:
        """From a source's `columns` (recipe.ColumnsConfig)."""
        return cls(**{part: getattr(columns, part) for part in PREFERENCE_COLUMNS})

    @property
    def explicit(self) -> bool:
        return any(getattr(self, part) is not None for part in ("prompt", "chosen", "rejected", "completion"))

    def column(self, part: str, row: dict[str, Any]) -> str | None:
        return find_column(getattr(self, part), DEFAULT_COLUMNS[part], row)


# ---- HH-RLHF's conversation strings ------------------------------------------------------------
# The HH-RLHF release writes a conversation as one string, each turn after a blank line and a
# speaker label. Split on exactly those markers: a turn's own text may hold lines that look like
# labels ("Note: ...", "Q: ..."), which the general transcript reader would take for new turns.
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_messages(text: str) -> list[Message] | None:
    """The messages of an HH-RLHF conversation string ("\\n\\nHuman: ...\\n\\nAssistant: ..."), or
    None when `text` is not one. Consecutive turns of one speaker are merged, as transcripts are."""
    if not text.lstrip().startswith("Human:"):
        return None
    pieces = _HH_TURN.split("\n\n" + text.lstrip())
    if pieces[0].strip():
        return None
    out: list[Message] = []
    for who, content in zip(pieces[1::2], pieces[2::2]):
        role = _HH_ROLES[who]
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + content
        else:
            out.append({"role": role, "content": content})
    return out if {m["role"] for m in out} == {"user", "assistant"} else None


def _hh_prompt(text: str) -> list[Message] | None:
    """A prompt given as an HH string ends with the empty "Assistant:" cue; that cue is not a turn."""
    msgs = hh_messages(text + ("" if text.rstrip().endswith("Assistant:") else "\n\nAssistant:"))
    if msgs is None:
        return None
    if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"].strip():
        msgs = msgs[:-1]
    return msgs


# ---- one row -> a preference record -------------------------------------------------------------
def prompt_words(text: str) -> str:
    """A message as the keys compare it: its words, as exact dedup normalizes them; a message with
    no word at all ("🙂") by its text, or every such prompt would be one prompt."""
    return normalize_for_hash(text) or text.strip()


@dataclass
class PreferenceRecord(Record):
    """A pair (or, for KTO, an unpaired example) on its way to train/val/test: `messages` is
    prompt + chosen + rejected (or prompt + completion), `parts` their message counts."""

    parts: tuple[int, ...] = ()
    label: bool | None = None  # unpaired only: is the completion desirable

    @property
    def paired(self) -> bool:
        return len(self.parts) == 3

    def split_parts(self) -> list[list[Message]]:
        out, i = [], 0
        for n in self.parts:
            out.append(self.messages[i : i + n])
            i += n
        return out

    def body(self) -> dict[str, Any]:
        prompt, first, *rest = self.split_parts()
        if self.paired:
            return {"prompt": prompt, "chosen": first, "rejected": rest[0]}
        return {"prompt": prompt, "completion": first, "label": self.label}

    def _prompt_words(self) -> list[list[str]]:
        return [[m["role"], prompt_words(m["content"])] for m in self.split_parts()[0] if m["role"] != "system"]

    def prompt_group(self) -> str:
        digest = hashlib.blake2b(json.dumps(self._prompt_words()).encode(), digest_size=12).hexdigest()
        return f"prompt:{digest}"

    def exact_key(self) -> bytes:
        parts = [[[m["role"], prompt_words(m["content"])] for m in part] for part in self.split_parts()]
        return hashlib.blake2b(json.dumps([parts, self.label]).encode(), digest_size=16).digest()

    def near_text(self) -> str:
        # a function of the prompt group's key alone: every record of a group has one signature
        return "\n".join(words for _, words in self._prompt_words())

    def length(self, count: Callable[[str], int]) -> int:
        # prompt + the longer completion: what training's max_length applies to
        prompt, *answers = self.split_parts()
        return sum(count(m["content"]) for m in prompt) + max(
            sum(count(m["content"]) for m in a) for a in answers
        )


def _cell(value: Any, strict: bool) -> Any:
    """A cell as the schema reads it. JSON values go to kitcore.preference as they are (it says
    what is wrong with them); a sheet's empty cell is empty text and its number is its text."""
    if strict:
        return value
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _text_cell(row: dict[str, Any], col: str | None, strict: bool) -> str:
    """A system prompt or context cell: text (a missing or null cell is none)."""
    value = row.get(col) if col else None
    if value is None:
        return ""
    value = _cell(value, strict)
    if not isinstance(value, str):
        raise RowError(f"wrong_type: {col} is {type(value).__name__}, expected a string")
    return value


def _label(value: Any, strict: bool) -> Any:
    """A sheet's label text as true/false; JSON keeps its value (the schema wants a boolean)."""
    if strict or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RowError(f"invalid_label: {value!r}; expected true or false (also 1/0, yes/no)")


def _schema_record(
    row: dict[str, Any], cols: PreferenceColumns, strict: bool, unpaired: bool
) -> dict[str, Any]:
    """The row in one of kitcore.preference's formats (not yet checked: normalize_preference does)."""
    if not cols.explicit and all(k in row for k in OPENAI_KEYS):
        return row
    name = {part: cols.column(part, row) for part in ("prompt", "chosen", "rejected", "completion", "label")}
    for part, col in name.items():
        if col is not None and getattr(cols, part) is not None and col not in row:
            raise RowError(f"missing_column: {col!r}")
    present = {part: col for part, col in name.items() if col is not None and col in row}
    if "chosen" in present and "rejected" in present:
        obj = {part: _cell(row[present[part]], strict) for part in ("chosen", "rejected")}
        if "prompt" in present:
            obj["prompt"] = _cell(row[present["prompt"]], strict)
            if isinstance(obj["prompt"], str):
                obj["prompt"] = _hh_prompt(obj["prompt"]) or obj["prompt"]
        elif isinstance(obj["chosen"], str) and isinstance(obj["rejected"], str):
            chosen, rejected = hh_messages(obj["chosen"]), hh_messages(obj["rejected"])
            if chosen is not None and rejected is not None:
                obj = {"chosen": chosen, "rejected": rejected}
        return obj
    if {"prompt", "completion", "label"} <= present.keys():
        if not unpaired:
            raise RowError(
                "unpaired_record: a KTO example (prompt/completion/label) in a pair build; "
                "build with task: kto, or give chosen and rejected"
            )
        return {
            "prompt": _cell(row[present["prompt"]], strict),
            "completion": _cell(row[present["completion"]], strict),
            "label": _label(row[present["label"]], strict),
        }
    columns = ", ".join(sorted(map(str, row))) or "none"
    want = "prompt/chosen/rejected" + (" or prompt/completion/label" if unpaired else "")
    raise RowError(f"no_preference_structure: no {want} columns (columns: {columns})")


def preference_record(
    source: str,
    locator: str,
    row: dict[str, Any],
    cols: PreferenceColumns,
    *,
    strict: bool,
    unpaired: bool,
    system: str | None = None,
) -> PreferenceRecord:
    """The record of one row, or RowError with the reject reason. `strict` for JSON sources;
    `unpaired` (task kto) also reads prompt/completion/label; `system` is added first to a prompt
    that has no system message (a row's `system` column before it)."""
    # Training reads pairs with tools (kitcore.preference), but this build's steps clean and redact
    # text turns only: such a row is refused, never written without its tools.
    tool_error = RowError("tool_calling_pair: a preference build does not carry tools or tool calls; give such "
                          "pairs to training as JSONL (`prompt`/`chosen`/`rejected` with `tools`) directly")
    if strict and ("tools" in row or "functions" in row):  # a JSON record's OpenAI keys (a sheet column is data)
        raise tool_error
    obj = _schema_record(row, cols, strict, unpaired)
    try:
        pref = normalize_preference(obj, unpaired=unpaired)
    except PreferenceError as err:
        raise RowError(f"{err.kind}: {err}") from None
    messages = pref.prompt + pref.chosen + (pref.rejected or [])
    if pref.tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        raise tool_error
    prompt = [dict(m) for m in pref.prompt]
    if not any(m["role"] == "user" for m in prompt):
        raise RowError("no_user_message: the prompt has no user turn")
    row_system, context = (_text_cell(row, cols.column(part, row), strict) for part in ("system", "context"))
    system = row_system.strip() or system
    if system and not any(m["role"] == "system" for m in prompt):
        prompt.insert(0, {"role": "system", "content": system})
    answers = [pref.chosen, pref.rejected] if pref.paired else [pref.chosen]
    return PreferenceRecord(
        source=source,
        locator=locator,
        messages=prompt + [dict(m) for a in answers for m in a],
        context=context if context.strip() else "",
        parts=(len(prompt), *(len(a) for a in answers)),
        label=pref.label,
    )


# ---- the steps --------------------------------------------------------------------------------
_MESSAGE = re.compile(r"\bmessage (\d+)")


class PreferenceChatFilterStep(ChatFilterStep):
    """SFT's per-field chat checks on prompt + each completion (what training renders), with the
    message a reason names given by part: `empty_assistant: rejected message 0`."""

    def process(self, rec: Record) -> str | None:
        assert isinstance(rec, PreferenceRecord)
        prompt, *answers = rec.split_parts()
        names = ("chosen", "rejected") if rec.paired else ("completion",)
        for name, answer in zip(names, answers):
            reason = chat_checks(prompt + answer, self.t)
            if reason is not None:

                def part(m: re.Match, name: str = name) -> str:
                    i = int(m.group(1))
                    return f"prompt message {i}" if i < len(prompt) else f"{name} message {i - len(prompt)}"

                return _MESSAGE.sub(part, reason)
        return None


class PreferenceStep(Step):
    """After clean, redact, chat filter and assemble: a pair whose chosen and rejected came out the
    same (they differed only in spacing, or in PII now redacted) teaches nothing; a kept record
    gets its split group, the prompt's."""

    name = "preference"

    def process(self, rec: Record) -> str | None:
        assert isinstance(rec, PreferenceRecord)
        if rec.paired:
            _, chosen, rejected = rec.split_parts()
            if chosen == rejected:
                return "identical_pair: `chosen` and `rejected` are the same after cleaning and redaction"
        rec.group = rec.prompt_group()
        rec.context_key = ""  # near dedup compares prompts across the whole build
        return None


class PromptDedupStep(Step):
    """The local engine's dedup of a preference build: exact on the whole record, near on the
    prompt, once per prompt group (its first kept record stands for it), joining groups."""

    name = "dedup"

    def __init__(
        self,
        exact: bool,
        near: bool,
        threshold: float,
        num_perm: int,
        shingle_size: int,
        on_near_match: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__()
        self.exact = exact
        self._first: dict[bytes, str] = {}
        self._exact_clusters: Counter[str] = Counter()
        # the prompt index: one entry per prompt group, what the leakage check reads too
        self.index = Deduplicator(False, near, threshold, num_perm, shingle_size, near_action="group")
        self._seen: set[str] = set()
        self.on_near_match = on_near_match
        self.kept_near = 0

    def process(self, rec: Record) -> str | None:
        if self.exact:
            key = rec.exact_key()
            first = self._first.get(key)
            if first is not None:
                self._exact_clusters[first] += 1
                return duplicate_reason(first)
            self._first[key] = rec.id
        if self.index.near and rec.group not in self._seen:
            self._seen.add(rec.group)
            self.index.check(rec.id, rec.near_text(), "", rec.group)
            if self.index.last_matches:
                self.kept_near += 1
                if self.on_near_match is not None:
                    for _, group in self.index.last_matches:
                        self.on_near_match(rec.group, group)
        return None

    @property
    def clusters(self) -> dict[str, int]:
        """Representative -> records dropped as its copies or grouped with it (Deduplicator.clusters)."""
        out = Counter(self._exact_clusters)
        out.update(self.index.clusters)
        return dict(out)
