"""The chat record schema: one line of chat JSONL, as OpenAI's chat fine-tuning format defines it.

    {"messages": [{"role": "system" | "user" | "assistant" | "tool" | "developer",
                   "content": str (null on an assistant turn that only calls tools),
                   "name": str, "weight": 0 | 1 (assistant turns only),
                   "tool_calls": [{"id": str, "type": "function",
                                   "function": {"name": str, "arguments": "<a JSON object, as a string>"}}],
                   "tool_call_id": str (tool messages: the call they answer)}, ...],
     "tools": [{"type": "function", "function": {"name": str, "description": str, "parameters": {...}}}],
     "parallel_tool_calls": bool}

OpenAI's legacy function calling (top-level `functions`, an assistant `function_call`, a `function`
message answering it) is read and rewritten into that form by `normalize_record`.

`finetune train` reads it through `training_problem` (the first problem of a line stops it) and
`data-prep validate` through `record_problems` (every problem of every line, with a kind to count
by), so a file that validates is a file that trains. Validate is stricter in two ways only (see
`cookbook`); it never passes a line that training refuses. `training_example` is the form both
the training reader and the data cache hand to the chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["MESSAGE_KEYS", "ROLES", "RENAMED_ROLES", "Problem", "normalize_record", "record_problems",
           "training_example", "training_problem", "uses_tools"]

# The roles of OpenAI's chat format that Hugging Face chat templates render.
ROLES = ("system", "user", "assistant", "tool", "developer")
# OpenAI's deprecated function-calling role. A `function` message that answers a legacy
# `function_call` is rewritten into a `tool` message (normalize_record); one that answers nothing
# is refused with this fix rather than guessed at.
RENAMED_ROLES = {"function": "tool"}
# The message keys of OpenAI's chat fine-tuning format (what `data-prep validate` does not flag).
MESSAGE_KEYS = ("role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call")
# The kinds of problem that are about role and content (training states them in one sentence).
_SHAPE_KINDS = ("data_type", "message_missing_key", "unrecognized_role", "missing_content")


@dataclass(frozen=True)
class Problem:
    """One reason a record cannot be trained on.

    `kind` is the vocabulary of OpenAI's chat-format checker, plus the tool-calling kinds
    (`invalid_tools`, `invalid_tool_call`, `invalid_tool_arguments`, `undeclared_function`,
    `tool_without_call`, `invalid_weight`); it is what `data-prep validate` counts. `detail` says
    where and, when there is one, `fix` what to change.
    """

    kind: str
    detail: str = ""
    message: int | None = None  # index of the offending message, None for the record as a whole
    fix: str = ""  # what to change, when the problem has one obvious fix


# ----------------------------------------------------------------------------------------------
# legacy function calling -> tools / tool_calls
# ----------------------------------------------------------------------------------------------
def _is_legacy(obj: dict) -> bool:
    msgs = obj.get("messages")
    return "functions" in obj or (isinstance(msgs, list) and any(
        isinstance(m, dict) and ("function_call" in m or m.get("role") == "function") for m in msgs))


def normalize_record(obj: Any) -> Any:
    """`obj` with OpenAI's legacy function calling rewritten as tools and tool calls; `obj` itself
    (not a copy) when there is nothing legacy in it, or when it is not a record at all.

    `functions: [f]` -> `tools: [{"type": "function", "function": f}]`; an assistant's
    `function_call: {name, arguments}` -> `tool_calls: [{"id": "call_N", "type": "function",
    "function": {name, arguments}}]`; a `function` message right after such a call (the legacy
    pairing) -> a `tool` message with that call's `tool_call_id`. A `function` message that answers
    no call keeps its role, so that the schema refuses it with the fix.
    """
    if not isinstance(obj, dict) or not _is_legacy(obj):
        return obj
    out = dict(obj)
    functions = out.pop("functions", None)
    if isinstance(functions, list):
        tools = list(out.get("tools") or []) if isinstance(out.get("tools"), list) else []
        tools += [{"type": "function", "function": f} for f in functions]
        out["tools"] = tools
    elif functions is not None:
        out["functions"] = functions  # not a list: left for the schema to name
    msgs = out.get("messages")
    if not isinstance(msgs, list):
        return out
    new_msgs: list[Any] = []
    pending: str | None = None  # id of the legacy call the next `function` message answers
    n_calls = 0
    for m in msgs:
        if not isinstance(m, dict):
            new_msgs.append(m)
            continue
        m = dict(m)
        call = m.get("function_call")
        if call is not None and m.get("role") == "assistant" and "tool_calls" not in m:
            del m["function_call"]
            pending = f"call_{n_calls}"
            n_calls += 1
            m["tool_calls"] = [{"id": pending, "type": "function", "function": call}]
        elif m.get("role") == "function" and pending is not None:
            m["role"] = "tool"
            m["tool_call_id"] = pending
            pending = None
        new_msgs.append(m)
    out["messages"] = new_msgs
    return out


def uses_tools(messages: list[dict], tools: list | None = None) -> bool:
    """Whether rendering this conversation needs a template that renders tool calling."""
    return bool(tools) or any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool")
                              for m in messages)


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------
def _role_problem(i: int, role: Any) -> Problem | None:
    if role in ROLES:
        return None
    if isinstance(role, str) and role in RENAMED_ROLES:
        new = RENAMED_ROLES[role]
        fix = f"{role!r} is the legacy name of {new!r}; rename the role to {new!r}"
        return Problem("unrecognized_role", f"message {i}: {role!r}", i, fix)
    return Problem("unrecognized_role", f"message {i}: {role!r}", i)


def _tools_problems(obj: dict) -> tuple[list[Problem], set[str]]:
    """Problems of the top-level `tools` / `parallel_tool_calls`, and the declared function names."""
    problems: list[Problem] = []
    names: set[str] = set()
    if "functions" in obj:  # left by normalize_record only when it is not a list
        problems.append(Problem("invalid_tools", "`functions` is not a list", None,
                                "give `tools` as a list of {\"type\": \"function\", \"function\": {...}}"))
    if "parallel_tool_calls" in obj and not isinstance(obj["parallel_tool_calls"], bool):
        problems.append(Problem("invalid_tools", "`parallel_tool_calls` is not true or false"))
    tools = obj.get("tools")
    if tools is None:
        return problems, names
    if not isinstance(tools, list):
        return problems + [Problem("invalid_tools", f"`tools` is a {type(tools).__name__}, not a list")], names
    for k, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            problems.append(Problem("invalid_tools", f"tools[{k}] is not {{\"type\": \"function\", \"function\": "
                                    "{\"name\": ..., \"parameters\": ...}}"))
        elif not isinstance(fn.get("name"), str) or not fn["name"]:
            problems.append(Problem("invalid_tools", f"tools[{k}].function has no `name`"))
        elif "parameters" in fn and not isinstance(fn["parameters"], dict):
            problems.append(Problem("invalid_tools", f"tools[{k}].function.parameters is not an object"))
        else:
            names.add(fn["name"])
    return problems, names


def _tool_call_problems(i: int, calls: Any, declared: set[str], has_tools: bool,
                        seen_ids: set[str]) -> tuple[list[Problem], list[str]]:
    """Problems of one assistant message's `tool_calls`, and the ids it opens."""
    if not isinstance(calls, list) or not calls:
        return [Problem("invalid_tool_call", f"message {i}: `tool_calls` is not a non-empty list", i)], []
    problems: list[Problem] = []
    ids: list[str] = []
    for k, call in enumerate(calls):
        where = f"message {i}: tool_calls[{k}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(fn, dict):
            problems.append(Problem("invalid_tool_call", f"{where} is not {{\"id\", \"type\": \"function\", "
                                    "\"function\": {\"name\", \"arguments\"}}", i))
            continue
        cid = call.get("id")
        if not isinstance(cid, str) or not cid:
            problems.append(Problem("invalid_tool_call", f"{where} has no `id`", i,
                                    "give every call an id (the tool message answering it names it in "
                                    "`tool_call_id`)"))
        elif cid in seen_ids or cid in ids:
            problems.append(Problem("invalid_tool_call", f"{where}: id {cid!r} is used twice", i))
        else:
            ids.append(cid)
        if call.get("type", "function") != "function":
            problems.append(Problem("invalid_tool_call", f"{where}: type is {call.get('type')!r}, not 'function'", i))
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            problems.append(Problem("invalid_tool_call", f"{where}: function has no `name`", i))
        elif name not in declared:
            problems.append(Problem(
                "undeclared_function", f"{where} calls {name!r}, which `tools` does not declare"
                + ("" if has_tools else " (the record has no `tools`)"), i,
                f"add the schema of {name!r} to the record's `tools`"))
        args = fn.get("arguments")
        if not isinstance(args, str):
            problems.append(Problem("invalid_tool_arguments", f"{where}: arguments is a {type(args).__name__}", i,
                                    "give `arguments` as a JSON object serialized to a string"))
            continue
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError as exc:
            problems.append(Problem("invalid_tool_arguments",
                                    f"{where}: arguments are not valid JSON ({exc.msg} at column {exc.colno})", i))
            continue
        if not isinstance(parsed, dict):
            problems.append(Problem("invalid_tool_arguments",
                                    f"{where}: arguments are a JSON {type(parsed).__name__}, not an object", i))
    return problems, ids


def record_problems(obj: Any, *, require_assistant: bool = True, cookbook: bool = False) -> list[Problem]:
    """Every problem of one parsed JSONL line, in message order; empty when it can be trained on.

    Legacy function calling is read as normalize_record rewrites it. `cookbook=True` (`data-prep
    validate`) adds the two checks of OpenAI's format checker that training does not need: keys
    other than MESSAGE_KEYS, and empty content.
    """
    if not isinstance(obj, dict):
        return [Problem("data_type", f"line is a {type(obj).__name__}, not an object")]
    obj = normalize_record(obj)
    messages = obj.get("messages")
    if not messages:
        return [Problem("missing_messages_list", "no `messages` or it is empty")]
    if not isinstance(messages, list):
        return [Problem("data_type", "`messages` is not a list")]
    problems, declared = _tools_problems(obj)
    has_tools = isinstance(obj.get("tools"), list)
    pending: list[str] = []  # ids of tool calls not answered yet, in call order
    seen_ids: set[str] = set()
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            problems.append(Problem("data_type", f"message {i} is not an object", i))
            continue
        role = m.get("role")
        calls = m.get("tool_calls")
        # An assistant turn that only calls tools has no text: OpenAI writes `"content": null`.
        content_optional = role == "assistant" and calls is not None
        if "role" not in m or ("content" not in m and not content_optional):
            missing = "role" if "role" not in m else "content"
            problems.append(Problem("message_missing_key", f"message {i} has no {missing}", i))
        extra = [str(k) for k in m if k not in MESSAGE_KEYS]
        if cookbook and extra:
            problems.append(Problem("message_unrecognized_key", f"message {i}: {', '.join(extra)}", i))
        if "role" in m:
            bad_role = _role_problem(i, role)
            if bad_role:
                problems.append(bad_role)
        content = m.get("content")
        if content_optional and content is None:
            pass
        elif not isinstance(content, str):
            problems.append(Problem("missing_content", f"message {i}: content is {type(content).__name__}", i))
        elif cookbook and not content and not calls:
            problems.append(Problem("missing_content", f"message {i}: content is empty", i))
        if "name" in m and not isinstance(m["name"], str):
            problems.append(Problem("data_type", f"message {i}: name is {type(m['name']).__name__}", i))
        if "weight" in m:
            w = m["weight"]
            if role != "assistant":
                problems.append(Problem("invalid_weight", f"message {i}: a weight on a {role} message", i,
                                        "remove it: only assistant turns are trained, so only they take a weight"))
            elif isinstance(w, bool) or w not in (0, 1):
                problems.append(Problem("invalid_weight", f"message {i}: weight is {w!r}, must be 0 or 1", i,
                                        "use 0 (keep the turn as context, do not train it) or 1 (train it)"))
        if calls is not None:
            if role != "assistant":
                problems.append(Problem("invalid_tool_call", f"message {i}: `tool_calls` on a {role} message", i))
            else:
                call_problems, ids = _tool_call_problems(i, calls, declared, has_tools, seen_ids)
                problems += call_problems
                pending += ids
                seen_ids.update(ids)
        if role == "tool":
            cid = m.get("tool_call_id")
            if cid is None and pending:
                pending.pop(0)  # no id: it answers the oldest open call, in order
            elif isinstance(cid, str) and cid in pending:
                pending.remove(cid)
            elif cid is None:
                problems.append(Problem("tool_without_call", f"message {i}: a tool result that answers no call", i,
                                        "put the assistant message with the `tool_calls` it answers before it"))
            else:
                problems.append(Problem(
                    "tool_without_call", f"message {i}: tool_call_id {cid!r} answers no earlier, unanswered call", i,
                    "set `tool_call_id` to the `id` of the call it answers"))
    if require_assistant:
        assistants = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
        if not assistants:
            problems.append(Problem("example_missing_assistant_message", ""))
        elif all(m.get("weight", 1) == 0 for m in assistants):
            problems.append(Problem("example_missing_assistant_message",
                                    "every assistant message has weight 0, nothing to train on", None,
                                    "give at least one assistant message weight 1 (or drop the weight)"))
    return problems


def training_problem(obj: Any, *, require_assistant: bool = True) -> str | None:
    """Why training refuses this line (its first problem, as one sentence), or None."""
    problems = record_problems(obj, require_assistant=require_assistant)
    if not problems:
        return None
    p = problems[0]
    if p.kind == "example_missing_assistant_message":
        return f"{p.detail}; {p.fix}" if p.detail else "no assistant message, nothing to train on"
    if p.kind in ("data_type", "missing_messages_list") and p.message is None:
        return "expected an object with a non-empty `messages` list"
    if p.kind in _SHAPE_KINDS and p.message is not None:
        if p.fix:
            return f"message {p.message}: {p.fix}"
        return f"message {p.message} needs a `role` in {sorted(ROLES)} and a string `content`"
    return f"{p.detail}; {p.fix}" if p.fix else p.detail


def training_example(obj: dict) -> dict[str, Any]:
    """What the chat template is given for a record that has no problem: `messages` with only
    the schema's keys (legacy function calling rewritten; no `function_call` left), and `tools`
    when the record declares any."""
    obj = normalize_record(obj)
    keep = [k for k in MESSAGE_KEYS if k != "function_call"]
    messages = [{k: m[k] for k in keep if k in m} for m in obj["messages"]]
    for m in messages:
        m.setdefault("content", None)
    example: dict[str, Any] = {"messages": messages}
    if obj.get("tools"):
        example["tools"] = obj["tools"]
    return example
