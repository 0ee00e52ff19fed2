"""`validate` and `stats` for chat JSONL: the checks of OpenAI's chat fine-tuning format checker
(cookbook "Data preparation and analysis for chat model fine-tuning"), plus malformed JSON,
warnings and length distributions, each bad line reported with its line number.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from data_prep.record import message_text
from data_prep.tokens import Lengths, distribution
from kitcore.preference import is_preference_record, normalize_preference, preference_problem
from kitcore.prompts import PromptError, normalize_prompt
from kitcore.schema import MESSAGE_KEYS, ROLES, normalize_record, record_problems

# One list with training's reader; the names stay for code that imports them.
RECOGNIZED_KEYS = MESSAGE_KEYS
RECOGNIZED_ROLES = ROLES


@dataclass
class Issue:
    line: int
    kind: str
    detail: str = ""


@dataclass
class ValidationResult:
    examples: int = 0
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    lengths: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "ok": self.ok,
            "error_counts": dict(Counter(e.kind for e in self.errors)),
            "warning_counts": dict(Counter(w.kind for w in self.warnings)),
            "errors": [vars(e) for e in self.errors],
            "warnings": [vars(w) for w in self.warnings],
            "lengths": self.lengths,
        }


def check_example(ex: Any) -> list[tuple[str, str]]:
    """Format errors of one parsed line, as (error type, detail), in the cookbook's vocabulary.

    The schema training enforces (kitcore.schema), with the cookbook's checks of unknown keys and
    empty content on top.
    """
    return [(p.kind, f"{p.detail}; {p.fix}" if p.fix else p.detail) for p in record_problems(ex, cookbook=True)]


def validate_file(path: str, tokenizer: str | None = None, max_tokens: int = 16385, *,
                  prompts: bool = False) -> ValidationResult:
    """`prompts`: the lines are prompt records (kitcore.prompts, what `method: grpo` trains from), each
    checked as training reads it; the lengths are the prompts'."""
    lengths = Lengths(tokenizer)
    res = ValidationResult()
    totals: list[int] = []
    assistant: list[int] = []
    n_messages: list[int] = []
    preference: bool | None = None
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            res.examples += 1
            try:
                ex = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                res.errors.append(Issue(lineno, "malformed_json", str(err)))
                continue
            if preference is None:  # the first record decides what the file holds, as training's method does
                preference = not prompts and is_preference_record(ex)
            if prompts:
                try:
                    rec = normalize_prompt(ex)
                except PromptError as exc:
                    res.errors.append(Issue(lineno, exc.kind, str(exc)))
                    continue
                msgs = rec.messages
            elif preference:
                # The schema training reads (kitcore.preference); a pair is counted as prompt + chosen.
                problem = preference_problem(ex, unpaired=True)
                if problem:
                    res.errors.append(Issue(lineno, "preference_record", problem))
                    continue
                pref = normalize_preference(ex, unpaired=True)
                msgs = pref.prompt + pref.chosen
            else:
                errs = check_example(ex)
                res.errors += [Issue(lineno, k, d) for k, d in errs]
                if errs:
                    continue
                if normalize_record(ex) is not ex:
                    # Trains as it is (read as tools / tool_calls), but OpenAI has deprecated the form.
                    res.warnings.append(Issue(lineno, "legacy_function_calling",
                                              "functions / function_call / role function: read as tools / tool_calls"))
                msgs = normalize_record(ex)["messages"]
            roles = {m["role"] for m in msgs}
            if "system" not in roles:
                res.warnings.append(Issue(lineno, "no_system_message"))
            if "user" not in roles:
                res.warnings.append(Issue(lineno, "no_user_message"))
            counts = [lengths.count(message_text(m)) for m in msgs]
            total = sum(counts)
            if total > max_tokens:
                res.warnings.append(
                    Issue(lineno, "over_token_limit", f"{total} > {max_tokens} {lengths.unit}")
                )
            totals.append(total)
            assistant.append(sum(c for c, m in zip(counts, msgs) if m["role"] == "assistant"))
            n_messages.append(len(msgs))
    res.lengths = {
        "unit": lengths.unit,
        "example_total": distribution(totals),
        "assistant": distribution(assistant),
        "messages_per_example": distribution(n_messages),
    }
    return res


def stats_file(path: str, tokenizer: str | None = None) -> dict[str, Any]:
    """Counts and length distributions of a chat JSONL (lines that do not parse are counted, not described)."""
    lengths = Lengths(tokenizer)
    roles: Counter[str] = Counter()
    per_role: dict[str, list[int]] = {}
    totals, n_messages = [], []
    examples = bad = 0
    sources: Counter[str] = Counter()
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            examples += 1
            try:
                ex = json.loads(raw)
                msgs = ex["messages"]
                assert isinstance(msgs, list)
            except Exception:  # noqa: BLE001 - stats describes what it can; validate explains the rest
                bad += 1
                continue
            total = 0
            for m in msgs:
                if not isinstance(m, dict):
                    continue
                role = str(m.get("role"))
                n = lengths.count(m.get("content") if isinstance(m.get("content"), str) else "")
                roles[role] += 1
                per_role.setdefault(role, []).append(n)
                total += n
            totals.append(total)
            n_messages.append(len(msgs))
            meta = ex.get("meta")
            if isinstance(meta, dict) and "source" in meta:
                sources[str(meta["source"])] += 1
    return {
        "examples": examples,
        "unparseable": bad,
        "unit": lengths.unit,
        "messages_by_role": dict(roles),
        "example_total": distribution(totals),
        "messages_per_example": distribution(n_messages),
        "by_role": {r: distribution(v) for r, v in per_role.items()},
        "sources": len(sources),
    }
