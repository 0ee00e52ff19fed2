"""The chat record schema: one line of chat JSONL is `{"messages": [{"role": ..., "content": ...}, ...]}`.

`finetune train` reads it through `training_problem` (the first problem of a line stops it) and
`data-prep validate` through `record_problems` (every problem of every line, with a kind to count
by), so a file that validates is a file that trains. Validate is stricter in two ways only (see
`cookbook`); it never passes a line that training refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["MESSAGE_KEYS", "ROLES", "RENAMED_ROLES", "Problem", "record_problems", "training_problem"]

# The roles of OpenAI's chat format that Hugging Face chat templates render.
ROLES = ("system", "user", "assistant", "tool", "developer")
# OpenAI's deprecated function-calling role: chat templates render `tool`, not `function`. Refused
# with the fix rather than renamed on the fly, so that the file on disk is the one that trains.
RENAMED_ROLES = {"function": "tool"}
# The message keys OpenAI's format checker knows; training reads only `role` and `content`.
MESSAGE_KEYS = ("role", "content", "name", "function_call", "weight")


@dataclass(frozen=True)
class Problem:
    """One reason a record cannot be trained on.

    `kind` is the vocabulary of OpenAI's chat-format checker (what `data-prep validate` counts);
    `detail` says where and, when there is one, the fix.
    """

    kind: str
    detail: str = ""
    message: int | None = None  # index of the offending message, None for the record as a whole
    fix: str = ""  # what to change, when the problem has one obvious fix


def _role_problem(i: int, role: Any) -> Problem | None:
    if role in ROLES:
        return None
    if isinstance(role, str) and role in RENAMED_ROLES:
        new = RENAMED_ROLES[role]
        fix = f"{role!r} is the legacy name of {new!r}; rename the role to {new!r}"
        return Problem("unrecognized_role", f"message {i}: {role!r}", i, fix)
    return Problem("unrecognized_role", f"message {i}: {role!r}", i)


def record_problems(obj: Any, *, require_assistant: bool = True, cookbook: bool = False) -> list[Problem]:
    """Every problem of one parsed JSONL line, in message order; empty when it can be trained on.

    `cookbook=True` (`data-prep validate`) adds the two checks of OpenAI's format checker that
    training does not need: keys other than MESSAGE_KEYS, and empty content.
    """
    if not isinstance(obj, dict):
        return [Problem("data_type", f"line is a {type(obj).__name__}, not an object")]
    messages = obj.get("messages")
    if not messages:
        return [Problem("missing_messages_list", "no `messages` or it is empty")]
    if not isinstance(messages, list):
        return [Problem("data_type", "`messages` is not a list")]
    problems: list[Problem] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            problems.append(Problem("data_type", f"message {i} is not an object", i))
            continue
        if "role" not in m or "content" not in m:
            missing = "role" if "role" not in m else "content"
            problems.append(Problem("message_missing_key", f"message {i} has no {missing}", i))
        extra = [str(k) for k in m if k not in MESSAGE_KEYS]
        if cookbook and extra:
            problems.append(Problem("message_unrecognized_key", f"message {i}: {', '.join(extra)}", i))
        if "role" in m:
            bad_role = _role_problem(i, m["role"])
            if bad_role:
                problems.append(bad_role)
        content = m.get("content")
        if not isinstance(content, str):
            problems.append(Problem("missing_content", f"message {i}: content is {type(content).__name__}", i))
        elif cookbook and not content and not m.get("function_call"):
            problems.append(Problem("missing_content", f"message {i}: content is empty", i))
    if require_assistant and not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        problems.append(Problem("example_missing_assistant_message", ""))
    return problems


def training_problem(obj: Any, *, require_assistant: bool = True) -> str | None:
    """Why training refuses this line (its first problem, as one sentence), or None."""
    problems = record_problems(obj, require_assistant=require_assistant)
    if not problems:
        return None
    p = problems[0]
    if p.kind == "example_missing_assistant_message":
        return "no assistant message, nothing to train on"
    if p.message is None:
        return "expected an object with a non-empty `messages` list"
    if p.fix:
        return f"message {p.message}: {p.fix}"
    return f"message {p.message} needs a `role` in {sorted(ROLES)} and a string `content`"
