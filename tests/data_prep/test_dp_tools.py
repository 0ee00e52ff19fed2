"""Tool calling through data-prep: readers keep it (OpenAI, ShareGPT function-call turns, mapped
columns), redaction keeps arguments valid JSON, dedup and the split see the calls, and what the
build writes is what training reads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from dp_fixtures import read_jsonl

from data_prep.build import build
from data_prep.convert import ColumnMapping, RowError, convert_row
from data_prep.steps.redact import redact_arguments
from finetune.data.files import read_chat_jsonl

WEATHER = {"name": "weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SEND = {"name": "send_email", "description": "Send an email",
        "parameters": {"type": "object", "properties": {"to": {"type": "string"}, "body": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": SEND}]


def _build(tmp_path: Path, *sources: Path, **kw) -> tuple[dict, Path]:
    out = tmp_path / "out"
    report = build([str(s) for s in sources], out, seed=0, val_fraction=0.0, test_fraction=0.0, **kw)
    return report, out


def _chat(city: str, k: int = 0) -> dict:
    call = {"id": f"c{k}", "type": "function", "function": {"name": "weather", "arguments": json.dumps({"city": city})}}
    return {"tools": TOOLS, "parallel_tool_calls": False, "messages": [
        {"role": "user", "content": f"What is the weather like in {city} today?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": f"c{k}", "content": f"sunny in {city}"},
        {"role": "assistant", "content": f"It is sunny in {city}.", "weight": 1}]}


def test_openai_tool_records_keep_every_field_through_the_build(tmp_path: Path) -> None:
    src = tmp_path / "chats.jsonl"
    src.write_text(json.dumps(_chat("Oslo")) + "\n" + json.dumps(_chat("Lima", 1)) + "\n")
    report, out = _build(tmp_path, src)
    assert report["counts"]["train"] == 2
    first = read_jsonl(out / "train.jsonl")[0]
    original = _chat("Oslo")
    assert first["tools"] == TOOLS and first["parallel_tool_calls"] is False
    assert first["messages"] == original["messages"]
    # What the build writes, training reads: tools, the call, the result's id and the weight.
    records = read_chat_jsonl(out / "train.jsonl")
    assert records[0]["tools"] == TOOLS and records[0]["messages"] == original["messages"]


def test_broken_tool_records_are_rejected_with_the_schemas_reason(tmp_path: Path) -> None:
    bad_args = _chat("Oslo")
    bad_args["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"city": '
    undeclared = _chat("Lima")
    undeclared["messages"][1]["tool_calls"][0]["function"]["name"] = "rm_rf"
    orphan = _chat("Cork")
    orphan["messages"][2]["tool_call_id"] = "nobody"
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in (bad_args, undeclared, orphan, _chat("Riga"))))
    report, out = _build(tmp_path, src)
    reasons = {r["locator"]: r["reason"] for r in read_jsonl(out / "rejects.jsonl")}
    assert reasons["line=1"].startswith("invalid_tool_arguments: message 1: tool_calls[0]: arguments are not valid JSON")
    assert reasons["line=2"].startswith("undeclared_function: message 1: tool_calls[0] calls 'rm_rf'")
    assert reasons["line=3"].startswith("tool_without_call: message 2: tool_call_id 'nobody'")
    assert report["counts"]["train"] == 1 and report["accounting"]["balanced"]


SHAREGPT = {
    # LLaMA-Factory's `sharegpt` tool format (as in glaive- and xLAM-derived function-calling sets):
    # `tools` is a JSON string of bare function schemas, a call is a JSON {name, arguments} turn.
    "conversations": [
        {"from": "human", "value": "Email bob@example.com that it rains in Oslo."},
        {"from": "gpt", "value": "Let me check the weather first."},
        {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": json.dumps({"condition": "rain"})},
        {"from": "function_call", "value": json.dumps({"name": "send_email", "arguments": {
            "to": "bob@example.com", "body": "It rains in Oslo."}})},
        {"from": "observation", "value": "sent"},
        {"from": "gpt", "value": "Done: Bob knows it rains in Oslo."},
    ],
    "system": "You are a helpful assistant.",
    "tools": json.dumps([WEATHER, SEND]),
}


def test_sharegpt_function_call_and_observation_turns_become_tool_calls(tmp_path: Path) -> None:
    conv = convert_row(SHAREGPT, ColumnMapping(), strict_types=True)
    assert conv.tools == TOOLS
    roles = [m["role"] for m in conv.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    first_call = conv.messages[2]
    assert first_call["content"] == "Let me check the weather first."  # the text said before calling
    assert first_call["tool_calls"] == [{"id": "call_0", "type": "function",
                                         "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]
    assert conv.messages[3] == {"role": "tool", "content": '{"condition": "rain"}', "tool_call_id": "call_0"}
    assert conv.messages[4]["content"] is None and conv.messages[5]["tool_call_id"] == "call_1"
    # Through the build (redaction on): the call's arguments stay JSON, the e-mail is redacted in them.
    src = tmp_path / "sharegpt.json"
    src.write_text(json.dumps([SHAREGPT]))
    report, out = _build(tmp_path, src)
    (written,) = read_jsonl(out / "train.jsonl")
    args = json.loads(written["messages"][4]["tool_calls"][0]["function"]["arguments"])
    assert args == {"to": "[EMAIL]", "body": "It rains in Oslo."}
    assert report["pii"]["email"] == 2  # the user turn and the call's arguments
    assert read_chat_jsonl(out / "train.jsonl")[0]["tools"] == TOOLS
    # A call to a function the row's `tools` does not declare is a reject with its reason.
    bad = {**SHAREGPT, "tools": json.dumps([WEATHER])}
    try:
        convert_row(bad, ColumnMapping(), strict_types=True)
    except RowError as err:
        assert str(err).startswith("undeclared_function: message 4: tool_calls[0] calls 'send_email'")
    else:
        raise AssertionError("an undeclared call was accepted")


def test_redaction_never_breaks_the_json_of_arguments() -> None:
    from collections import Counter

    tricky = json.dumps({"to": "a.b@example.org", "note": 'call "+1 415-555-0100", "quoted", {braces}',
                         "nested": [{"ip": "10.0.0.7"}, 4, None, True], "card": "4111 1111 1111 1111"})
    counts: Counter = Counter()
    out = redact_arguments(tricky, counts=counts)
    parsed = json.loads(out)  # still valid JSON
    assert parsed == {"to": "[EMAIL]", "note": 'call "[PHONE]", "quoted", {braces}',
                      "nested": [{"ip": "[IP]"}, 4, None, True], "card": "[CARD]"}
    assert counts == Counter(email=1, phone=1, ip=1, card=1)
    clean = '{"city":"Oslo"}'
    assert redact_arguments(clean) == clean  # unchanged arguments keep their bytes (no re-serialization)


def test_dedup_and_the_split_see_the_tool_calls(tmp_path: Path) -> None:
    ask = {"role": "user", "content": "Please do the thing for the Oslo office right now."}

    def calling(name: str, args: dict) -> dict:
        return {"tools": TOOLS, "messages": [ask, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}]}

    rows = [calling("weather", {"city": "Oslo"}), calling("send_email", {"to": "oslo", "body": "hi"}),
            calling("weather", {"city": "Oslo"})]
    src = tmp_path / "calls.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report, out = _build(tmp_path, src, dedup={"near": False})
    # Same prompt, different calls: two examples; the same call again: a duplicate.
    assert report["counts"]["train"] == 2
    assert [r["reason"].split(" of ")[0] for r in read_jsonl(out / "rejects.jsonl")] == ["duplicate"]
    # The split counts call-only turns as assistant turns (not as empty ones).
    assert report["lengths"]["train"]["min"] > len(ask["content"].split())


def test_csv_columns_map_tools_and_the_call_the_answer_makes(tmp_path: Path) -> None:
    src = tmp_path / "calls.csv"
    with src.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "functions", "expected_call"])
        w.writerow(["Weather in Lima?", json.dumps([WEATHER]), json.dumps({"name": "weather", "arguments": {"city": "Lima"}})])
        w.writerow(["Weather in Cork?", json.dumps([WEATHER]), '{"name": "weather", "arguments": '])
    from data_prep.build import run_recipe
    from data_prep.recipe import validate_recipe

    out = tmp_path / "out"
    report = run_recipe(validate_recipe({
        "sources": [{"path": str(src), "columns": {"tools": "functions", "tool_calls": "expected_call"}}],
        "output_dir": str(out), "split": {"val_fraction": 0.0, "test_fraction": 0.0}}))
    assert report["counts"]["train"] == 1
    (row,) = read_jsonl(out / "train.jsonl")
    assert row["tools"] == [{"type": "function", "function": WEATHER}]
    assert row["messages"][-1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Lima"}'}}]}
    (rej,) = read_jsonl(out / "rejects.jsonl")
    assert rej["reason"].startswith("invalid_tool_call: column 'expected_call' is not valid JSON")
    assert len(read_chat_jsonl(out / "train.jsonl")) == 1
    # Default column names need no mapping: a JSONL row with `tools` and `tool_calls` columns.
    conv = convert_row({"question": "Weather in Oslo?", "tools": [WEATHER],
                        "tool_calls": [{"name": "weather", "arguments": {"city": "Oslo"}}]}, ColumnMapping(), True)
    assert conv.tool_calls[0]["function"]["arguments"] == '{"city": "Oslo"}' and conv.answer == ""


def test_sharegpt_results_answer_the_calls_of_the_latest_calling_turn() -> None:
    # Round 1 calls two functions and gets one combined observation; round 2 calls one. The
    # second observation answers round 2's call, not the call round 1 left unanswered.
    row = {"tools": [WEATHER, SEND], "conversations": [
        {"from": "human", "value": "Weather in Oslo and Lima?"},
        {"from": "function_call", "value": json.dumps([{"name": "weather", "arguments": {"city": "Oslo"}},
                                                       {"name": "weather", "arguments": {"city": "Lima"}}])},
        {"from": "observation", "value": json.dumps([{"city": "Oslo", "c": "rain"}, {"city": "Lima", "c": "sun"}])},
        {"from": "gpt", "value": "Rain in Oslo, sun in Lima."},
        # role/content turns, as some ShareGPT exports write them
        {"role": "human", "content": "Mail that to bob@example.com."},
        {"role": "function_call", "content": json.dumps({"name": "send_email", "arguments": {
            "to": "bob@example.com", "body": "Rain in Oslo, sun in Lima."}})},
        {"role": "observation", "content": "sent"},
        {"role": "gpt", "content": "Sent."}]}
    conv = convert_row(row, ColumnMapping(), strict_types=True)
    calls = [m for m in conv.messages if m.get("tool_calls")]
    assert [[c["id"] for c in m["tool_calls"]] for m in calls] == [["call_0", "call_1"], ["call_2"]]
    assert [m["tool_call_id"] for m in conv.messages if m["role"] == "tool"] == ["call_0", "call_2"]
    # an observation before any call answers nothing: a reject with the schema's reason
    orphan = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "observation", "value": "x"},
                                {"from": "gpt", "value": "Hello."}]}
    with pytest.raises(RowError, match="^tool_without_call: message 1: a tool result that answers no call"):
        convert_row(orphan, ColumnMapping(), strict_types=True)


def test_tool_columns_are_checked_even_without_a_call_and_empty_calls_are_none(tmp_path: Path) -> None:
    # declared tools on a text answer: kept, and checked like any other (a build never writes
    # what training refuses)
    ok = convert_row({"question": "Hi?", "answer": "Hello.", "tools": [WEATHER]}, ColumnMapping(), True)
    assert ok.tools == [{"type": "function", "function": WEATHER}] and ok.tool_calls is None
    with pytest.raises(RowError, match=r"^invalid_tools: tools\[0\]\.function has no `name`"):
        convert_row({"question": "Hi?", "answer": "Hello.", "tools": [{"parameters": {}}]}, ColumnMapping(), True)
    # an empty cell, null or [] in the calls column is no call: the answer column is needed then
    for empty in ("", "null", "[]", None, []):
        conv = convert_row({"question": "Hi?", "answer": "Hello.", "tool_calls": empty}, ColumnMapping(), True)
        assert conv.tool_calls is None and conv.answer == "Hello."
    with pytest.raises(RowError, match="^no_chat_structure"):
        convert_row({"question": "Hi?", "tool_calls": "[]"}, ColumnMapping(), True)
    # a column the recipe names must exist, as the question and answer columns must
    with pytest.raises(RowError, match=r"^missing_column: 'fns' \(columns.tools\)"):
        convert_row({"question": "Hi?", "answer": "Hello."}, ColumnMapping(tools="fns"), True)
    # Alpaca rows read the tool columns too
    alpaca = convert_row({"instruction": "Weather in Oslo?", "output": "", "tools": [WEATHER],
                          "tool_calls": {"name": "weather", "arguments": {"city": "Oslo"}}}, ColumnMapping(), True)
    assert alpaca.kind == "alpaca" and alpaca.tool_calls[0]["function"]["name"] == "weather"


def test_chat_filter_counts_calls_and_rejects_chats_with_nothing_to_train(tmp_path: Path) -> None:
    short = _chat("Oslo")
    short["messages"][1]["content"] = "On it."  # a short text before the call
    nothing = {"messages": [{"role": "user", "content": "What is the weather like today?"},
                            {"role": "assistant", "content": "I do not know that.", "weight": 0}]}
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in (short, nothing)))
    report, out = _build(tmp_path, src, chat_filter={"min_assistant_chars": 10})
    (kept,) = read_jsonl(out / "train.jsonl")
    assert kept["messages"][1]["content"] == "On it."  # its call counts: long enough
    (rej,) = read_jsonl(out / "rejects.jsonl")
    assert rej["reason"] == "no_trained_assistant_message: every assistant turn has weight 0"
    assert rej["record"]["messages"][1]["weight"] == 0
    assert report["accounting"]["balanced"]
