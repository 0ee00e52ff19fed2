#!/usr/bin/env python
"""Memory of full fine-tuning vs LoRA vs QLoRA (NF4, double quant) on one generated model.

    python scripts/bench_memory.py            # the README's table: 251M-parameter Llama, ~3 min on 2 cores
    python scripts/bench_memory.py --smoke    # toy size (run by the tests)

Each method runs `finetune train` (the kit's real code path, fp32 on CPU) for a few steps in its own
child process and reports:
  model state  bytes of the live tensors that make up the model's training state, counted after
               the optimizer step of the last step, before gradients are dropped: weights (for
               NF4: the packed 4-bit data plus its absmax/code tensors), trainable parameters,
               their gradients and the optimizer's states; tensors sharing storage count once.
  peak RSS     the kernel's high-water mark (VmHWM) over training minus the RSS after imports,
               like scripts/validate_plan.py (MALLOC_MMAP_THRESHOLD_ fixed for the same reason).
               It includes file-backed pages: the memory-mapped checkpoint (LoRA's frozen
               weights are read from it in place; QLoRA keeps the mapping, with the pages it read
               to quantize, while its embeddings are views of it; see docs/plan.md).
  peak anon    the same peak for anonymous memory only (RssAnon polled every 5 ms during
               training, minus its value after imports): what cannot be reclaimed by dropping
               page cache. On a GPU neither mapping stays: the weights are copied to the device.
  plan         `finetune plan --device cpu`'s prediction of that peak, for comparison.

The default model keeps Llama-3-8B's proportions at 1/32 of the width (hidden 1024, 16 layers,
GQA 16/4 heads, MLP 3.5x, vocabulary 16,384): embeddings and lm_head are 13% of the parameters,
as in Llama-3-8B. That matters for QLoRA, which quantizes only the linear layers: the embeddings
and lm_head stay in fp32 (peft's prepare_model_for_kbit_training), so on a model whose vocabulary
is a large share of the weights (a 124M model with a 32k vocabulary: 40%) QLoRA saves less.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from validate_plan import _status, build_data, build_model  # noqa: E402


def model_state_bytes(model, optimizer) -> dict[str, int]:
    """Unique-storage bytes of weights, trainable params, grads and optimizer states."""
    import torch

    seen: set[int] = set()

    def size(t) -> int:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return 0
        st = t.untyped_storage()
        if st.data_ptr() in seen or st.nbytes() == 0:
            return 0
        seen.add(st.data_ptr())
        return st.nbytes()

    out = {"trainable": 0, "frozen weights": 0, "quant state": 0, "grads": 0, "optimizer": 0}
    for p in model.parameters():
        out["trainable" if p.requires_grad else "frozen weights"] += size(p)
    for m in model.modules():
        w = getattr(m, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                out["quant state"] += size(t)
            if getattr(qs, "state2", None) is not None:
                out["quant state"] += size(qs.state2.absmax) + size(qs.state2.code)
    for p in model.parameters():
        if p.grad is not None:
            out["grads"] += size(p.grad)
    for state in optimizer.state.values():
        for v in state.values():
            out["optimizer"] += size(v)
    out["total"] = sum(out.values())
    return out


def child(cfg_path: str, result_path: str) -> int:
    import gc
    import threading

    import bitsandbytes  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers
    from transformers import TrainerCallback

    from finetune.config import load_config
    from finetune.training.recipe import train

    gc.collect()
    baseline = _status("VmRSS")
    anon0 = _status("RssAnon")
    rec: dict = {"peak_anon": 0}
    sampling = threading.Event()

    def sample_anon() -> None:  # no kernel high-water mark exists for anonymous memory: poll it
        while not sampling.wait(0.005):
            rec["peak_anon"] = max(rec["peak_anon"], _status("RssAnon") - anon0)

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
            rec["start_rss"] = _status("VmRSS") - baseline
            threading.Thread(target=sample_anon, daemon=True).start()

        def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
            if state.global_step + 1 >= args.max_steps:  # the last step: grads and states all live
                # the Trainer hands callbacks the accelerate wrapper; its .optimizer is torch's
                rec["model_state"] = model_state_bytes(model, getattr(optimizer, "optimizer", optimizer))

        def on_train_end(self, args, state, control, **kw):
            rec["peak"] = _status("VmHWM") - baseline
            sampling.set()

    del transformers
    train(load_config(cfg_path), callbacks=[Probe()])
    Path(result_path).write_text(json.dumps(rec))
    return 0


def build_pairs(data: Path, path: Path) -> Path:
    """The rows as DPO pairs: the same prompt, the row's reply as chosen and the next row's as rejected
    (each as long as the SFT rows after truncation to max_length, so a pair is two SFT-sized sequences)."""
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    pairs = [{"prompt": r["messages"][:-1], "chosen": r["messages"][-1:],
              "rejected": rows[(i + 1) % len(rows)]["messages"][-1:]} for i, r in enumerate(rows)]
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def build(work: Path, args) -> tuple[Path, Path]:
    model = build_model(work / "model", vocab=args.vocab, hidden=args.hidden, intermediate=args.hidden * 7 // 2,
                        layers=args.layers, heads=args.heads, kv_heads=max(1, args.heads // 4), max_positions=2048)
    # 16 rows longer than max_length: every row is exactly max_length tokens
    data = build_data(work / "train.jsonl", rows=16, words=3 * args.length, overwrite=True)
    return model, data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench_output/memory")
    ap.add_argument("--methods", default="full,lora,qlora,lora_2x,lora_dpo",
                    help="full, lora, qlora, lora_dpo (LoRA DPO, BATCH_SIZE pairs of the same rows: prompt + two "
                         "replies), lora_2x (LoRA SFT on 2 x BATCH_SIZE rows: the sequences of DPO's forward)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--length", type=int, default=256, help="tokens per row (max_length)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--smoke", action="store_true", help="toy size: hidden 128, 2 layers, vocab 1024, 64 tokens")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        return child(*args._child)
    if args.smoke:
        args.hidden, args.layers, args.heads, args.vocab, args.length, args.steps = 128, 2, 4, 1024, 64, 2
    import yaml

    from finetune.plan.memory import (
        ModelShape,
        make_plan,
        param_counts,
        resolve_model_config,
        setup_from_config,
    )

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model, data = build(work, args)
    raw, src = resolve_model_config(str(model))
    shape = ModelShape.from_config(raw, src)
    n = param_counts(shape)
    print(f"model: Llama {n['total'] / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, vocab "
          f"{args.vocab}; embeddings + lm_head {(n['embed_tokens'] + n['lm_head']) / n['total']:.0%}), "
          f"{args.batch_size} x {args.length} tokens, {args.steps} steps, fp32 on CPU, LoRA r{args.lora_r} all-linear")
    results = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        d = work / method
        d.mkdir(exist_ok=True)
        dpo = method == "lora_dpo"
        cfg = {"model": str(model), "adapter": "lora" if dpo or method == "lora_2x" else method,
               "output_dir": str(d / "run"),
               "data": {"train": str(build_pairs(data, work / "pairs.jsonl") if dpo else data)},
               "overwrite": True, "max_length": args.length, "seed": 0,
               "lora": {"r": args.lora_r, "target_modules": "all-linear"},
               "training": {"max_steps": args.steps, "batch_size": args.batch_size, "save_steps": 10_000,
                            "warmup": 0, "report_to": ["none"], "logging_steps": 1}}
        if dpo:
            cfg["method"] = "dpo"
        if method == "lora_2x":
            cfg["training"]["batch_size"] = 2 * args.batch_size
        (d / "train.yaml").write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, __file__, "--_child", str(d / "train.yaml"), str(d / "result.json")],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-6000:])
            print(f"[{method}] failed with exit code {proc.returncode}", file=sys.stderr)
            return 1
        res = json.loads((d / "result.json").read_text())
        from finetune.plan.command import load_plan_config

        plan = make_plan(shape, setup_from_config(load_plan_config(d / "train.yaml"), device="cpu"), alternatives=False)
        res["plan_peak"] = plan.device_total
        res["plan_model_state"] = plan.model_states()
        results[method] = res

    MiB = 2**20
    print(f"\n{'method':<8}{'weights':>10}{'quant st.':>11}{'trainable':>11}{'grads':>9}{'optim.':>9}"
          f"{'model state':>13}{'peak RSS':>10}{'peak anon':>11}{'plan peak':>11}   (MiB)")
    for m, r in results.items():
        ms = r["model_state"]
        print(f"{m:<8}{ms['frozen weights'] / MiB:>10.0f}{ms['quant state'] / MiB:>11.1f}{ms['trainable'] / MiB:>11.0f}"
              f"{ms['grads'] / MiB:>9.0f}{ms['optimizer'] / MiB:>9.0f}{ms['total'] / MiB:>13.0f}"
              f"{r['peak'] / MiB:>10.0f}{r['peak_anon'] / MiB:>11.0f}{r['plan_peak'] / MiB:>11.0f}")
    if "lora" in results and "qlora" in results:
        ratio = results["qlora"]["model_state"]["total"] / results["lora"]["model_state"]["total"]
        print(f"\nQLoRA model state / LoRA model state = {ratio:.3f} (target <= 0.35) -> "
              f"{'MET' if ratio <= 0.35 else 'NOT MET'}")
        results["qlora_over_lora"] = ratio
    if "lora_2x" in results and "lora_dpo" in results:
        # A pair is two sequences through the model (chosen, rejected): DPO on B pairs runs the forward
        # and backward of SFT on 2B rows, plus the reference's forward without gradients and a frozen
        # copy of the adapter. What DPO adds over SFT is measured against that SFT run.
        ratio = results["lora_dpo"]["peak"] / results["lora_2x"]["peak"]
        print(f"LoRA DPO peak RSS / LoRA SFT peak RSS = {ratio:.3f}, same model and the same sequences per forward "
              f"({args.batch_size} pairs vs {2 * args.batch_size} rows; target <= 1.3: no second copy of the "
              f"weights) -> {'MET' if ratio <= 1.3 else 'NOT MET'}")
        results["lora_dpo_over_lora_2x"] = ratio
    if "lora" in results and "lora_dpo" in results:
        ratio = results["lora_dpo"]["peak"] / results["lora"]["peak"]
        print(f"LoRA DPO ({args.batch_size} pairs) / LoRA SFT ({args.batch_size} rows) peak RSS = {ratio:.3f} (twice "
              "the sequences per forward: the activations of the rejected replies)")
        results["lora_dpo_over_lora"] = ratio
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
