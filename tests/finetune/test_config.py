import json
import os
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


def _stand_in_adapter(raw: dict, tmp_path: Path) -> list[str]:
    """A config that continues an adapter (`init_adapter`) names a run that does not exist here."""
    if not raw.get("init_adapter"):
        return []
    adapter = tmp_path / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text("{}")
    return [f"init_adapter={adapter}"]


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
    over += _stand_in_adapter(raw, tmp_path)
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


# ----------------------------------------------------------------------------------------------
# relative paths: next to the YAML that names them; on the command line, the current directory
# ----------------------------------------------------------------------------------------------
_CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'


def _recipe_dir(root: Path) -> Path:
    """recipes/run.yaml naming data/train.jsonl, ds.json and ./model, all next to it."""
    d = root / "recipes"
    (d / "data").mkdir(parents=True)
    (d / "data" / "train.jsonl").write_text(_CHAT)
    (d / "ds.json").write_text((REPO / "configs/deepspeed/zero2.json").read_text())
    (d / "model").mkdir()
    (d / "run.yaml").write_text(yaml.safe_dump({"model": "./model", "data": {"train": "data/train.jsonl"},
                                                "deepspeed": "ds.json", "output_dir": "run"}))
    return d


def test_relative_paths_in_a_yaml_resolve_next_to_it(tmp_path, monkeypatch):
    recipes = _recipe_dir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    (elsewhere / "data" / "train.jsonl").write_text(_CHAT)  # same relative name in the cwd: not used
    monkeypatch.chdir(elsewhere)
    cfg = load_config(recipes / "run.yaml")
    assert Path(cfg.data.train) == recipes / "data" / "train.jsonl"
    assert Path(cfg.deepspeed) == recipes / "ds.json" and Path(cfg.model) == recipes / "model"
    assert cfg.output_dir == "run"  # an output stays relative to where the command runs
    # A config written when paths were read from the current directory still loads.
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.yaml").write_text(yaml.safe_dump({"model": "org/m", "data": {"train": "data/train.jsonl"},
                                                  "output_dir": "run"}))
    assert load_config(old / "run.yaml").data.train == "data/train.jsonl"
    with pytest.raises(ConfigError) as err:
        load_config(old / "run.yaml", ["data.train=data/missing.jsonl"])
    assert ("data.train", "file not found: data/missing.jsonl") in err.value.problems


def test_an_override_path_resolves_against_the_current_directory(tmp_path, monkeypatch):
    recipes = _recipe_dir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "other.jsonl").write_text(_CHAT)
    (recipes / "data" / "other.jsonl").write_text(_CHAT)  # the YAML's directory is not searched for it
    monkeypatch.chdir(tmp_path)
    cfg = load_config(recipes / "run.yaml", ["data.train=data/other.jsonl", "deepspeed=recipes/ds.json"])
    assert Path(cfg.data.train).resolve() == tmp_path / "data" / "other.jsonl"
    assert Path(cfg.deepspeed).resolve() == recipes / "ds.json"
    with pytest.raises(ConfigError) as err:
        load_config(recipes / "run.yaml", ["deepspeed=ds.json"])  # next to the YAML, not in the cwd
    assert ("deepspeed", "file not found: ds.json") in err.value.problems


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_plan_from_another_directory(path, tmp_path, monkeypatch):
    from finetune.plan.command import load_plan_config

    train = tmp_path / "t.jsonl"
    train.write_text(_CHAT)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, [f"data.train={train}", f"data.eval={train}", f"eval.data={train}",
                             *_stand_in_adapter(yaml.safe_load(path.read_text()), tmp_path)])
    for ds in (cfg.deepspeed, load_plan_config(path).deepspeed):
        if yaml.safe_load(path.read_text()).get("deepspeed"):
            assert Path(ds).is_file() and Path(ds).resolve().parent == REPO / "configs" / "deepspeed"


def test_cli_plan_of_a_shipped_config_from_another_directory(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "finetune.plan", str(REPO / "configs/train/llama3_70b_qlora_zero3.yaml"),
                           "--gpus-per-node", "8", "--gpu-memory", "80GiB"], cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "ZeRO-3, 1 node(s) x 8" in proc.stdout and "verdict   FITS" in proc.stdout, proc.stdout


def test_launcher_and_shipped_config_name_the_same_deepspeed_json(monkeypatch, tmp_path):
    """accelerate's yaml names configs/deepspeed/zero3.json from the repository root, the training
    config ../deepspeed/zero3.json from its own directory: the same file, so the launch is allowed."""
    from finetune.training.launch import deepspeed_config

    train = tmp_path / "t.jsonl"
    train.write_text(_CHAT)
    monkeypatch.chdir(REPO)
    launcher = yaml.safe_load((REPO / "configs/accelerate/deepspeed_zero3.yaml").read_text())
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", launcher["deepspeed_config"]["deepspeed_config_file"])
    cfg = load_config(REPO / "configs/train/llama3_70b_qlora_zero3.yaml",
                      [f"data.train={train}", f"data.eval={train}"])
    assert Path(deepspeed_config(cfg)).resolve() == REPO / "configs" / "deepspeed" / "zero3.json"
