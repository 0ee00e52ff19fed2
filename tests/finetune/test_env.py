"""`finetune env`: versions against the tested ranges, the machine, and nothing raised when a
package is missing or broken (that is what the report is for)."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys

import pytest

from finetune import env
from tests.conftest import REPO


def test_env_json_lists_every_declared_dependency_with_a_verdict():
    out = subprocess.run([sys.executable, "-m", "finetune", "env", "--json"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    deps, _, _ = env.declared_requirements()
    names = {d["name"] for d in r["packages"]["dependencies"]}
    assert names == {line.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() for line in deps}
    assert {"transformers", "torch", "peft", "trl", "accelerate", "deepspeed"} <= names
    for d in r["packages"]["dependencies"]:
        assert d["verdict"] in {"ok", "outside", "missing", "unknown"}, d
    assert r["python"] == sys.version.split()[0]
    assert {"sdpa", "flex_attention"} <= set(r["attention"])
    assert "environment" in r and "HF_HUB_OFFLINE" in r["environment"]


@pytest.fixture
def no_deepspeed_probe(monkeypatch):
    """The DeepSpeed probe imports DeepSpeed in a child process (seconds): the JSON test runs it."""
    monkeypatch.setattr(env, "_deepspeed", lambda: {"installed": None})


def test_a_version_outside_the_tested_range_and_a_missing_package_are_reported(monkeypatch, no_deepspeed_probe):
    real = env._version
    fake = {"transformers": "5.3.0", "liger-kernel": None, "trl": None}
    monkeypatch.setattr(env, "_version", lambda name: fake[name] if name in fake else real(name))
    p = env._packages()
    rows = {d["name"]: d for d in p["dependencies"]}
    assert rows["transformers"]["verdict"] == "outside" and rows["trl"]["verdict"] == "missing"
    assert not p["ok"] and "transformers 5.3.0" in p["verdict"] and "trl missing" in p["verdict"]
    assert {d["name"]: d["installed"] for d in p["optional"]}["liger-kernel"] is None
    text = env.format_report({**env.collect(), "packages": p})
    assert "UNTESTED" in text and "liger-kernel" in text and "not installed" in text


def test_a_broken_probe_is_reported_not_raised_and_no_gpu_is_said(monkeypatch, no_deepspeed_probe):
    import torch

    def broken():
        raise ImportError("libcudart.so.13: cannot open shared object file")

    monkeypatch.setattr(env, "_bitsandbytes", broken)
    r = env.collect()
    assert "libcudart" in r["bitsandbytes"]["error"]
    text = env.format_report(r)
    assert "bitsandbytes: ImportError: libcudart" in text
    if not torch.cuda.is_available():
        assert r["torch"]["gpus"] == [] and r["torch"]["cuda_available"] is False
        assert "no GPU" in text


def test_ranges_come_from_pyproject_when_the_kit_is_not_installed(monkeypatch):
    """On a machine that runs the checkout from PYTHONPATH (no pip install), the ranges are read
    from the pyproject.toml beside the package."""
    def not_installed(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(env.md, "requires", not_installed)
    deps, extras, source = env.declared_requirements()
    assert source.endswith("pyproject.toml") and any(d.startswith("transformers") for d in deps)
    assert "liger" in extras
