"""The function-calling task end to end (scripts/tool_calling_demo.py): LoRA on the tiny model moves
function-name accuracy and argument exact match on held-out prompts from the base's to >= 0.8,
as `finetune eval` reports them; then `chat(tools=)` and `finetune chat --tools` use the calls.
About 4 minutes on 2 CPU cores."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _demo():
    spec = importlib.util.spec_from_file_location("tool_calling_demo", REPO / "scripts" / "tool_calling_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lora_learns_to_call_the_functions_of_held_out_prompts(tmp_path):
    demo = _demo()
    out = tmp_path / "demo"
    summary = demo.run(out)  # the README's command, with its defaults
    assert summary["test_tool_calls"] >= 200  # enough held-out calls that 0.8 is not luck
    assert summary["base_tool_name_accuracy"] < 0.5 and summary["base_tool_arguments_exact_match"] < 0.5
    assert summary["tuned_tool_name_accuracy"] >= 0.8, summary
    assert summary["tuned_tool_arguments_exact_match"] >= 0.8, summary
    # also on the calls whose request no training chat holds word for word (most of them)
    assert summary["test_tool_calls_unseen"] >= 0.5 * summary["test_tool_calls"]
    assert summary["tuned_tool_arguments_exact_match_unseen"] >= 0.8, summary
    report = json.loads((out / "run" / "eval" / "report.json").read_text())
    rows = {(r["section"], r["metric"]): r for r in report["comparison"]}
    assert rows[("extrinsic", "tool_arguments_exact_match")]["delta"] >= 0.8 - summary["base_tool_arguments_exact_match"]
    assert ("extrinsic", "exact_match") in rows  # the text references are scored next to them
    # chat(tools=) returned the parsed call of a held-out prompt (the demo asked one).
    assert summary["reply_tool_calls"] and summary["reply_tool_calls"][0]["name"] == summary["reference_call"]["name"]

    # The terminal chat shows the call, reads its result, and the model goes on with a text turn.
    tools = out / "tools.json"
    tools.write_text(json.dumps(demo.TOOLS))
    r = subprocess.run([sys.executable, "-m", "finetune", "chat", "--adapter", str(out / "run" / "adapter"),
                        "--tools", str(tools), "--max-new-tokens", "48"],
                       input="What's the weather in Oslo?\n" + json.dumps({"city": "Oslo", "condition": "sunny"})
                       + "\n/exit\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert '[tool call] weather({"city": "Oslo"})' in r.stdout, r.stdout
    assert r.stdout.count("assistant> ") == 2  # the call, then a turn after the typed result
    assert r.stdout.count("[tool call]") == 1
