"""One chat schema: `data-prep validate` and `finetune train`'s reader give every line the same verdict."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from data_prep.build import build
from data_prep.validate import validate_file
from finetune.data.files import DataError, read_chat_jsonl

ASSISTANT = {"role": "assistant", "content": "It is sunny."}
LINES = [
    # 1: plain chat
    {"messages": [{"role": "user", "content": "Weather in Oslo?"}, ASSISTANT]},
    # 2: OpenAI's legacy function-calling role
    {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                  {"role": "function", "name": "weather", "content": "sunny"}, ASSISTANT]},
    # 3: a tool call and its result
    {"tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
     "messages": [{"role": "user", "content": "Weather in Lima?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, ASSISTANT]},
    # 4: the developer role of newer OpenAI models
    {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Weather?"}, ASSISTANT]},
    # 5: a role nobody knows
    {"messages": [{"role": "robot", "content": "beep"}, ASSISTANT]},
    # 6: function as the only other turn
    {"messages": [{"role": "function", "content": "sunny"}, ASSISTANT]},
]


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    return path


def test_validate_and_training_reader_agree_line_by_line(tmp_path: Path) -> None:
    path = _file(tmp_path)
    validate_bad = {e.line for e in validate_file(str(path)).errors}
    with pytest.raises(DataError) as exc:
        read_chat_jsonl(path)
    train_bad = {int(n) for n in re.findall(rf"{re.escape(str(path))}:(\d+):", str(exc.value))}
    assert validate_bad == train_bad == {2, 5, 6}


def test_function_role_is_refused_with_the_fix_by_both(tmp_path: Path) -> None:
    path = _file(tmp_path)
    errors = {e.line: e for e in validate_file(str(path)).errors}
    assert errors[2].kind == "unrecognized_role"
    assert "rename the role to 'tool'" in errors[2].detail
    with pytest.raises(DataError) as exc:
        read_chat_jsonl(path)
    assert f"{path}:2: message 1: 'function' is the legacy name of 'tool'; rename the role to 'tool'" in str(exc.value)
    assert f"{path}:5: message 0 needs a `role` in" in str(exc.value)


def test_build_keeps_tool_and_developer_and_rejects_function_with_the_fix(tmp_path: Path) -> None:
    src = _file(tmp_path)
    out = tmp_path / "out"
    build([str(src)], out, seed=0, val_fraction=0.0, test_fraction=0.0)
    kept = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert sorted(ex["meta"]["locator"] for ex in kept) == ["line=1", "line=3", "line=4"]
    rejects = {r["locator"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert rejects["line=2"] == "invalid_messages: message 1 has role 'function'; rename it to 'tool'"
    assert rejects["line=5"] == "invalid_messages: message 0 has role 'robot'"
    # what the build keeps, training reads
    assert len(read_chat_jsonl(out / "train.jsonl")) == 3


# ----------------------------------------------------------------------------------------------
# tool calling and weights: one fixture of valid and broken records, one verdict per line
# ----------------------------------------------------------------------------------------------
def _tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"{name} tool",
                                             "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}


def _call(cid: str, name: str, args: str = '{"x": "1"}') -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


USER = {"role": "user", "content": "Look it up."}
TOOLS = [_tool("lookup"), _tool("other")]
CALLS = {"role": "assistant", "content": None, "tool_calls": [_call("a", "lookup")]}
RESULT = {"role": "tool", "tool_call_id": "a", "content": "found"}
DONE = {"role": "assistant", "content": "Done."}
# line -> (record, the problem kinds `data-prep validate` reports; empty: it trains)
TOOL_LINES: list[tuple[dict, set[str]]] = [
    # 1: a call, its result, an answer
    ({"tools": TOOLS, "messages": [USER, CALLS, RESULT, DONE]}, set()),
    # 2: parallel calls (text before them), two results, an answer
    ({"tools": TOOLS, "parallel_tool_calls": True, "messages": [
        USER, {"role": "assistant", "content": "Checking.", "tool_calls": [_call("a", "lookup"), _call("b", "other")]},
        {"role": "tool", "tool_call_id": "b", "content": "B"}, {"role": "tool", "tool_call_id": "a", "content": "A"},
        DONE]}, set()),
    # 3: a weight-0 turn kept as context, a weight-1 turn trained
    ({"messages": [USER, {"role": "assistant", "content": "Wrong.", "weight": 0}, USER,
                   {"role": "assistant", "content": "Right.", "weight": 1}]}, set()),
    # 4: OpenAI's legacy function calling, read as tools / tool_calls
    ({"functions": [TOOLS[0]["function"]], "messages": [
        USER, {"role": "assistant", "content": None, "function_call": {"name": "lookup", "arguments": "{}"}},
        {"role": "function", "name": "lookup", "content": "found"}, DONE]}, set()),
    # 5: a tool result without tool_call_id answers the open call
    ({"tools": TOOLS, "messages": [USER, CALLS, {"role": "tool", "content": "found"}, DONE]}, set()),
    # 6: arguments that are not JSON
    ({"tools": TOOLS, "messages": [USER, {"role": "assistant", "content": None,
                                         "tool_calls": [_call("a", "lookup", '{"x": "1"')]}, RESULT, DONE]},
     {"invalid_tool_arguments"}),
    # 7: a call to a function `tools` does not declare
    ({"tools": TOOLS, "messages": [USER, {"role": "assistant", "content": None,
                                         "tool_calls": [_call("a", "delete_all")]}, RESULT, DONE]},
     {"undeclared_function"}),
    # 8: a tool result that answers no call
    ({"tools": TOOLS, "messages": [USER, {"role": "tool", "tool_call_id": "zz", "content": "?"}, DONE]},
     {"tool_without_call"}),
    # 9: a result naming a call that does not exist
    ({"tools": TOOLS, "messages": [USER, CALLS, {"role": "tool", "tool_call_id": "b", "content": "?"}, DONE]},
     {"tool_without_call"}),
    # 10: a weight outside {0, 1}
    ({"messages": [USER, {"role": "assistant", "content": "Hi.", "weight": 2}]}, {"invalid_weight"}),
    # 11: a weight on a user turn
    ({"messages": [{**USER, "weight": 1}, DONE]}, {"invalid_weight"}),
    # 12: every assistant turn has weight 0: nothing to train
    ({"messages": [USER, {"role": "assistant", "content": "Hi.", "weight": 0}]}, {"example_missing_assistant_message"}),
    # 13: arguments as an object, not the JSON string OpenAI's format has
    ({"tools": TOOLS, "messages": [USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "lookup", "arguments": {"x": "1"}}}]}, RESULT, DONE]},
     {"invalid_tool_arguments"}),
    # 14: a call in a record that declares no tools at all
    ({"messages": [USER, CALLS, RESULT, DONE]}, {"undeclared_function"}),
    # 15: `tools` that is not a list
    ({"tools": {"name": "lookup"}, "messages": [USER, DONE]}, {"invalid_tools"}),
    # 16: arguments that are JSON but not an object
    ({"tools": TOOLS, "messages": [USER, {"role": "assistant", "content": None,
                                         "tool_calls": [_call("a", "lookup", "[1, 2]")]}, RESULT, DONE]},
     {"invalid_tool_arguments"}),
    # 17: null content on an assistant turn that calls nothing
    ({"messages": [USER, {"role": "assistant", "content": None}]}, {"missing_content"}),
]


def _tool_file(tmp_path: Path) -> Path:
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(rec) + "\n" for rec, _ in TOOL_LINES))
    return path


def _lines_named(path: Path, text: str) -> set[int]:
    return {int(n) for n in re.findall(rf"{re.escape(str(path))}:(\d+):", text)}


def test_validate_training_reader_and_data_cache_agree_on_tool_calling_records(tmp_path, tiny_model) -> None:
    from finetune.config import load_config
    from finetune.data.cache import prepared_split
    from finetune.models.loading import load_tokenizer

    path = _tool_file(tmp_path)
    expected = {n for n, (_, kinds) in enumerate(TOOL_LINES, 1) if kinds}
    res = validate_file(str(path))
    kinds_by_line: dict[int, set[str]] = {}
    for e in res.errors:
        kinds_by_line.setdefault(e.line, set()).add(e.kind)
    assert kinds_by_line == {n: kinds for n, (_, kinds) in enumerate(TOOL_LINES, 1) if kinds}
    with pytest.raises(DataError) as reader:
        read_chat_jsonl(path)
    # `finetune train` reads through the data cache: the same lines, the same sentences.
    cfg = load_config(None, [f"model={tiny_model}", f"data.train={path}", f"output_dir={tmp_path / 'run'}",
                             "chat_template=chatml_tools"])
    with pytest.raises(DataError) as cache:
        prepared_split(cfg, load_tokenizer(str(tiny_model), chat_template="chatml_tools"), str(path))
    assert _lines_named(path, str(reader.value)) == _lines_named(path, str(cache.value)) == expected
    for line in (6, 7, 8, 10, 12):
        text = next(ln for ln in str(reader.value).splitlines() if f"{path}:{line}:" in ln)
        assert text in str(cache.value)
    said = str(reader.value)
    assert f"{path}:6: message 1: tool_calls[0]: arguments are not valid JSON" in said
    assert f"{path}:7: message 1: tool_calls[0] calls 'delete_all', which `tools` does not declare; add" in said
    assert f"{path}:10: message 1: weight is 2, must be 0 or 1" in said
    assert f"{path}:12: every assistant message has weight 0, nothing to train on" in said
    # The valid lines train, with their tool fields.
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(rec) + "\n" for rec, kinds in TOOL_LINES if not kinds))
    records = read_chat_jsonl(good)
    assert len(records) == 5 and validate_file(str(good)).ok
    assert records[0]["tools"] == TOOLS and records[0]["messages"][1]["tool_calls"] == CALLS["tool_calls"]
    assert records[0]["messages"][2]["tool_call_id"] == "a"
    assert records[2]["messages"][1]["weight"] == 0


def test_legacy_function_calling_is_read_as_tools_and_tool_calls(tmp_path: Path) -> None:
    from kitcore.schema import normalize_record

    legacy, _ = TOOL_LINES[3]
    new = normalize_record(legacy)
    assert "functions" not in new and new["tools"] == [{"type": "function", "function": TOOLS[0]["function"]}]
    call = new["messages"][1]
    assert "function_call" not in call
    assert call["tool_calls"] == [{"id": "call_0", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]
    assert new["messages"][2] == {"role": "tool", "name": "lookup", "content": "found", "tool_call_id": "call_0"}
    assert legacy["messages"][1]["function_call"]  # the caller's record is not modified
    path = tmp_path / "legacy.jsonl"
    path.write_text(json.dumps(legacy) + "\n")
    res = validate_file(str(path))
    assert res.ok and {w.kind for w in res.warnings} == {"no_system_message", "legacy_function_calling"}
    assert read_chat_jsonl(path)[0]["messages"][1]["tool_calls"][0]["function"]["name"] == "lookup"
    # What data-prep build writes is the current form, so the file on disk is the one that trains.
    out = tmp_path / "out"
    build([str(path)], out, seed=0, val_fraction=0.0, test_fraction=0.0)
    written = json.loads((out / "train.jsonl").read_text())
    assert "functions" not in written and written["tools"][0]["function"]["name"] == "lookup"
    assert written["messages"][2]["role"] == "tool" and written["messages"][2]["tool_call_id"] == "call_0"
