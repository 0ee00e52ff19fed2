"""Intrinsic metrics equal a hand computation; bad eval input is counted, never a crash."""

import json
import math

import pytest

pytestmark = pytest.mark.slow


def _hand_nll(model_dir, data_path):
    """Plain forward passes, one example at a time, summing NLL over assistant tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    for line in data_path.read_text().splitlines():
        msgs = json.loads(line)["messages"]
        text = tok.apply_chat_template(msgs, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        # Assistant spans located independently of the kit: search each rendered answer + <|im_end|>.
        scored = set()
        pos = 0
        for m in msgs:
            if m["role"] != "assistant":
                continue
            span = m["content"] + "<|im_end|>"
            start = text.index("<|im_start|>assistant\n" + span, pos) + len("<|im_start|>assistant\n")
            pos = start + len(span)
            total_bytes += len(span.encode())
            prefix_ids = tok(text[:start], add_special_tokens=False)["input_ids"]
            span_ids = tok(span, add_special_tokens=False)["input_ids"]
            scored.update(range(len(prefix_ids), len(prefix_ids) + len(span_ids)))
        with torch.no_grad():
            logits = model(torch.tensor([ids]), use_cache=False).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        for t in scored:
            total_nll -= logp[t - 1, ids[t]].item()
            total_tokens += 1
    return total_nll, total_tokens, total_bytes


def test_perplexity_and_bits_per_byte_match_hand_computation(tiny_model, chat_data, tmp_path):
    from finetune.eval.evaluation import evaluate

    nll, n_tok, n_bytes = _hand_nll(tiny_model, chat_data["eval"])
    report = evaluate(model=str(tiny_model), data=chat_data["eval"], output=tmp_path / "eval",
                      max_new_tokens=4, batch_size=5)
    got = report["models"]["base"]["intrinsic"]
    assert got["tokens"] == n_tok and got["bytes"] == n_bytes
    assert got["perplexity"] == pytest.approx(math.exp(nll / n_tok), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-4)
    for name in ("report.json", "report.md", "predictions.jsonl", "metrics_bars.png"):
        assert (tmp_path / "eval" / name).is_file(), name


def test_bad_eval_input_is_counted_not_fatal(tiny_model, chat_data, tmp_path):
    from finetune.eval.evaluation import evaluate

    good = chat_data["eval"].read_text().splitlines()[:3]
    bad = [
        '{"messages": [{"role": "user", "content": "no answer here"}]}',           # no assistant turn
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 42}]}',  # not a string
        '{"messages": [ truncated',                                                   # malformed
        # a reference call whose arguments are not JSON: neither renderable nor scorable
        json.dumps({"tools": [{"type": "function", "function": {"name": "weather"}}], "messages": [
            {"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "weather", "arguments": '{"city": '}}]}]}),
    ]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(good + bad) + "\n")
    report = evaluate(model=str(tiny_model), data=data, output=tmp_path / "e", max_new_tokens=3)
    meta = report["meta"]["data"]
    assert meta["skipped"] == {"no assistant turn": 1, "malformed JSON": 1, "invalid_tool_arguments": 1}
    assert meta["skipped_lines"][-1] == {"line": 7, "reason": "invalid_tool_arguments"}
    ext = report["models"]["base"]["extrinsic"]
    assert ext["n"] == 4 and ext["n_invalid_reference"] == 1
    assert report["models"]["base"]["intrinsic"]["n_invalid"] == 1
    preds = [json.loads(ln) for ln in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and any("error" in p["scores"] for p in preds)


def test_eval_command_max_length_truncates_the_scored_examples(tiny_model, chat_data, tmp_path):
    """`finetune eval --max-length N` scores each example truncated to N tokens (fewer scored tokens),
    and the report records the limit."""
    import json as _json

    from finetune.cli import main

    def run(name, *extra):
        out = tmp_path / name
        assert main(["eval", "--model", str(tiny_model), "--data", str(chat_data["eval"]), "--output", str(out),
                     "--metrics", "exact_match", "--max-new-tokens", "2", *extra]) == 0
        return _json.loads((out / "report.json").read_text())

    from finetune.data.chat_template import encode_chat
    from finetune.data.files import read_chat_jsonl
    from finetune.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    lengths = sorted(len(encode_chat(tok, r["messages"], max_length=None).input_ids)
                     for r in read_chat_jsonl(chat_data["eval"]))
    limit = lengths[len(lengths) // 2]  # the longer half loses its tail (its last answer)
    full, cut = run("full"), run("cut", "--max-length", str(limit))
    assert cut["meta"]["max_length"] == limit and full["meta"]["max_length"] is None
    assert 0 < cut["models"]["base"]["intrinsic"]["tokens"] < full["models"]["base"]["intrinsic"]["tokens"]
