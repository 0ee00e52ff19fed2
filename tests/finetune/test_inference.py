"""Inference: one-call loading, the same greedy reply as evaluation, merge, chat, clear errors."""

import json
import subprocess
import sys

import pytest

from finetune.errors import AdapterError

pytestmark = pytest.mark.slow


def test_chat_reproduces_the_reply_evaluation_scored(trained_run, chat_data, tmp_path):
    from finetune import chat, load_for_inference
    from finetune.eval.evaluation import evaluate

    evaluate(adapter=trained_run / "adapter", data=chat_data["eval"], output=tmp_path / "e",
             max_new_tokens=8, batch_size=4, max_examples=6)
    preds = [json.loads(ln) for ln in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    tuned = [p for p in preds if p["model"] == "tuned"]
    assert len(tuned) == 6
    model, tok = load_for_inference(trained_run / "adapter")
    for p in tuned:
        assert chat(model, tok, p["prompt"], max_new_tokens=8) == p["prediction"]


def test_merged_model_matches_base_plus_adapter(trained_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from finetune import load_for_inference, merge_adapter

    model, tok = load_for_inference(trained_run / "adapter")
    merged_dir = merge_adapter(trained_run / "adapter", tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ids = tok(["The red kettle costs $12.\n\nHow much is the red kettle?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = model(ids, use_cache=False).logits
        b = merged(ids, use_cache=False).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()


def test_not_an_adapter_and_missing_base_are_clear_errors(trained_run, tiny_model, tmp_path):
    from finetune import load_for_inference

    with pytest.raises(AdapterError, match="full model directory"):
        load_for_inference(tiny_model)
    with pytest.raises(AdapterError, match="expected adapter_config.json"):
        load_for_inference(tmp_path)
    moved = tmp_path / "adapter"
    import shutil

    shutil.copytree(trained_run / "adapter", moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    from kitcore.integrity import IntegrityError

    # An edit is a change the checksums catch; the error says how to record one made on purpose.
    with pytest.raises(IntegrityError, match=r"adapter_config\.json: size .*finetune verify --record"):
        load_for_inference(moved)
    r = subprocess.run([sys.executable, "-m", "finetune", "verify", "--record", str(moved)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "recorded" in r.stdout, r.stderr
    with pytest.raises(AdapterError, match="not on this machine"):
        load_for_inference(moved)


def test_generate_command_writes_replies(trained_run, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "The oak desk costs $40.\\n\\nHow much is the oak desk?"}\n'
                       '{"messages": [{"role": "user", "content": "The mug costs $3.\\n\\nHow much is the mug?"}]}\n')
    out = tmp_path / "out.jsonl"
    r = subprocess.run([sys.executable, "-m", "finetune", "generate", "--adapter", str(trained_run / "adapter"),
                        "--input", str(prompts), "--output", str(out), "--max-new-tokens", "6"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    # chat JSONL: the prompt's conversation, then the model's reply as the assistant turn
    assert len(rows) == 2 and all(x["messages"][-1]["role"] == "assistant" for x in rows)
    assert all(isinstance(x["messages"][-1]["content"], str) for x in rows)
    assert rows[0]["messages"][0] == {"role": "user", "content": "The oak desk costs $40.\n\nHow much is the oak desk?"}


def test_chat_command_two_turns_over_stdin(trained_run):
    r = subprocess.run([sys.executable, "-m", "finetune", "chat", "--adapter", str(trained_run / "adapter"),
                        "--max-new-tokens", "6"],
                       input="The red mug costs $9. How much is the red mug?\nAnd again?\n/exit\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2
