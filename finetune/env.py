"""`finetune env`: what this environment is, for a bug report and for "will the kit work here?".

Every dependency with its installed version and a verdict against the range the kit declares and
tests (pyproject.toml: CI installs each range's lower bound in its floors leg and the newest
release in its main leg), the optional extras, and the machine: CUDA runtime and driver, each GPU
(name, memory, compute capability, bf16), NCCL, whether bitsandbytes and DeepSpeed load, the
attention implementations at hand, the offline switches and the accelerate config in use.

Loads no model and never raises on a missing or broken package: that is what it reports. Each
probe runs on its own, so one failure leaves the others' answers intact.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["collect", "env_command", "format_report", "declared_requirements"]

DIST_NAME = "finetune-kit"
# Optional packages the kit uses when present, by distribution name (pip install NAME).
OPTIONAL = {
    "liger-kernel": "training.kernels=liger (Triton kernels, CUDA)",
    "vllm": "finetune generate --engine vllm (GPU)",
    "kernels": "attention kernels from the Hub's local cache",
    "flash-attn": "attn_implementation=flash_attention_2",
    "ray": "data-prep --engine ray",
    "lm-eval": "finetune eval --lm-eval-tasks",
    "llama-cpp-python": "running an exported GGUF in tests",
}
ENV_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
                "CUDA_VISIBLE_DEVICES", "ACCELERATE_CONFIG_FILE", "TOKENIZERS_PARALLELISM")


def _probe(fn: Callable[[], Any]) -> Any:
    """fn()'s answer, or {"error": "..."} when it raised: a report never dies on one question."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 -- whatever broke is the answer
        return {"error": f"{type(exc).__name__}: {exc}".strip()[:300]}


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def declared_requirements() -> tuple[list[str], dict[str, list[str]], str]:
    """(dependencies, optional extras, where they were read): from the installed kit's metadata, or
    from the pyproject.toml beside the package when it runs from a checkout that was not installed."""
    try:
        reqs = md.requires(DIST_NAME) or []
    except md.PackageNotFoundError:
        reqs = None
    if reqs is not None:
        deps = [r for r in reqs if "extra ==" not in r]
        extras: dict[str, list[str]] = {}
        for r in reqs:
            if "extra ==" in r:
                req, marker = r.split(";", 1)
                name = marker.split("extra ==")[1].strip().strip("'\"")
                extras.setdefault(name, []).append(req.strip())
        return deps, extras, f"installed {DIST_NAME} {_version(DIST_NAME)}"
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    return list(project["dependencies"]), dict(project.get("optional-dependencies", {})), str(pyproject)


def _packages() -> dict[str, Any]:
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    deps, extras, source = declared_requirements()
    rows = []
    for line in deps:
        req = Requirement(line)
        installed = _version(req.name)
        if installed is None:
            verdict = "missing"
        else:
            try:
                # a local build tag (torch 2.13.0+cpu) is the same release
                ok = req.specifier.contains(Version(installed).public, prereleases=True)
                verdict = "ok" if ok else "outside"
            except InvalidVersion:
                verdict = "unknown"
        rows.append({"name": req.name, "installed": installed, "tested": str(req.specifier) or "any",
                     "verdict": verdict})
    declared_optional, in_ci = {}, {Requirement(line).name for line in extras.get("dev", [])}
    for reqs in extras.values():
        for line in reqs:
            r = Requirement(line)
            declared_optional.setdefault(r.name, str(r.specifier))

    def optional_tested(name: str) -> str:
        # CI installs the dev extra's packages at their newest release, in both legs
        if name in in_ci:
            return f"newest ({declared_optional[name]})"
        return f"no ({declared_optional[name]})" if name in declared_optional else "no"

    optional = [{"name": name, "installed": _version(name), "tested": optional_tested(name), "for": what}
                for name, what in OPTIONAL.items()]
    bad = [r for r in rows if r["verdict"] != "ok"]
    overall = ("tested: every dependency is inside the range CI tests" if not bad else
               "UNTESTED: " + ", ".join(f"{r['name']} {r['installed'] or 'missing'} (tested {r['tested']})"
                                        for r in bad))
    return {"source": source, "dependencies": rows, "optional": optional, "verdict": overall, "ok": not bad}


def _driver_version() -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=20)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _torch() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"version": torch.__version__, "cuda_build": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available(), "gpus": []}
    if torch.cuda.is_available():
        info["driver"] = _probe(_driver_version)
        info["cudnn"] = torch.backends.cudnn.version()
        info["nccl"] = _probe(lambda: ".".join(map(str, torch.cuda.nccl.version())))
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                                 "capability": f"{p.major}.{p.minor}", "bf16": p.major >= 8})
    mps = getattr(torch.backends, "mps", None)
    info["mps_available"] = bool(mps and mps.is_available())
    return info


def _attention() -> dict[str, Any]:
    out: dict[str, Any] = {"sdpa": True}
    out["flex_attention"] = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    out["flash_attn"] = _version("flash-attn")
    out["hub_kernels_package"] = _version("kernels")
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" /
                                                                       "huggingface")) / "hub")
    out["hub_kernels_cached"] = sorted(p.name.removeprefix("models--").replace("--", "/")
                                       for p in cache.glob("models--kernels-community--*")) if cache.is_dir() else []
    return out


def _bitsandbytes() -> dict[str, Any]:
    if _version("bitsandbytes") is None:
        return {"installed": None}
    import bitsandbytes as bnb
    import torch

    info: dict[str, Any] = {"installed": bnb.__version__}
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def four_bit():
        # quantize and dequantize one small block on this device: the op a QLoRA run needs first
        w = torch.randn(64, 64, device=device, dtype=torch.float32)
        q, state = bnb.functional.quantize_4bit(w, quant_type="nf4")
        err = (bnb.functional.dequantize_4bit(q, state) - w).abs().max().item()
        return {"device": device, "nf4_roundtrip_max_error": round(err, 4)}

    info["4bit"] = _probe(four_bit)
    return info


def _deepspeed() -> dict[str, Any]:
    if _version("deepspeed") is None:
        return {"installed": None}
    env = dict(os.environ)
    # DeepSpeed prints its accelerator choice on import; run it apart so this report stays clean and
    # a broken DeepSpeed (a CUDA mismatch while it builds ops) cannot take this process down.
    code = ("import json, shutil, deepspeed\nfrom deepspeed.accelerator import get_accelerator\n"
            "from deepspeed.git_version_info import installed_ops\n"
            "acc = get_accelerator()\nname = 'FusedAdamBuilder' if acc._name == 'cuda' else 'CPUAdamBuilder'\n"
            "try:\n    ok = bool(acc.get_op_builder(name)().is_compatible(verbose=False))\n"
            "except Exception as e:\n    ok = f'{type(e).__name__}: {e}'[:200]\n"
            "print('JSON' + json.dumps({'installed': deepspeed.__version__, 'accelerator': acc._name, "
            "'prebuilt_ops': sorted(k for k, v in installed_ops.items() if v), 'optimizer_op': name, "
            "'optimizer_op_buildable': ok, 'ninja': shutil.which('ninja') is not None}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    for line in res.stdout.splitlines():
        if line.startswith("JSON"):
            return json.loads(line[4:])
    return {"installed": _version("deepspeed"), "error": (res.stderr.strip().splitlines() or ["import failed"])[-1]}


def _accelerate_config() -> dict[str, Any]:
    path = os.environ.get("ACCELERATE_CONFIG_FILE")
    if not path:
        from accelerate.commands.config import default_config_file

        path = default_config_file
    p = Path(path)
    out: dict[str, Any] = {"path": str(p), "exists": p.is_file()}
    if p.is_file():
        import yaml

        cfg = yaml.safe_load(p.read_text()) or {}
        out.update({k: cfg.get(k) for k in ("distributed_type", "num_processes", "num_machines", "mixed_precision",
                                            "use_cpu") if k in cfg})
    return out


def collect() -> dict[str, Any]:
    """The whole report as a dict (what `finetune env --json` prints)."""
    from finetune import __version__

    return {
        "kit": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "packages": _probe(_packages),
        "torch": _probe(_torch),
        "attention": _probe(_attention),
        "bitsandbytes": _probe(_bitsandbytes),
        "deepspeed": _probe(_deepspeed),
        "accelerate_config": _probe(_accelerate_config),
        "environment": {k: os.environ.get(k) for k in ENV_SWITCHES},
    }


def format_report(r: dict[str, Any]) -> str:
    lines = [f"finetune-kit {r['kit']} | Python {r['python']} | {r['platform']} | {r['cpus']} CPUs"]
    pk = r["packages"]
    if "error" in pk:
        lines.append(f"packages: could not be read ({pk['error']})")
    else:
        lines += ["", f"verdict: {pk['verdict']}", f"(ranges from {pk['source']})", "",
                  f"{'package':22} {'installed':20} {'tested':18} verdict"]
        lines += [f"{d['name']:22} {d['installed'] or '-':20} {d['tested']:18} {d['verdict']}" for d in pk["dependencies"]]
        lines += ["", f"{'optional':22} {'installed':20} {'tested':18} for"]
        lines += [f"{d['name']:22} {d['installed'] or 'not installed':20} {d['tested']:18} {d['for']}"
                  for d in pk["optional"]]
    t = r["torch"]
    lines.append("")
    if "error" in t:
        lines.append(f"torch: {t['error']}")
    else:
        lines.append(f"torch {t['version']} (CUDA build {t['cuda_build'] or 'none'}), CUDA available: "
                     f"{t['cuda_available']}" + (f", driver {t.get('driver')}, cuDNN {t.get('cudnn')}, NCCL {t.get('nccl')}"
                                                 if t["cuda_available"] else ""))
        for g in t["gpus"]:
            lines.append(f"  GPU {g['index']}: {g['name']}, {g['memory_gib']} GiB, compute {g['capability']}, "
                         f"bf16 {'yes' if g['bf16'] else 'no'}")
        if not t["gpus"]:
            lines.append("  no GPU: training and evaluation run on the CPU")
    a = r["attention"]
    lines.append("attention: " + (a["error"] if "error" in a else
                                  f"sdpa yes, flex_attention {'yes' if a['flex_attention'] else 'no'}, flash-attn "
                                  f"{a['flash_attn'] or 'no'}, Hub kernels package {a['hub_kernels_package'] or 'no'}"
                                  f" (cached: {', '.join(a['hub_kernels_cached']) or 'none'})"))
    b = r["bitsandbytes"]
    lines.append("bitsandbytes: " + (b.get("error") or ("not installed" if not b.get("installed") else
                                     f"{b['installed']}, 4-bit on {b['4bit'].get('device', '?')}: "
                                     + ("ok" if "error" not in b["4bit"] else b["4bit"]["error"]))))
    d = r["deepspeed"]
    lines.append("deepspeed: " + ("not installed" if not d.get("installed") else
                                  f"{d['installed']}, " + (d["error"] if "error" in d else
                                                          f"accelerator {d['accelerator']}, prebuilt ops: "
                                                          f"{', '.join(d['prebuilt_ops']) or 'none'}; "
                                                          f"{d['optimizer_op']} can be built here: "
                                                          f"{d['optimizer_op_buildable']} (ninja "
                                                          f"{'found' if d['ninja'] else 'missing'})")))
    ac = r["accelerate_config"]
    lines.append("accelerate config: " + (ac["error"] if "error" in ac else
                                          f"{ac['path']}" + ("" if ac["exists"] else " (none: defaults)")
                                          + "".join(f", {k} {v}" for k, v in ac.items() if k not in ("path", "exists"))))
    env = {k: v for k, v in r["environment"].items() if v is not None}
    lines.append("environment: " + (", ".join(f"{k}={v}" for k, v in env.items()) or "no HF/CUDA switches set"))
    return "\n".join(lines)


def env_command(args) -> int:
    report = collect()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
