"""The reward functions of `method: grpo`, from the config's `grpo.rewards` (finetune.methods.grpo).

Each is a callable with TRL's reward signature,

    f(prompts, completions, completion_ids, **columns) -> [float | None per completion]

where `columns` are the prompt records' other keys (`answer`, `tool_calls`, `tools`, `tests`, ...),
one value per completion. None means "not applicable" (TRL leaves it out of that function's mean).

Built-ins:
    exact_match     1 when the completion's answer equals the reference (`answer`), else 0. Both are
                    normalised (Unicode NFKC, case, whitespace, trailing punctuation); two numbers are
                    equal when their values are ("$1,299.00" = "1299"). `extract` (a regex) picks the
                    answer out of the completion: its last match, first group.
    regex           1 when the completion contains `pattern` (the whole of it with full_match), else 0.
    json_schema     1 when the completion (inside a ```json fence or not) parses as JSON and, with a
                    `schema` (in the config, or per record in `column`), satisfies it; else 0.
    tool_call       1 when the completion's tool calls (the kit's parser: <tool_call> blocks, or one JSON
                    call) are the reference's (`tool_calls`: the same functions with the same arguments,
                    in any order), each to a function the record declares (`tools`, when it has them); else 0.
    length_penalty  DAPO's soft over-length punishment: 0 up to max_completion_length - soft_tokens tokens,
                    then falling linearly to -1 at max_completion_length.
    module:function any Python function with the signature above (imported from the working directory
                    or the installed packages).

A function that raises, or returns something that is not a number, on some completions does not stop
the run: the batch is scored again one completion at a time, and each failing completion gets the
spec's `on_error` score; the failures are counted per function and reason (`Reward.errors`), logged
each step (`rewards/<name>/errors`) and kept in run.json.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable
from typing import Any

from finetune.eval.metrics import call_key, same_calls, same_number

__all__ = ["RECORD_KEY", "Reward", "build_rewards", "completion_text", "completion_tool_calls", "normalize_answer", "same_answer"]

logger = logging.getLogger(__name__)

# The key of the reward functions in an exported model's finetune.json: what `finetune eval` scores with.
RECORD_KEY = "rewards"

# The keys TRL passes to every reward function beside the records' columns.
_TRL_EXTRA = ("trainer_state", "log_extra", "log_metric", "environments")


# ---- reading completions ----
def completion_text(completion: Any) -> str:
    """The generated text: a string (TRL's standard format) or the assistant messages' contents
    (conversational prompts)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))


def _call_pair(call: Any) -> tuple[str, Any] | None:
    """(name, parsed arguments) of a call in OpenAI's form or the kit's {name, arguments}, as `finetune
    eval`'s tool-call metric reads calls (finetune.eval.metrics.call_key); None unless the arguments are
    a JSON object."""
    if not isinstance(call, dict):
        return None
    fn = call.get("function", call)
    if not isinstance(fn, dict):
        return None
    key = call_key({"function": {"name": fn.get("name"), "arguments": fn.get("arguments", fn.get("parameters", {}))}})
    return key if key is not None and isinstance(key[1], dict) else None


def completion_tool_calls(completion: Any) -> list[tuple[str, Any]] | None:
    """The completion's tool calls as (name, parsed arguments), or None when a call block does not
    parse. Calls the trainer already parsed (messages' `tool_calls`) are used as they are; else the
    text is read by the kit's parser (finetune.data.chat_template.parse_tool_calls)."""
    messages = completion if isinstance(completion, list) else [completion] if isinstance(completion, dict) else []
    parsed = [c for m in messages if isinstance(m, dict) for c in (m.get("tool_calls") or [])]
    if parsed:
        pairs = [_call_pair(c) for c in parsed]
        return None if None in pairs else pairs
    from finetune.data.chat_template import parse_tool_calls

    reply = parse_tool_calls(completion_text(completion))
    if reply.invalid:
        return None
    pairs = [_call_pair(c) for c in reply.tool_calls]
    return None if None in pairs else pairs


# ---- comparing answers ----
def normalize_answer(text: Any) -> str:
    s = unicodedata.normalize("NFKC", str(text)).casefold()
    s = re.sub(r"\s+", " ", s).strip()
    return s.strip(" .!?;:,'\"`")


def same_answer(got: Any, want: Any) -> bool:
    a, b = normalize_answer(got), normalize_answer(want)
    if a == b:
        return True
    return bool(same_number(a, b))  # the same numbers as `finetune eval`'s exact match


def _column(columns: dict[str, list], name: str, i: int) -> Any:
    if name not in columns:
        raise KeyError(f"the prompt records have no {name!r} column")
    value = columns[name][i]
    if value is None:
        raise KeyError(f"this prompt record has no {name!r}")
    return value


# ---- the built-ins: each returns a per-completion scorer (completion, its ids, columns, index) -> float ----
def _exact_match(spec, room: int) -> Callable:
    column = spec.column or "answer"
    extract = re.compile(spec.extract) if spec.extract else None

    def score(completion, ids, columns, i) -> float:
        want = _column(columns, column, i)
        text = completion_text(completion)
        if extract is not None:
            found = list(extract.finditer(text))
            if not found:
                return 0.0
            last = found[-1]
            text = last.group(1) if last.groups() else last.group(0)
        return 1.0 if same_answer(text, want) else 0.0
    return score


def _regex(spec, room: int) -> Callable:
    pattern = re.compile(spec.pattern)

    def score(completion, ids, columns, i) -> float:
        text = completion_text(completion).strip()
        hit = pattern.fullmatch(text) if spec.full_match else pattern.search(text)
        return 1.0 if hit else 0.0
    return score


_FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.S)


def _json_schema(spec, room: int) -> Callable:
    import jsonschema

    fixed = spec.schema_

    def score(completion, ids, columns, i) -> float:
        text = completion_text(completion).strip()
        fenced = _FENCE.search(text)
        try:
            value = json.loads(fenced.group(1) if fenced else text)
        except json.JSONDecodeError:
            return 0.0
        schema = fixed
        if schema is None and spec.column:
            schema = _column(columns, spec.column, i)
            if isinstance(schema, str):
                schema = json.loads(schema)
        if schema is None:
            return 1.0
        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError:
            return 0.0
        return 1.0
    return score


def _tool_call(spec, room: int) -> Callable:
    column = spec.column or "tool_calls"

    def score(completion, ids, columns, i) -> float:
        want = [_call_pair(c) for c in _column(columns, column, i)]
        if None in want:
            raise ValueError(f"the record's {column!r} holds a call that is not {{name, arguments}}")
        got = completion_tool_calls(completion)
        if not got:
            return 0.0
        tools = columns.get("tools", [None] * (i + 1))[i]
        if tools:
            declared = {(t.get("function") or t).get("name") for t in tools if isinstance(t, dict)}
            if any(name not in declared for name, _ in got):
                return 0.0
        return 1.0 if same_calls(got, want) else 0.0
    return score


def _length_penalty(spec, room: int) -> Callable:
    soft = spec.soft_tokens or max(1, room // 4)
    if soft > room:
        raise ValueError(f"soft_tokens ({soft}) is more than grpo.max_completion_length ({room})")

    def score(completion, ids, columns, i) -> float:
        n = len(ids)
        if n <= room - soft:
            return 0.0
        return max(-1.0, (room - soft - n) / soft)
    return score


BUILTINS = {"exact_match": _exact_match, "regex": _regex, "json_schema": _json_schema, "tool_call": _tool_call,
            "length_penalty": _length_penalty}


def _per_completion(scorer: Callable) -> Callable:
    """A batch function (TRL's signature) from a per-completion scorer."""
    def batch(prompts, completions, completion_ids, **columns):
        return [scorer(c, ids, columns, i) for i, (c, ids) in enumerate(zip(completions, completion_ids))]
    return batch


def _import(path: str) -> Callable:
    module, _, name = path.partition(":")
    if os.getcwd() not in sys.path:  # `accelerate launch` puts the launcher's directory first, not the user's
        sys.path.append(os.getcwd())
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise TypeError(f"{path} is a {type(fn).__name__}, not a function")
    return fn


class Reward:
    """One configured reward function, with TRL's reward signature (its __name__ is its log name),
    that never raises on a completion: see the module docstring."""

    def __init__(self, label: str, fn: Callable, on_error: float = 0.0):
        self.__name__ = label
        self.fn = fn
        self.on_error = float(on_error)
        self.errors: Counter = Counter()  # reason -> completions, since the last take_errors()
        self.total_errors: Counter = Counter()  # reason -> completions, the whole run

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float | None]:
        n = len(completions)
        try:
            return self._checked(self.fn(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                         **kwargs), n)
        except Exception:  # noqa: BLE001 - scored one by one below, each failure counted
            pass
        out: list[float | None] = []
        for i in range(n):
            one = {k: (v[i:i + 1] if k not in _TRL_EXTRA and isinstance(v, list) and len(v) == n else v)
                   for k, v in kwargs.items()}
            try:
                out.extend(self._checked(self.fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                                                 completion_ids=completion_ids[i:i + 1], **one), 1))
            except Exception as exc:  # noqa: BLE001
                self._failed(f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}".rstrip(": "))
                out.append(self.on_error)
        return out

    def _checked(self, values: Any, n: int) -> list[float | None]:
        values = list(values)
        if len(values) != n:
            raise ValueError(f"returned {len(values)} rewards for {n} completions")
        out = []
        for v in values:
            if v is None:
                out.append(None)
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
                raise TypeError(f"returned {type(v).__name__} {v!r}, not a number")
            f = float(v)
            if not math.isfinite(f):
                raise ValueError(f"returned {f}")
            out.append(f)
        return out

    def _failed(self, reason: str) -> None:
        if not self.total_errors[reason]:
            logger.warning("reward %s failed on a completion (%s): scored %s, counted in rewards/%s/errors",
                           self.__name__, reason, self.on_error, self.__name__)
        self.errors[reason] += 1
        self.total_errors[reason] += 1

    def take_errors(self) -> int:
        """Failed completions since the last call (this process)."""
        n = sum(self.errors.values())
        self.errors.clear()
        return n


def build_rewards(specs, max_completion_length: int) -> list[Reward]:
    """The configured reward functions (grpo.rewards); a function that cannot be imported or built
    is a ConfigError naming its key."""
    from finetune.config import ConfigError

    rewards = []
    for i, spec in enumerate(specs):
        key = f"grpo.rewards[{i}].type"
        try:
            if spec.type in BUILTINS:
                fn = _per_completion(BUILTINS[spec.type](spec, max_completion_length))
            else:
                fn = _import(spec.type)
        except (ImportError, AttributeError, TypeError, ValueError) as exc:
            raise ConfigError("grpo config", [(key, f"{spec.type}: {type(exc).__name__}: {exc}")]) from None
        rewards.append(Reward(spec.label, fn, spec.on_error))
    return rewards
