"""`finetune train` on a tiny local model, single process, through the real Trainer path."""

import json
from pathlib import Path

import pytest

from finetune.config import load_config
from finetune.data.files import DataError
from finetune.errors import RunDirError

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _cfg(tiny_model, chat_data, out: Path, *over: str):
    return load_config(None, [
        f"model={tiny_model}", f"data.train={chat_data['train']}", f"data.eval={chat_data['eval']}",
        f"output_dir={out}", "training.batch_size=8", "training.learning_rate=3e-3", "training.logging_steps=1",
        "training.report_to=[none]", "max_length=128", "lora.r=8", "seed=0", *over,
    ])


def _read_metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_lora_train_exports_a_loadable_adapter(tiny_model, chat_data, tmp_path):
    from safetensors.torch import load_file

    from finetune.training.recipe import train

    run = train(_cfg(tiny_model, chat_data, tmp_path / "run", "training.max_steps=12", "training.eval_steps=6"))
    adapter = run / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "finetune.json"):
        assert (adapter / name).is_file(), name
    tok_cfg = json.loads((adapter / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in (tok_cfg.get("chat_template") or (adapter / "chat_template.jinja").read_text())
    # LoRA B matrices start at zero; training must have moved them.
    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    # Loss went down, logged per step with learning rate and throughput.
    logs = [m for m in _read_metrics(run) if "loss" in m]
    assert logs[0]["step"] == 1 and logs[-1]["step"] == 12
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert all("learning_rate" in m for m in logs) and any("tokens_per_s" in m for m in logs)
    assert any("eval_loss" in m for m in _read_metrics(run))
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 1 and len(info["data"]["train"]["sha256"]) == 64
    ckpts = sorted((run / "checkpoints").glob("checkpoint-*"))
    assert ckpts and all((c / "COMPLETE").is_file() for c in ckpts)
    # The adapter loads with plain PEFT in a fresh model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    PeftModel.from_pretrained(base, adapter)

    # A second run into the same directory is refused, and says what to do.
    with pytest.raises(RunDirError, match="resume=true"):
        train(_cfg(tiny_model, chat_data, run, "training.max_steps=2"))


def test_resume_continues_from_the_checkpoint(tiny_model, chat_data, tmp_path):
    from finetune.training.recipe import train

    out = tmp_path / "run"
    train(_cfg(tiny_model, chat_data, out, "training.max_steps=4", "training.save_steps=2",
               "training.eval_steps=2", "training.lr_scheduler=constant"))
    run = train(_cfg(tiny_model, chat_data, out, "training.max_steps=8", "training.save_steps=2",
                     "training.eval_steps=2", "training.lr_scheduler=constant", "resume=true"))
    steps = [m["step"] for m in _read_metrics(run) if "loss" in m]
    assert steps == list(range(1, 9)), steps  # continuous: 1-4 from the first run, 5-8 resumed
    state = json.loads((run / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8


def test_bad_data_fails_before_training_with_file_and_line(tiny_model, chat_data, tmp_path):
    from finetune.training.recipe import train

    bad = tmp_path / "bad.jsonl"
    lines = chat_data["train"].read_text().splitlines()[:3]
    lines.insert(1, '{"messages": [{"role": "user", "content": "truncated')
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        train(_cfg(tiny_model, chat_data, tmp_path / "r1", f"data.train={bad}", "training.max_steps=1"))
    assert not (tmp_path / "r1" / "adapter").exists()


def test_examples_with_no_trained_token_are_refused(tiny_model, chat_data, tmp_path):
    from finetune.training.recipe import train

    # max_length=16 cuts every example before its assistant turn: nothing would be trained.
    with pytest.raises(DataError, match=r"have no trained token.*train\.jsonl:1"):
        train(_cfg(tiny_model, chat_data, tmp_path / "r2", "max_length=16", "training.max_steps=1"))


def test_empty_dataset_is_a_clear_error(tiny_model, chat_data, tmp_path):
    from finetune.training.recipe import train

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="holds no examples"):
        train(_cfg(tiny_model, chat_data, tmp_path / "r3", f"data.train={empty}", "training.max_steps=1"))


def test_a_run_predicted_not_to_fit_is_refused_before_loading_and_force_overrides(tiny_model, chat_data, tmp_path,
                                                                                    capsys):
    """`finetune train` plans from config.json alone: full fine-tuning of a 70B model cannot fit in
    this machine's RAM, so it stops with the table, before any weight is read (there are none)."""
    import shutil

    from finetune.config import ConfigError
    from finetune.training.recipe import train

    big = tmp_path / "llama70b"
    big.mkdir()
    shutil.copy(REPO / "finetune" / "model_configs" / "llama-3.1-70b.json", big / "config.json")
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, big / f.name)
    cfg = load_config(None, [f"model={big}", "adapter=full", f"data.train={chat_data['train']}",
                             f"output_dir={tmp_path / 'run'}", "training.report_to=[none]"])
    with pytest.raises(ConfigError, match="force"):
        train(cfg)
    out = capsys.readouterr().out
    assert "verdict   DOES NOT FIT" in out and "70.55B params" in out and "process (CPU RSS)" in out, out[-2000:]
    assert not (tmp_path / "run" / "adapter").exists()
    # force=true passes the check; the run then fails where it would: there are no weights to load
    forced = cfg.model_copy(update={"force": True, "overwrite": True})
    with pytest.raises(OSError, match=r"no file named model\.safetensors"):
        train(forced)


@pytest.mark.slow
def test_training_compile_compiles_each_decoder_layer_and_gives_the_same_step(tiny_model, chat_data, tmp_path):
    """training.compile: regional compilation (each decoder layer, dynamic shapes) changes no number:
    the first steps' losses of a compiled run equal the eager run's."""
    from finetune.config import ConfigError, load_config
    from finetune.training.recipe import train

    base = [f"model={tiny_model}", f"data.train={chat_data['train']}", "training.max_steps=2", "training.logging_steps=1",
            "training.report_to=[none]", "training.batch_size=4", "max_length=128"]
    losses = {}
    for compiled in (False, True):
        run = train(load_config(None, [*base, f"output_dir={tmp_path / str(compiled)}", f"training.compile={compiled}"]))
        losses[compiled] = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
                            if '"loss"' in x]
    assert len(losses[True]) == 2 and losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6), losses
    ds = tmp_path / "z3.json"
    ds.write_text('{"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}')
    with pytest.raises(ConfigError, match="training.compile: not with ZeRO-3"):
        train(load_config(None, [*base, f"output_dir={tmp_path / 'z3'}", "training.compile=true", f"deepspeed={ds}"]))
