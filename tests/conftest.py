"""Shared fixtures: a tiny local model and small chat datasets (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def make_chat_examples(n: int, seed: int = 0) -> list[dict]:
    """Price look-up chats (the quickstart's task), some with a system turn and two rounds."""
    rng = random.Random(seed)
    colors = ["red", "blue", "green", "oak", "steel", "amber", "ivory", "teal"]
    items = ["kettle", "lamp", "chair", "desk", "mug", "vase", "clock", "rug"]
    out = []
    for i in range(n):
        prods = {f"{rng.choice(colors)} {rng.choice(items)}": f"${rng.randint(3, 99)}" for _ in range(3)}
        name, price = rng.choice(sorted(prods.items()))
        ctx = " ".join(f"The {k} costs {v}." for k, v in prods.items())
        msgs = [{"role": "user", "content": f"{ctx}\n\nHow much is the {name}?"},
                {"role": "assistant", "content": price}]
        if i % 4 == 0:
            msgs.insert(0, {"role": "system", "content": "Answer with the price only."})
        if i % 5 == 0:
            msgs += [{"role": "user", "content": "Thanks! And again?"}, {"role": "assistant", "content": price}]
        out.append({"messages": msgs})
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("chat")
    return {
        "train": write_jsonl(d / "train.jsonl", make_chat_examples(96, seed=0)),
        "eval": write_jsonl(d / "eval.jsonl", make_chat_examples(24, seed=1)),
    }


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, chat_data) -> Path:
    from finetune.tiny import build_tiny_model

    d = tmp_path_factory.mktemp("tiny") / "model"
    return build_tiny_model(d, [chat_data["train"]], vocab_size=320, hidden_size=64, layers=2, heads=4,
                            kv_heads=2, max_positions=512)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model, chat_data) -> Path:
    """A short LoRA run on the tiny model (adapter/ with tokenizer and template)."""
    from finetune.config import load_config
    from finetune.training.recipe import train

    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = load_config(None, [
        f"model={tiny_model}", f"data.train={chat_data['train']}", f"output_dir={out}",
        "training.max_steps=20", "training.batch_size=8", "training.learning_rate=5e-3",
        "training.report_to=[none]", "max_length=128", "lora.r=8", "seed=0",
    ])
    return train(cfg)
