"""Early stopping on eval loss: training stops, and the exported adapter is the best checkpoint."""

import json

import pytest

from finetune.config import load_config

pytestmark = pytest.mark.slow


def test_early_stopping_exports_the_best_checkpoint(tiny_model, chat_data, tmp_path):
    from safetensors.torch import load_file

    from finetune.training.recipe import train

    # A learning rate this high makes eval loss stop improving within a few evaluations.
    cfg = load_config(None, [
        f"model={tiny_model}", f"data.train={chat_data['train']}", f"data.eval={chat_data['eval']}",
        f"output_dir={tmp_path / 'run'}", "training.max_steps=60", "training.batch_size=8",
        "training.learning_rate=0.5", "training.lr_scheduler=constant", "training.warmup=0",
        "training.eval_steps=2", "training.early_stopping_patience=2", "training.save_total_limit=2",
        "training.report_to=[none]", "max_length=128", "lora.r=8", "seed=0",
    ])
    run = train(cfg)
    logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {m["step"]: m["eval_loss"] for m in logs if "eval_loss" in m}
    last_step = max(m["step"] for m in logs)
    assert last_step < 60, "early stopping never triggered"
    best_step = min(evals, key=evals.get)
    # Stopped exactly `patience` evaluations after the best one.
    assert sorted(evals)[-1] == best_step + 2 * 2, evals
    info = json.loads((run / "adapter" / "finetune.json").read_text())
    assert info["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    assert info["best_eval_loss"] == pytest.approx(evals[best_step])
    exported = load_file(run / "adapter" / "adapter_model.safetensors")
    best = load_file(run / "checkpoints" / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    assert exported.keys() == best.keys()
    assert all((exported[k] == best[k]).all() for k in exported)
