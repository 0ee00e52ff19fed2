"""The preference record schema, shared by data_prep and finetune: one JSONL line is one of

    pair (TRL's conversational preference format):
        {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
    pair, implicit prompt (HH-RLHF style: two whole conversations that share their beginning):
        {"chosen": [messages], "rejected": [messages]}
    pair (OpenAI's preference fine-tuning format):
        {"input": {"messages": [...]}, "preferred_output": [messages], "non_preferred_output": [messages]}
    unpaired (KTO):
        {"prompt": [messages], "completion": [messages], "label": true|false}

`prompt`, `chosen`, `rejected` and `completion` may also be plain strings (TRL's standard format):
a string prompt is one user message, a string answer one assistant message.

Tool calling: a record may declare `tools` (top level; `input.tools` in OpenAI's format), and then
its messages may hold tool calls and tool results as in chat records (kitcore.schema): a completion
can be a call (`{"role": "assistant", "content": null, "tool_calls": [...]}`), a prompt can end on
a tool result. Each side is checked as the chat record prompt + completion with those tools.

`normalize_preference` turns any of them into a `Preference` (prompt messages plus one or two
completions) or raises `PreferenceError` with the first problem as one sentence; training and
`data-prep validate` both use it, so a file that validates is a file that trains. A completion
starts with an assistant message; the prompt does not end with one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kitcore.schema import normalize_record, record_problems, training_example, training_problem

__all__ = ["Preference", "PreferenceError", "normalize_preference", "preference_problem", "is_preference_record"]

PAIR_KEYS = ({"prompt", "chosen", "rejected"}, {"chosen", "rejected"},
             {"input", "preferred_output", "non_preferred_output"})
UNPAIRED_KEYS = {"prompt", "completion", "label"}


class PreferenceError(ValueError):
    """A preference record that cannot be trained on; the message says why and `kind` names the
    problem in one word (what `data-prep build` counts its rejects by)."""

    def __init__(self, message: str, kind: str = "invalid_preference") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Preference:
    prompt: list[dict]
    chosen: list[dict]  # the completion, for an unpaired record
    rejected: list[dict] | None = None  # None for an unpaired (KTO) record
    label: bool | None = None  # unpaired only: is the completion desirable
    tools: list[dict] | None = None  # the functions the record declares (OpenAI's `tools`)

    @property
    def paired(self) -> bool:
        return self.rejected is not None


def is_preference_record(obj: Any) -> bool:
    """Whether a parsed line is shaped like a preference record (of any of the formats above)."""
    return isinstance(obj, dict) and any(keys <= obj.keys() for keys in (*PAIR_KEYS, UNPAIRED_KEYS))


def _messages(value: Any, field: str, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise PreferenceError(f"`{field}` must be a non-empty list of messages (or a string)", "invalid_messages")
    return value


def _plain(messages: list[dict]) -> list[dict]:
    """The schema's keys of each message (content None on a turn that only calls tools)."""
    return training_example({"messages": messages})["messages"]


def _check(messages: list[dict], field: str, tools: list | None, *, assistant: bool, context: int = 0) -> None:
    """`messages` as a chat record with the record's tools; `context` leading messages are the
    prompt a completion is checked after (a call must name a declared function, a tool result must
    answer a call), and the message numbers in the error count them too."""
    record = {"messages": messages, **({"tools": tools} if tools else {})}
    problem = training_problem(record, require_assistant=assistant)
    if problem:
        kind = record_problems(record, require_assistant=assistant)[0].kind if tools else "invalid_messages"
        where = f"`{field}` after the prompt's {context} message(s)" if context else f"`{field}`"
        raise PreferenceError(f"{where}: {problem}", kind)


def _completion(value: Any, field: str, prompt: list[dict], tools: list | None) -> list[dict]:
    msgs = _messages(value, field, "assistant")
    if tools:  # checked after its prompt, with the record's tools
        _check([*prompt, *msgs], field, tools, assistant=True, context=len(prompt))
    else:
        _check(msgs, field, None, assistant=True)
    if msgs[0].get("role") != "assistant":
        raise PreferenceError(f"`{field}` must start with an assistant message (it starts with "
                              f"{msgs[0].get('role')!r})", "completion_not_assistant")
    return _plain(msgs)


def _prompt(value: Any, field: str, tools: list | None) -> list[dict]:
    msgs = _messages(value, field, "user")
    _check(msgs, field, tools, assistant=False)
    if msgs[-1].get("role") == "assistant":
        raise PreferenceError(f"`{field}` ends with an assistant message; the answer belongs in the completion",
                              "prompt_ends_with_assistant")
    return _plain(msgs)


def _tools(obj: dict) -> list | None:
    """The record's declared functions: top-level `tools` (or legacy `functions`), or OpenAI's `input.tools`."""
    inp = obj.get("input")
    source = {"tools": inp["tools"]} if isinstance(inp, dict) and "tools" in inp else obj
    return normalize_record({"messages": [], **{k: source[k] for k in ("tools", "functions") if k in source}}
                            ).get("tools") or None


def normalize_preference(obj: Any, *, unpaired: bool = False) -> Preference:
    """The record as a Preference; `unpaired=True` reads KTO records (and also accepts pairs, each
    giving a desirable and an undesirable example: see `finetune.data.preference`)."""
    if not isinstance(obj, dict):
        raise PreferenceError(f"line is a {type(obj).__name__}, not an object", "not_a_preference_record")
    tools = _tools(obj)
    if unpaired and UNPAIRED_KEYS <= obj.keys():
        if not isinstance(obj["label"], bool):
            raise PreferenceError(f"`label` must be true or false, not {obj['label']!r}", "invalid_label")
        prompt = _prompt(obj["prompt"], "prompt", tools)
        return Preference(prompt, _completion(obj["completion"], "completion", prompt, tools), label=obj["label"],
                          tools=tools)
    if {"input", "preferred_output", "non_preferred_output"} <= obj.keys():
        inp = obj["input"]
        if not isinstance(inp, dict) or "messages" not in inp:
            raise PreferenceError("`input` must be an object with a `messages` list (OpenAI's preference format)",
                                  "invalid_messages")
        prompt = _prompt(inp["messages"], "input.messages", tools)
        chosen = _completion(obj["preferred_output"], "preferred_output", prompt, tools)
        rejected = _completion(obj["non_preferred_output"], "non_preferred_output", prompt, tools)
    elif {"prompt", "chosen", "rejected"} <= obj.keys():
        prompt = _prompt(obj["prompt"], "prompt", tools)
        chosen = _completion(obj["chosen"], "chosen", prompt, tools)
        rejected = _completion(obj["rejected"], "rejected", prompt, tools)
    elif {"chosen", "rejected"} <= obj.keys():
        c, r = _messages(obj["chosen"], "chosen", "assistant"), _messages(obj["rejected"], "rejected", "assistant")
        n = 0  # the shared beginning is the prompt; it must end where an assistant turn starts
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        while n > 0 and isinstance(c[n - 1], dict) and c[n - 1].get("role") == "assistant":
            n -= 1
        if n == 0:
            raise PreferenceError("`chosen` and `rejected` share no prompt: give both whole conversations with "
                                  "the same beginning, or a separate `prompt`", "no_shared_prompt")
        prompt = _prompt(c[:n], "chosen (shared prompt)", tools)
        chosen = _completion(c[n:], "chosen", prompt, tools)
        rejected = _completion(r[n:], "rejected", prompt, tools)
    else:
        shown = sorted(obj)[:8]
        raise PreferenceError(
            f"not a preference record (keys {shown}); expected prompt/chosen/rejected, chosen/rejected, "
            "input/preferred_output/non_preferred_output" + (", or prompt/completion/label" if unpaired else ""),
            "not_a_preference_record")
    if chosen == rejected:
        raise PreferenceError("`chosen` and `rejected` are identical: the pair teaches nothing", "identical_pair")
    return Preference(prompt, chosen, rejected, tools=tools)


def preference_problem(obj: Any, *, unpaired: bool = False) -> str | None:
    """Why training refuses this preference line, or None."""
    try:
        normalize_preference(obj, unpaired=unpaired)
    except PreferenceError as exc:
        return str(exc)
    return None
