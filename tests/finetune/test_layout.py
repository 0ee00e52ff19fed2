"""The package's layout holds: no import cycles, no private name imported from another module, no
training-method name outside finetune/methods/ (scripts/layout_report.py); and a new training method
is one record plus its implementation, registered, with nothing else in the kit edited."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _report():
    spec = importlib.util.spec_from_file_location("layout_report", REPO / "scripts" / "layout_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_package_has_no_import_cycles_no_private_cross_imports_and_no_method_names_outside_methods():
    r = _report().report()
    assert r["import_cycles"] == []
    assert r["private_cross_module_imports"] == []
    assert r["method_names_outside_methods"] == []


def test_the_checker_sees_a_cycle_a_private_import_and_a_method_name(tmp_path, monkeypatch):
    """The layout test above can fail: the checker finds each kind of problem in a package made to have them."""
    mod = _report()
    pkg = tmp_path / "finetune"
    (pkg / "methods").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "methods" / "__init__.py").write_text("")
    (pkg / "methods" / "dpo.py").write_text('NAME = "dpo"\n')  # allowed: inside methods/
    (pkg / "a.py").write_text("from finetune.b import _helper\n")
    (pkg / "b.py").write_text('def _helper():\n    from finetune import a\n    return "kto"\n')
    (pkg / "c.py").write_text('X = "orpo"  # layout: not a method\nfrom typing import TYPE_CHECKING\n'
                              "if TYPE_CHECKING:\n    from finetune.a import thing\n")
    monkeypatch.setattr(mod, "PACKAGE", pkg)
    r = mod.report()
    assert r["import_cycles"] == [["finetune.a", "finetune.b"]]
    assert r["private_cross_module_imports"] == ["finetune.a: _helper from finetune.b"]
    assert r["method_names_outside_methods"] == ["finetune/b.py:3: 'kto'"]


# A training method from outside the kit: its record and its implementation in one module (this one).
def arguments(cfg):
    from transformers import TrainingArguments

    return TrainingArguments, {}


def collator(cfg, tokenizer):
    from finetune.methods.trainer import chat_collator

    return chat_collator(cfg, tokenizer)


class _Seen:
    trainers: list = []


def trainer(cfg, **common):
    """Plain SFT through the kit's Trainer, with every loss doubled: observably this method's trainer."""
    from finetune.methods.trainer import KitTrainer

    class Doubled(KitTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return (2 * out[0], out[1]) if return_outputs else 2 * out

    t = Doubled(**common)
    _Seen.trainers.append(t)
    return t


def run_info(cfg):
    return {"toy": {"doubled": True}}


@pytest.fixture
def toy_method():
    from finetune.methods import Method, registry

    m = Method(name="toy_double", description="SFT with the loss doubled (a test)", impl=__name__, data="chat",
               token_loss=True, packing=True)
    registry.register(m)
    yield m
    registry._REGISTRY.pop(m.name, None)


def test_a_registered_toy_method_trains_plans_and_exports_through_the_kit(toy_method, tiny_model, chat_data, tmp_path):
    from finetune.config import load_config
    from finetune.plan.memory import setup_from_config
    from finetune.training.recipe import train

    cfg = load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}", f"output_dir={tmp_path / 'run'}",
                             "method=toy_double", "training.max_steps=2", "training.batch_size=2", "max_length=128"])
    assert cfg.method_spec is toy_method
    assert setup_from_config(cfg, device="cpu").sequences_per_example == 1
    run = train(cfg)
    assert type(_Seen.trainers[-1]).__name__ == "Doubled"
    meta = json.loads((run / "adapter" / "finetune.json").read_text())
    assert meta["method"] == "toy_double" and meta["toy"] == {"doubled": True}


def test_an_unknown_method_names_the_registered_ones(tiny_model, chat_data, tmp_path):
    from finetune.config import ConfigError, load_config
    from finetune.methods import names

    with pytest.raises(ConfigError) as e:
        load_config(None, [f"model={tiny_model}", f"data.train={chat_data['train']}", f"output_dir={tmp_path}",
                           "method=rlhf"])
    assert e.value.problems[0][0] == "method" and all(n in e.value.problems[0][1] for n in names())


def test_a_method_registered_at_run_time_cannot_add_a_config_section():
    from finetune.methods import Method, register
    from finetune.section import Section

    class Settings(Section):
        weight: float = 1.0

    with pytest.raises(ValueError, match="cannot add a config section"):
        register(Method(name="toy_with_settings", description="", impl=__name__, section=Settings))
