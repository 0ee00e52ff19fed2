"""The prompt record schema for online training from rewards (`method: grpo`), shared by data_prep
and finetune: one JSONL line is one of

    chat record ending on the user's turn (or a tool result):
        {"messages": [..., {"role": "user", "content": "..."}], "answer": "42", ...}
    chat record with a trailing assistant turn, read as the reference answer:
        {"messages": [..., {"role": "user", ...}, {"role": "assistant", "content": "42"}], ...}
    TRL's prompt format:
        {"prompt": "text" or [messages], "answer": "42", ...}

`tools` (top level) declares the functions the prompt may call; it is rendered into the prompt as
the chat template declares tools, and handed to the reward functions. Every other key of the record
(`answer`, `tests`, `schema`, ...) is kept and passed to the reward functions by name.

A trailing assistant turn becomes `answer` (its text) and, when it calls tools, `tool_calls` (its
calls, OpenAI's form): the reference the built-in rewards compare with. A record that has both a
trailing assistant turn and its own `answer` is refused (which one is the reference?).

`normalize_prompt` turns any of them into a `PromptRecord` or raises `PromptError` with the first
problem as one sentence; training and `data-prep validate` both use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kitcore.schema import record_problems, training_example, training_problem

__all__ = ["PromptRecord", "PromptError", "normalize_prompt", "prompt_problem", "RESERVED_KEYS"]

# Keys of a record that are not passed to reward functions as columns: the prompt itself, and the
# names TRL's GRPOTrainer gives its own arguments (prompts, completions, completion_ids, trainer_state, ...).
RESERVED_KEYS = frozenset({"messages", "prompt", "tools", "functions", "completion", "completion_ids", "completions",
                           "prompts", "trainer_state", "log_extra", "log_metric", "environments"})


class PromptError(ValueError):
    """A prompt record that cannot be trained on; `kind` names the problem in one word."""

    def __init__(self, message: str, kind: str = "invalid_prompt") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class PromptRecord:
    messages: list[dict]  # the prompt, ending on a user turn or a tool result
    tools: list[dict] | None = None
    columns: dict[str, Any] = field(default_factory=dict)  # passed to the reward functions by name


def normalize_prompt(obj: Any) -> PromptRecord:
    if not isinstance(obj, dict):
        raise PromptError(f"line is a {type(obj).__name__}, not an object", "not_a_prompt_record")
    if "messages" in obj and "prompt" in obj:
        raise PromptError("both `messages` and `prompt`: give the prompt once", "ambiguous_prompt")
    if "messages" in obj:
        value, where = obj["messages"], "`messages`"
    elif "prompt" in obj:
        value, where = obj["prompt"], "`prompt`"
        if isinstance(value, str):
            if not value.strip():
                raise PromptError("`prompt` is empty", "empty_prompt")
            value = [{"role": "user", "content": value}]
    else:
        raise PromptError(f"no prompt (keys {sorted(obj)[:8]}); expected `messages` (chat) or `prompt`",
                          "not_a_prompt_record")
    if not isinstance(value, list) or not value:
        raise PromptError(f"{where} must be a non-empty list of messages", "invalid_messages")
    raw = {"messages": value, **{k: obj[k] for k in ("tools", "functions") if k in obj}}
    problem = training_problem(raw, require_assistant=False)
    if problem:
        raise PromptError(f"{where}: {problem}", record_problems(raw, require_assistant=False)[0].kind)
    example = training_example(raw)
    messages, tools = example["messages"], example.get("tools")
    columns = {k: v for k, v in obj.items() if k not in RESERVED_KEYS}
    if messages[-1]["role"] == "assistant":
        if "answer" in columns:
            raise PromptError(f"{where} ends with an assistant turn and the record has an `answer`: the reference "
                              "answer must be given once", "ambiguous_answer")
        last = messages.pop()
        if not messages:
            raise PromptError(f"{where} holds only an assistant turn: there is no prompt", "empty_prompt")
        columns["answer"] = last.get("content") or ""
        if last.get("tool_calls"):
            columns["tool_calls"] = last["tool_calls"]
    if messages[-1]["role"] not in ("user", "tool"):
        raise PromptError(f"{where} ends with a {messages[-1]['role']!r} turn; a prompt ends with the user's turn "
                          "(or a tool result)", "prompt_not_ending_with_user")
    return PromptRecord(messages, tools, columns)


def prompt_problem(obj: Any) -> str | None:
    """Why training refuses this prompt line, or None."""
    try:
        normalize_prompt(obj)
    except PromptError as exc:
        return str(exc)
    return None
