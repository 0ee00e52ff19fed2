"""`finetune generate`: answers as chat JSONL that trains, batched, resumable, with rejects.

Two models: the session's short LoRA run (tests/conftest.py: trained_run), which ends its answers
with the end-of-turn token (but answers most prompts alike), and `varied`, the tiny random model with
its output layer scaled up: well-separated logits, so its greedy answers differ from prompt to
prompt (an answer written to the wrong record shows) and do not flip on float noise; it rarely ends
its turn, so those tests keep unfinished answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_chat_examples, write_jsonl

WRONG = "WRONG-ANSWER-TO-REPLACE"


@pytest.fixture(scope="module")
def varied(tmp_path_factory, tiny_model) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("varied") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def _inputs(tmp_path: Path) -> tuple[Path, list[dict]]:
    """Every input format, with bad lines between them."""
    chats = make_chat_examples(6, seed=3)
    lines: list = [
        {**chats[0], "source": "shop-a"},  # chat ending with an assistant turn: replaced
        {"messages": chats[1]["messages"][:-1] + [{"role": "assistant", "content": WRONG}], "id": 7},
        {"messages": chats[2]["messages"][:-1]},  # ends with the user turn: answered as is
        {"prompt": chats[3]["messages"][-2]["content"]},
        {"prompt": chats[4]["messages"][:-1], "completion": [{"role": "assistant", "content": WRONG}]},
        chats[5]["messages"][-2]["content"],  # a bare string
    ]
    path = tmp_path / "prompts.jsonl"
    rows = [json.dumps(x) for x in lines]
    rows.insert(2, "{not json")
    rows.insert(4, json.dumps({"question": "no prompt here"}))
    rows.insert(5, "")  # blank lines are skipped, not rejected
    rows.insert(6, json.dumps({"messages": [{"role": "user"}]}))
    rows.insert(8, json.dumps({"messages": [{"role": "assistant", "content": "only an answer"}]}))
    path.write_text("\n".join(rows) + "\n")
    return path, lines


def _read(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_answers_are_chat_jsonl_in_input_order_with_rejects_by_line(trained_run, tmp_path):
    from finetune.config import load_config
    from finetune.data.cache import prepared_split
    from finetune.inference.generate import generate_file
    from finetune.inference.load import generate_replies, load_for_inference

    inp, lines = _inputs(tmp_path)
    out = tmp_path / "answers.jsonl"
    res = generate_file(input=inp, output=out, adapter=str(trained_run / "adapter"), max_new_tokens=8,
                        batch_size=4, progress=False)
    assert res["engine"] == "transformers" and res["written"] == 6 and res["rejected"] == 4, res
    rows = _read(out)
    assert len(rows) == 6 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert WRONG not in out.read_text()  # the replaced answers are gone
    assert rows[0]["source"] == "shop-a" and rows[1]["id"] == 7  # other keys are kept
    assert "prompt" not in rows[3] and "completion" not in rows[4]
    # the conversations answered, in input order: each record's prompt messages, then the answer
    want_prompts = [lines[0]["messages"][:-1], lines[1]["messages"][:-1], lines[2]["messages"],
                    [{"role": "user", "content": lines[3]["prompt"]}], lines[4]["prompt"],
                    [{"role": "user", "content": lines[5]}]]
    assert [r["messages"][:-1] for r in rows] == want_prompts
    # the same answers as the evaluation path gives (one template, one generation helper)
    model, tok = load_for_inference(trained_run / "adapter")
    assert [r["messages"][-1]["content"] for r in rows] == generate_replies(model, tok, want_prompts, max_new_tokens=8)

    rejects = _read(tmp_path / "answers.rejects.jsonl")
    assert [(r["line"], r["locator"], r["step"]) for r in rejects] == [
        (3, "line 3", "generate"), (5, "line 5", "generate"), (7, "line 7", "generate"), (9, "line 9", "generate")]
    reasons = [r["reason"] for r in rejects]
    assert reasons[0].startswith("malformed JSON") and rejects[0]["text"] == "{not json\n"
    assert "not a chat or prompt record" in reasons[1] and rejects[1]["record"] == {"question": "no prompt here"}
    assert reasons[2].startswith("message_missing_key: message 0 has no content")
    assert reasons[3] == "nothing to answer: no message before the assistant turn"

    # the output trains: the data cache takes every line
    base = json.loads((trained_run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    cfg = load_config(None, [f"model={base}", f"data.train={out}", f"output_dir={tmp_path / 'r'}", "max_length=256",
                             "data.loss_on=last_assistant"])
    ds, stats, _ = prepared_split(cfg, tok, str(out))
    assert stats.kept == len(ds) == 6 and stats.trained_tokens > 6


def test_batched_and_one_at_a_time_give_the_same_file(varied, tmp_path):
    from finetune.inference.generate import generate_file
    from finetune.inference.load import generate_replies, load_model_for_inference

    rows = make_chat_examples(7, seed=4)
    inp = write_jsonl(tmp_path / "p.jsonl", rows)
    outs = []
    for bs in (1, 3):
        out = tmp_path / f"bs{bs}.jsonl"
        generate_file(input=inp, output=out, model=str(varied), max_new_tokens=6, batch_size=bs, keep_unfinished=True,
                      progress=False)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and outs[0].count(b"\n") == 7
    answers = [r["messages"][-1]["content"] for r in _read(tmp_path / "bs3.jsonl")]
    assert len(set(answers)) >= 5, answers  # prompt-dependent: a record given another's answer would show
    model, tok = load_model_for_inference(str(varied))
    assert answers == generate_replies(model, tok, [r["messages"][:-1] for r in rows], max_new_tokens=6)


def test_an_interrupted_run_resumes_after_its_last_complete_batch(varied, tmp_path, monkeypatch):
    import finetune.inference.generate as G

    inp = write_jsonl(tmp_path / "p.jsonl", [*make_chat_examples(9, seed=6), "x", {"bad": 1}, "y"])
    kw = dict(input=inp, model=str(varied), max_new_tokens=6, batch_size=2, keep_unfinished=True, progress=False)
    reference = tmp_path / "reference.jsonl"
    G.generate_file(output=reference, **kw)

    out = tmp_path / "answers.jsonl"
    real = G._TransformersEngine.generate
    seen: list[str] = []

    def dies_at_third_batch(self, prompts, max_new_tokens):
        if len(seen) >= 4:
            raise KeyboardInterrupt  # as a kill would, between two batches' writes
        seen.extend(prompts)
        return real(self, prompts, max_new_tokens)

    monkeypatch.setattr(G._TransformersEngine, "generate", dies_at_third_batch)
    with pytest.raises(KeyboardInterrupt):
        G.generate_file(output=out, **kw)
    progress = json.loads((tmp_path / "answers.jsonl.progress.json").read_text())
    assert progress["written"] == 4 and progress["line"] == 4 and not progress["complete"], progress
    with out.open("a") as fh:
        fh.write('{"messages": [{"role": "user", "content": "half a li')  # a write cut off by the kill
    monkeypatch.setattr(G._TransformersEngine, "generate", lambda self, p, n: (seen.extend(p), real(self, p, n))[1])
    seen.clear()
    res = G.generate_file(output=out, **kw)
    assert len(seen) == 9 - 4 + 2  # only what was not done: 5 chats and the two strings
    assert out.read_bytes() == reference.read_bytes()
    assert len({r["messages"][-1]["content"] for r in _read(out)}) >= 8  # prompt-dependent answers
    assert (tmp_path / "answers.rejects.jsonl").read_text() == (tmp_path / "reference.rejects.jsonl").read_text()
    assert res["written"] == 11 and res["rejected"] == 1 and res["complete"]
    # done: a third run reads nothing and loads no model
    monkeypatch.setattr(G, "_engine", lambda *a, **k: pytest.fail("a finished file loaded a model"))
    assert G.generate_file(output=out, **kw)["written"] == 11


def test_a_resume_with_other_settings_or_a_foreign_file_is_refused(trained_run, tmp_path):
    from finetune.errors import GenerateError
    from finetune.inference.generate import generate_file

    inp = write_jsonl(tmp_path / "p.jsonl", make_chat_examples(2, seed=1))
    out = tmp_path / "a.jsonl"
    kw = dict(input=inp, output=out, adapter=str(trained_run / "adapter"), batch_size=2, progress=False)
    generate_file(max_new_tokens=8, **kw)
    with pytest.raises(GenerateError, match=r"other settings \(max_new_tokens: 8 then, 9 now\)"):
        generate_file(max_new_tokens=9, **kw)
    assert len(_read(out)) == 2  # untouched
    generate_file(max_new_tokens=9, overwrite=True, **kw)
    assert json.loads((tmp_path / "a.jsonl.progress.json").read_text())["settings"]["max_new_tokens"] == 9
    foreign = tmp_path / "b.jsonl"
    foreign.write_text('{"messages": []}\n')
    with pytest.raises(GenerateError, match="no b.jsonl.progress.json"):
        generate_file(max_new_tokens=8, **{**kw, "output": foreign})
    with pytest.raises(GenerateError, match="give --model, --adapter, or both"):
        generate_file(input=inp, output=tmp_path / "c.jsonl")


def test_a_record_that_fails_to_generate_is_rejected_alone(trained_run, tmp_path, monkeypatch):
    import finetune.inference.generate as G

    rows = make_chat_examples(5, seed=2)
    rows[2]["messages"][-2]["content"] += " EXPLODE"
    inp = write_jsonl(tmp_path / "p.jsonl", rows)
    real = G._TransformersEngine.generate

    def fails_on_one(self, prompts, max_new_tokens):
        if any("EXPLODE" in p for p in prompts):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real(self, prompts, max_new_tokens)

    monkeypatch.setattr(G._TransformersEngine, "generate", fails_on_one)
    out = tmp_path / "a.jsonl"
    res = G.generate_file(input=inp, output=out, adapter=str(trained_run / "adapter"), max_new_tokens=8, batch_size=5,
                          progress=False)
    assert res["written"] == 4 and res["rejected"] == 1
    (rej,) = _read(tmp_path / "a.rejects.jsonl")
    assert rej["line"] == 3 and rej["reason"] == "generation failed: RuntimeError: CUDA error: device-side assert triggered"
    assert "EXPLODE" not in out.read_text()


def test_answers_cut_off_by_max_new_tokens_are_rejected_unless_kept(trained_run, tmp_path):
    from finetune.inference.generate import generate_file

    base = json.loads((trained_run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    inp = write_jsonl(tmp_path / "p.jsonl", make_chat_examples(3, seed=8))
    # the random-weight base never closes its turn within 2 tokens
    res = generate_file(input=inp, output=tmp_path / "a.jsonl", model=base, max_new_tokens=2, progress=False)
    assert res["written"] == 0 and res["rejected"] == 3
    assert all("no end of turn within 2 new tokens" in r["reason"] for r in _read(tmp_path / "a.rejects.jsonl"))
    res = generate_file(input=inp, output=tmp_path / "b.jsonl", model=base, max_new_tokens=2, keep_unfinished=True,
                        progress=False)
    assert res["written"] == 3 and all(r["messages"][-1]["content"] for r in _read(tmp_path / "b.jsonl"))


def test_the_cli_and_the_engine_choice(trained_run, tmp_path):
    inp = write_jsonl(tmp_path / "p.jsonl", make_chat_examples(2, seed=9))
    out = tmp_path / "a.jsonl"
    cmd = [sys.executable, "-m", "finetune", "generate", "--adapter", str(trained_run / "adapter"), "--input", str(inp),
           "--output", str(out), "--max-new-tokens", "8"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 answers -> " in r.stdout and len(_read(out)) == 2
    assert "generating with transformers" in r.stderr  # no GPU / no vLLM here
    r = subprocess.run([*cmd[:4], "--input", str(inp), "--output", str(tmp_path / "b.jsonl")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "error: give --model, --adapter, or both" in r.stderr
    r = subprocess.run([*cmd, "--engine", "vllm", "--overwrite"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "error: --engine vllm:" in r.stderr, r.stderr[-2000:]


def test_tool_calling_records_keep_their_calls_and_the_answers_calls_are_parsed(trained_run, tmp_path, monkeypatch):
    """A record that declares tools is rendered with them and with its earlier calls and results; the
    calls in the answer become `tool_calls`, checked like training data (an undeclared function or a
    call that is not JSON is a reject with its reason)."""
    import finetune.inference.generate as G
    from kitcore.schema import record_problems

    weather = {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    call = {"id": "call_0", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Lima"}'}}
    ask = lambda city: [{"role": "user", "content": f"Weather in {city}?"}]  # noqa: E731
    rows = [
        {"tools": [weather], "messages": ask("Oslo")},
        {"tools": [weather], "messages": [*ask("Lima"), {"role": "assistant", "content": None, "tool_calls": [call]},
                                          {"role": "tool", "tool_call_id": "call_0", "content": '{"sky": "grey"}'}]},
        {"tools": [weather], "messages": ask("Bern")},
        {"tools": [weather], "messages": ask("Riga")},
        {"functions": [weather["function"]], "messages": ask("Cork")},  # legacy function calling
    ]
    answers = {"Oslo": '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
               "grey": "It is grey in Lima.",
               "Bern": '<tool_call>\n{"name": "stocks", "arguments": {"ticker": "X"}}\n</tool_call>',
               "Riga": '<tool_call>\n{"name": "weather", "arguments": {"city": \n</tool_call>',
               "Cork": '{"name": "weather", "arguments": {"city": "Cork"}}'}
    seen = []

    def fake(self, prompts, max_new_tokens):
        seen.extend(prompts)
        return [(next(a for k, a in answers.items() if k in p.rsplit("<|im_start|>user", 1)[-1]), True)
                for p in prompts]

    monkeypatch.setattr(G._TransformersEngine, "generate", fake)
    out = tmp_path / "a.jsonl"
    res = G.generate_file(input=write_jsonl(tmp_path / "p.jsonl", rows), output=out,
                          adapter=str(trained_run / "adapter"), batch_size=8, progress=False)
    assert res["written"] == 3 and res["rejected"] == 2, res
    assert all('"name": "weather"' in p for p in seen)  # the tools block is in every prompt
    lima = next(p for p in seen if "Lima" in p)
    assert '{"city": "Lima"}' in lima and '{"sky": "grey"}' in lima  # the earlier call and its result
    written = _read(out)
    for rec in written:
        assert record_problems(rec) == [], rec
    oslo, lima_rec, cork = written
    assert oslo["messages"][-1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]}
    assert lima_rec["messages"][1]["tool_calls"] == [call] and lima_rec["messages"][2]["tool_call_id"] == "call_0"
    assert lima_rec["messages"][-1] == {"role": "assistant", "content": "It is grey in Lima."}
    assert cork["tools"] == [weather] and cork["messages"][-1]["tool_calls"][0]["function"]["name"] == "weather"
    bern, riga = _read(tmp_path / "a.rejects.jsonl")
    assert bern["line"] == 3 and "undeclared_function" in bern["reason"] and "stocks" in bern["reason"], bern
    assert riga["line"] == 4 and riga["reason"].startswith("a tool call in the answer is not a JSON call"), riga
