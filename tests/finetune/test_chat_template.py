"""Loss masks: exactly the assistant contents plus their end-of-turn token are trained."""

import json
import subprocess
import sys

import pytest
import yaml

from finetune.data.chat_template import IGNORE_INDEX, encode_chat, end_of_turn_token, render_prompt

MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the price of the red kettle?"},
    {"role": "assistant", "content": "It costs $34."},
    {"role": "user", "content": "And the lamp?"},
    {"role": "assistant", "content": "The lamp is $12."},
]


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_model)
    assert "{% generation %}" not in t.chat_template  # the case the kit must handle by itself
    return t


def _trained_text(tok, enc):
    return "".join(tok.decode([i]) for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX)


def test_assistant_turns_and_end_of_turn_are_trained(tok):
    enc = encode_chat(tok, MSGS, loss_on="assistant")
    eot = end_of_turn_token(tok)
    assert eot == "<|im_end|>"
    assert _trained_text(tok, enc) == f"It costs $34.{eot}The lamp is $12.{eot}"
    # Labels equal inputs where trained (the model shifts them), and nothing else is trained.
    for i, lab in zip(enc.input_ids, enc.labels):
        assert lab in (IGNORE_INDEX, i)


def test_last_assistant_only(tok):
    enc = encode_chat(tok, MSGS, loss_on="last_assistant")
    assert _trained_text(tok, enc) == "The lamp is $12.<|im_end|>"


def test_whole_sequence(tok):
    enc = encode_chat(tok, MSGS, loss_on="all")
    # Every token but the first (nothing predicts it) and the template's trailing newline.
    assert tok.decode(enc.input_ids[-1:]) == "\n" and enc.labels[-1] == IGNORE_INDEX
    assert enc.n_trained == len(enc.input_ids) - 2


def test_truncation_keeps_masks_aligned(tok):
    full = encode_chat(tok, MSGS)
    cut = encode_chat(tok, MSGS, max_length=len(full.input_ids) - 3)
    assert cut.truncated and cut.labels == full.labels[: len(cut.input_ids)]


def test_prompt_is_a_prefix_of_training_text(tok):
    """Inference formats prompts exactly as training rendered them."""
    text = tok.apply_chat_template(MSGS, tokenize=False)
    assert text.startswith(render_prompt(tok, MSGS))
    assert render_prompt(tok, MSGS).endswith("<|im_start|>assistant\n")


def test_trained_bytes_counts_utf8(tok):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "café 你好"}]
    enc = encode_chat(tok, msgs)
    assert enc.trained_bytes == len("café 你好<|im_end|>".encode())


def test_preview_json_marks_assistant_tokens(tok, tiny_model, chat_data, tmp_path):
    cfg = {"model": str(tiny_model), "data": {"train": str(chat_data["train"])}, "output_dir": str(tmp_path / "r")}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "finetune", "preview", str(p), "--n", "2", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    examples = json.loads(out.stdout)
    assert len(examples) == 2
    first = json.loads(chat_data["train"].read_text().splitlines()[0])
    answers = [m["content"] for m in first["messages"] if m["role"] == "assistant"]
    trained = "".join(t["text"] for t in examples[0]["tokens"] if t["trained"])
    assert trained == "".join(a + "<|im_end|>" for a in answers)
    assert all(set(t) == {"token", "text", "trained"} for t in examples[0]["tokens"])
