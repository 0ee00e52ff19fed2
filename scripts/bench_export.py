#!/usr/bin/env python
"""Peak memory of `finetune export --format gguf` next to the size of the weights it converts.

    python scripts/bench_export.py            # 251M-parameter Llama (bf16 checkpoint), f16 and q8_0
    python scripts/bench_export.py --smoke    # toy size (run by the tests)

A random-init Llama is built locally (bench_memory.py's shape: hidden 1024, 16 layers, GQA 16/4,
MLP 3.5x, vocabulary 16,384) and saved as safetensors in `--dtype` (bf16 by default, as released
checkpoints are). Each quantization is exported by `finetune export --model DIR` in its own child
process, and the child's peak RSS (the kernel's VmHWM: the whole process, imports included, and
file-backed pages too) is printed next to the size of one copy of the weights (the safetensors
bytes). Streaming converts one tensor at a time, so the peak is the interpreter and its libraries
plus about the largest tensor (in float32 while it is quantized), not the model: the target is
a peak under 1.5x one copy of the weights. With `--adapter`, a LoRA adapter of the model is also
exported as `finetune export --adapter --dtype bfloat16` runs it: the merge (`finetune merge`,
which holds the merged model in memory once) and then the same conversion.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from validate_plan import _status, build_model  # noqa: E402


def child(source: str, out: str, quant: str, result: str) -> int:
    import gguf  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from finetune.cli import main

    after_imports = _status("VmRSS")
    t0 = time.perf_counter()
    if (Path(source) / "adapter_config.json").is_file():  # merge (in bf16) then convert
        argv = ["export", "--adapter", source, "--dtype", "bfloat16"]
    else:
        argv = ["export", "--model", source]
    rc = main([*argv, "--quant", quant, "--output", out])
    rec = {"seconds": time.perf_counter() - t0, "peak_rss": _status("VmHWM"), "after_imports": after_imports}
    Path(result).write_text(json.dumps(rec))
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench_output/export")
    ap.add_argument("--quants", default="f16,q8_0")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="checkpoint dtype")
    ap.add_argument("--adapter", action="store_true",
                    help="also export a LoRA adapter of the model (r16, all linear layers) merged in bf16 first, "
                    "as `finetune export --adapter` does, at the first of --quants")
    ap.add_argument("--smoke", action="store_true", help="toy size: hidden 128, 2 layers, vocab 1024")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        return child(*args._child)
    if args.smoke:
        args.hidden, args.layers, args.heads, args.vocab = 128, 2, 4, 1024

    work = Path(args.work).resolve()
    model = work / f"model-{args.dtype}"
    if not (model / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM

        fp32 = build_model(work / "model-float32", vocab=args.vocab, hidden=args.hidden,
                           intermediate=args.hidden * 7 // 2, layers=args.layers, heads=args.heads,
                           kv_heads=max(1, args.heads // 4), max_positions=2048)
        if model != fp32:
            m = AutoModelForCausalLM.from_pretrained(fp32, dtype=getattr(torch, args.dtype))
            m.save_pretrained(model)
            for f in fp32.glob("*"):
                if f.name.startswith(("tokenizer", "chat_template")):
                    (model / f.name).write_bytes(f.read_bytes())
            del m
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    cfg = json.loads((model / "config.json").read_text())
    n_params = _n_params(model)
    print(f"model: Llama {n_params / 1e6:.1f}M parameters (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} "
          f"layers, vocab {cfg['vocab_size']}), {args.dtype} safetensors {weights / 2**20:.0f} MiB")

    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    arms = [(q, model, q) for q in quants]
    if args.adapter:
        arms.append((f"{quants[0]} (--adapter)", _adapter(model, work / "adapter"), quants[0]))
    results = []
    for label, source, quant in arms:
        tag = label.replace(" (--adapter)", "-adapter")
        out = work / f"gguf-{tag}"
        res_file = work / f"result-{tag}.json"
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, __file__, "--_child", str(source), str(out), quant, str(res_file)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-6000:])
            print(f"[{label}] failed with exit code {proc.returncode}", file=sys.stderr)
            return 1
        rec = json.loads(res_file.read_text())
        rec.update(quant=label, weights_bytes=weights, gguf_bytes=(out / f"model-{quant}.gguf").stat().st_size,
                   params=n_params)
        rec["peak_over_weights"] = rec["peak_rss"] / weights
        results.append(rec)

    MiB = 2**20
    print(f"\n{'quant':<18}{'weights':>9}{'gguf':>8}{'after imports':>15}{'peak RSS':>10}{'peak / weights':>16}"
          f"{'seconds':>9}   (MiB)")
    for r in results:
        print(f"{r['quant']:<18}{r['weights_bytes'] / MiB:>9.0f}{r['gguf_bytes'] / MiB:>8.0f}"
              f"{r['after_imports'] / MiB:>15.0f}{r['peak_rss'] / MiB:>10.0f}{r['peak_over_weights']:>15.2f}x"
              f"{r['seconds']:>9.1f}")
    worst = max(r["peak_over_weights"] for r in results)
    print(f"\nworst peak RSS / one copy of the weights: {worst:.2f}x (target < 1.5x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _adapter(model: Path, out: Path) -> Path:
    if not (out / "adapter_config.json").is_file():
        from finetune.tiny import build_random_adapter

        build_random_adapter(model, out, r=16, alpha=32, std=0.01)
    return out


def _n_params(model: Path) -> int:
    import math

    from safetensors import safe_open

    n = 0
    for f in model.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n


if __name__ == "__main__":
    raise SystemExit(main())
