import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from finetune.config import ConfigError, TrainConfig, describe_schema, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]


def _base(tmp_path: Path, **extra) -> dict:
    train = tmp_path / "train.jsonl"
    train.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    cfg = {"model": "org/some-model", "data": {"train": str(train)}, "output_dir": str(tmp_path / "run")}
    cfg.update(extra)
    return cfg


def test_overrides_parse_types_and_nesting():
    got = parse_overrides(["lora.r=16", "training.learning_rate=1e-4", "resume=true", "lora.target_modules=[q_proj, v_proj]"])
    assert got == {"lora": {"r": 16, "target_modules": ["q_proj", "v_proj"]},
                   "training": {"learning_rate": 1e-4}, "resume": True}


def test_valid_config_with_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_base(tmp_path)))
    cfg = load_config(p, ["lora.r=64", "training.max_steps=20"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.lora.r == 64 and cfg.training.max_steps == 20 and cfg.adapter == "lora"


def test_all_problems_reported_at_once_with_dotted_keys(tmp_path):
    raw = _base(tmp_path)
    raw["lora"] = {"rank": 8}                                   # unknown key
    raw["training"] = {"batch_size": "eight"}                   # wrong type
    raw["data"]["eval"] = str(tmp_path / "missing.jsonl")       # missing file
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as ei:
        load_config(p, ["adapter=qlorra"])
    keys = {k for k, _ in ei.value.problems}
    assert {"lora.rank", "training.batch_size", "data.eval", "adapter"} <= keys
    msg = str(ei.value)
    assert "unknown key" in msg and "missing.jsonl" in msg and str(p) in msg


def test_cli_bad_config_fails_fast_and_loads_no_model(tmp_path):
    raw = _base(tmp_path, model=str(tmp_path / "no-such-model-dir"))
    raw["lora"] = {"rnak": 8}
    raw["training"] = {"epochs": "many"}
    raw["data"]["train"] = str(tmp_path / "nope.jsonl")
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw))
    t0 = time.perf_counter()
    # -X importtime would be noisy; instead assert torch was never imported by the failing path.
    code = (
        f"import sys; from finetune.cli import main; rc = main(['train', {str(p)!r}]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert out.returncode == 2, out.stderr
    for key in ("lora.rnak", "training.epochs", "data.train", "model"):
        assert key in out.stderr, out.stderr
    assert elapsed < 5, f"took {elapsed:.1f}s"


def test_unknown_override_key_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_base(tmp_path)))
    with pytest.raises(ConfigError, match="trainig"):
        load_config(p, ["trainig.max_steps=3"])


def test_schema_description_lists_keys():
    lines = "\n".join(describe_schema())
    for key in ("training.max_steps", "lora.r", "data.loss_on", "deepspeed", "quantization.storage_dtype"):
        assert key in lines


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_every_train_config_validates(path, tmp_path):
    text = path.read_text()
    assert text.startswith("#") and "finetune train" in text.splitlines()[1], "first lines: launch command"
    raw = yaml.safe_load(text)
    train = tmp_path / "t.jsonl"
    train.write_text("{}\n")
    over = [f"data.train={train}"]
    if raw.get("data", {}).get("eval"):
        over.append(f"data.eval={train}")
    if raw.get("eval", {}).get("data"):
        over.append(f"eval.data={train}")
    cfg = load_config(path, over)
    if cfg.deepspeed:
        assert (REPO / cfg.deepspeed).is_file() or Path(cfg.deepspeed).is_file()


def test_quickstart_recipe_validates(tmp_path):
    from finetune.quickstart import QUICKSTART_DATA

    train = tmp_path / "t.jsonl"
    train.write_text("{}\n")
    cfg = load_config(QUICKSTART_DATA / "train.yaml", [f"data.train={train}", "model=x/y"])
    assert cfg.eval.after_train


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_configs(path):
    ds = json.loads(path.read_text())
    stage = ds["zero_optimization"]["stage"]
    assert stage in (1, 2, 3)
    # Every batch field is "auto" so the training config is the single source of truth.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        assert ds[key] == "auto"
    if "offload" in path.name:
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs(path):
    from accelerate.commands.config.config_args import ClusterConfig

    raw = yaml.safe_load(path.read_text())
    ClusterConfig.from_yaml_file(path)  # accelerate's own loader: an unknown key raises
    ds_file = raw.get("deepspeed_config", {}).get("deepspeed_config_file")
    if ds_file:
        assert (REPO / ds_file).is_file()


def test_configuration_reference_is_in_sync():
    doc = (REPO / "docs" / "configuration.md").read_text()
    table = "\n".join(describe_schema(markdown=True))
    assert table in doc, "regenerate docs/configuration.md from finetune.config.describe_schema(markdown=True)"
