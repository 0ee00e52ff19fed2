#!/usr/bin/env python
"""LoRA training throughput on one GPU: the kit's defaults (and its variants) against plain TRL, on a
random model of a real shape with a real-size vocabulary.

    python scripts/bench_gpu.py --shape 1b                       # the table of docs/benchmarks.md
    python scripts/bench_gpu.py --shape 8b --arms kit,trl_packed
    python scripts/bench_gpu.py --smoke                          # CPU, toy shape, a few steps (tests)

Arms, each in a fresh process (its own peak memory, nothing cached from another arm):
  kit         `finetune train` defaults (length-grouped batches, the chunked loss, no checkpointing)
  kit_ckpt    the kit with training.gradient_checkpointing=true
  kit_qlora   the kit with adapter=qlora (NF4 base)
  trl         TRL's SFTTrainer defaults (random order, gradient checkpointing on)
  trl_packed  TRL with packing=True and padding_free=True (best-fit packing of max_length rows): the
              strongest plain-TRL setup
Every arm trains the same data (catalogue-price chats of 4-70 products, the answer trained), LoRA
r16/alpha 32 on all linear layers, batch 8, max_length 2048, the same learning rate, schedule and
warmup, one epoch; bf16 on a GPU, fp32 on CPU. Shapes (random weights, Llama architecture):
  1b  Llama-3.2-1B: hidden 2048, 16 layers, 32/8 heads, intermediate 8192, vocabulary 128,256, tied
  3b  Llama-3.2-3B: hidden 3072, 28 layers, 24/8 heads, intermediate 8192, vocabulary 128,256, tied
  8b  Llama-3.1-8B: hidden 4096, 32 layers, 32/8 heads, intermediate 14336, vocabulary 128,256
The tokenizer is a small one trained on the data (the vocabulary's extra rows are never a target).

Printed per arm: train s (the training loop: on_train_begin to on_train_end), tokens/s (non-pad
tokens the Trainer counted / train s), useful TFLOP/s and MFU (4 N_frozen + 6 N_lora per token plus
12 L d s^2 attention per sequence, against the GPU's dense bf16 peak from the kit's table of known
GPUs, or a measured matmul; finetune.training.throughput), peak memory (GPU: max_memory_allocated;
CPU: the process's peak RSS), the first step's loss and the held-out NLL of the answers (the kit's
`evaluate()`, the same for every arm). Then the ratios the GPU-efficiency targets are stated in.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

ARMS = ("kit", "kit_ckpt", "kit_qlora", "trl", "trl_packed")
SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    "3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=128),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, head_dim=128),
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=4096, tie_word_embeddings=True, head_dim=16),
}


def prepare(work: Path, args) -> dict:
    """Data (train and held-out chats) and a random model of the shape, saved with a small tokenizer."""
    import torch
    from bench_train import make_example
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finetune.tiny import build_tiny_model

    rng = random.Random(args.seed)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.examples), ("test", args.eval_examples)):
        path = data / f"{split}.jsonl"
        if not path.is_file():
            with path.open("w") as fh:
                for _ in range(n):
                    fh.write(json.dumps(make_example(rng, args.min_items, args.max_items)) + "\n")
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer_config.json").is_file():
        build_tiny_model(tok_dir, [data / "train.jsonl"], vocab_size=512, hidden_size=32, layers=1, seed=args.seed)
    model = work / f"model_{args.shape}"
    if not (model / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(tok_dir)
        cfg = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(4096, args.max_length),
                          rope_theta=500000.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        torch.manual_seed(args.seed)
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            m = LlamaForCausalLM(cfg).to(dtype)
        m.save_pretrained(model)
        tok.save_pretrained(model)
        del m
    return {"train": str(data / "train.jsonl"), "test": str(data / "test.jsonl"), "model": str(model)}


def timer_callback():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        t0 = t1 = 0.0
        steps = tokens = 0
        losses: list

        def on_train_begin(self, args, state, control, **kw):
            self.losses = []
            self.t0 = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_train_end(self, args, state, control, **kw):
            self.t1, self.steps, self.tokens = time.perf_counter(), state.global_step, state.num_input_tokens_seen

    return Timer()


def run_trl(spec: dict, out: Path, arm: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from finetune.data.files import read_chat_jsonl

    gpu = torch.cuda.is_available()
    rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in read_chat_jsonl(spec["train"])]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16 if gpu else torch.float32)
    extra = {"max_steps": spec["max_steps"]} if spec["max_steps"] else {}
    if arm == "trl_packed":
        extra.update(packing=True, padding_free=True)
    args = SFTConfig(output_dir=str(out / "trl_out"), num_train_epochs=1, per_device_train_batch_size=spec["batch_size"],
                     learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, bf16=gpu, use_cpu=not gpu,
                     report_to="none", save_strategy="no", seed=spec["seed"], max_length=spec["max_length"],
                     logging_steps=1, include_num_input_tokens_seen="non_padding", **extra)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    timer = timer_callback()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft, callbacks=[timer])
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    return {"train_s": timer.t1 - timer.t0, "steps": timer.steps, "tokens": timer.tokens,
            "first_loss": timer.losses[0] if timer.losses else None, "adapter_dir": str(out / "adapter")}


def run_kit(spec: dict, out: Path, arm: str) -> dict:
    from finetune.config import load_config
    from finetune.training.recipe import train

    over = [f"model={spec['model']}", f"data.train={spec['train']}", f"output_dir={out / 'run'}", "overwrite=true",
            f"training.batch_size={spec['batch_size']}", f"max_length={spec['max_length']}", f"seed={spec['seed']}",
            "lora.r=16", "lora.alpha=32", "training.logging_steps=1", "training.report_to=[none]",
            "eval.after_train=false", "force=true"]
    if spec["max_steps"]:
        over.append(f"training.max_steps={spec['max_steps']}")
    if arm == "kit_ckpt":
        over.append("training.gradient_checkpointing=true")
    if arm == "kit_qlora":
        over.append("adapter=qlora")
    timer = timer_callback()
    run = train(load_config(None, over), callbacks=[timer])
    own = json.loads((run / "run.json").read_text()).get("throughput") or {}
    return {"train_s": timer.t1 - timer.t0, "steps": timer.steps, "tokens": timer.tokens,
            "first_loss": timer.losses[0] if timer.losses else None, "adapter_dir": str(run / "adapter"),
            "own_log_mfu": own.get("mfu")}


def child(spec_path: str, arm: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["work"]) / arm
    out.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    res = (run_trl if arm.startswith("trl") else run_kit)(spec, out, arm)
    res["peak_mem_gib"] = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    (out / "result.json").write_text(json.dumps(res))


def held_out_nll(spec: dict, adapter: str, out: Path) -> float:
    from finetune.eval.evaluation import evaluate

    rep = evaluate(data=spec["test"], adapter=adapter, output=out, metrics=["exact_match"], max_new_tokens=4,
                   batch_size=8, distributed=False)
    return rep["models"]["tuned"]["intrinsic"]["nll"]


def useful_flops_per_token(model_dir: str, lengths: list[int]) -> tuple[float, float, dict]:
    """(FLOPs per token, attention FLOPs per token, the counts): 4 N + 6 N_lora per token (bench_train's
    counts), and 12 L d s^2 per sequence spread over its tokens as the data's mean s^2 / s (the arms see
    the same data), d the attention's width (heads x head_dim)."""
    from bench_train import model_counts

    from finetune.plan.memory import ModelShape, resolve_model_config

    c = model_counts(model_dir, 16)
    shape = ModelShape.from_config(*resolve_model_config(model_dir))
    width = shape.num_attention_heads * shape.head_dim
    attn = 12 * shape.num_hidden_layers * width * sum(s * s for s in lengths) / max(1, sum(lengths))
    return 4 * c["N"] + 6 * c["N_lora"], attn, {"N": c["N"], "N_lora": c["N_lora"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=[s for s in SHAPES if s != "smoke"], default="1b")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma list of: {', '.join(ARMS)}")
    ap.add_argument("--work", default="bench_output/gpu")
    ap.add_argument("--examples", type=int, default=1536)
    ap.add_argument("--eval-examples", type=int, default=128)
    ap.add_argument("--min-items", type=int, default=4)
    ap.add_argument("--max-items", type=int, default=70)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--max-steps", type=int, default=0, help="stop every arm after this many steps (0: one epoch)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="CPU, a toy shape, 48 examples, 3 steps per arm")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--_child", nargs=2, metavar=("SPEC", "ARM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        child(*args._child)
        return 0
    if args.smoke:
        args.shape, args.examples, args.eval_examples, args.min_items, args.max_items = "smoke", 48, 8, 2, 6
        args.max_steps, args.max_length = args.max_steps or 3, 256
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if bad := [a for a in arms if a not in ARMS]:
        ap.error(f"--arms: unknown arm(s) {bad}; known: {', '.join(ARMS)}")

    import torch
    from bench_train import token_lengths

    from finetune.training.throughput import device_peak

    work = Path(args.work).resolve() / args.shape
    work.mkdir(parents=True, exist_ok=True)
    spec = prepare(work, args)
    spec.update(work=str(work), batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                max_steps=args.max_steps)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    lens, _ = token_lengths(spec["model"], spec["train"])
    lens = [min(s, args.max_length) for s in lens]
    per_token, attn_per_token, counts = useful_flops_per_token(spec["model"], lens)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak, peak_name = device_peak(device)
    import transformers
    import trl

    print(f"device: {peak_name}; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
    print(f"model: {args.shape}, N={counts['N'] / 1e9:.3f}B matmul params, N_lora={counts['N_lora'] / 1e6:.2f}M; "
          f"data: {len(lens)} chats of {min(lens)}-{max(lens)} tokens (mean {sum(lens) / len(lens):.0f})")
    results: dict = {}
    for arm in arms:
        print(f"[{arm}] training ...", flush=True)
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, __file__, "--_child", str(spec_path), arm], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            print(f"[{arm}] failed with exit code {proc.returncode}", file=sys.stderr)
            results[arm] = {"failed": proc.returncode}
            continue
        res = json.loads((work / arm / "result.json").read_text())
        res["tokens_per_s"] = res["tokens"] / res["train_s"]
        res["tflops"] = res["tokens"] * (per_token + attn_per_token) / res["train_s"] / 1e12
        res["mfu"] = res["tflops"] * 1e12 / peak
        res["held_out_nll"] = held_out_nll(spec, res["adapter_dir"], work / arm / "eval")
        results[arm] = res
    print(f"\n{'arm':<12}{'train s':>9}{'steps':>7}{'tokens/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}"
          f"{'1st loss':>10}{'held-out NLL':>14}")
    for arm, r in results.items():
        if "failed" in r:
            print(f"{arm:<12}  failed (exit code {r['failed']})")
            continue
        print(f"{arm:<12}{r['train_s']:>9.1f}{r['steps']:>7}{r['tokens_per_s']:>10,.0f}{r['tflops']:>9.3g}"
              f"{r['mfu']:>7.1%}{r['peak_mem_gib']:>10.2f}{r['first_loss'] or float('nan'):>10.4f}{r['held_out_nll']:>14.4f}")
    ok = {a: r for a, r in results.items() if "failed" not in r}

    def ratio(a: str, b: str, key: str = "tokens_per_s") -> float | None:
        return ok[a][key] / ok[b][key] if a in ok and b in ok else None

    targets = [("kit MFU >= 35%", ok.get("kit", {}).get("mfu"), 0.35),
               ("kit / trl tokens/s >= 3", ratio("kit", "trl"), 3.0),
               ("kit / trl_packed tokens/s >= 1.5", ratio("kit", "trl_packed"), 1.5),
               ("kit_ckpt / trl tokens/s >= 2", ratio("kit_ckpt", "trl"), 2.0),
               ("kit_qlora / kit tokens/s >= 0.7", ratio("kit_qlora", "kit"), 0.7)]
    mem = ratio("kit_ckpt", "trl", "peak_mem_gib")
    print()
    for name, value, bar in targets:
        if value is not None:
            print(f"{name:<36}{value:>8.3g}  {'MET' if value >= bar else 'NOT MET'}")
    if mem is not None:
        print(f"{'kit_ckpt / trl peak memory <= 1.1':<36}{mem:>8.3g}  {'MET' if mem <= 1.1 else 'NOT MET'}")
    if "kit" in ok:
        for other in ("trl", "kit_ckpt"):
            if other in ok:
                rel = ok["kit"]["held_out_nll"] / ok[other]["held_out_nll"] - 1
                print(f"{'kit held-out NLL vs ' + other:<36}{rel:>+8.2%}  (within 1%: {'yes' if abs(rel) <= 0.01 else 'no'})")
    results["device"] = {"peak_flops": peak, "name": peak_name, "torch": torch.__version__,
                         "transformers": transformers.__version__, "trl": trl.__version__}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all("failed" not in r for a, r in results.items() if a in ARMS) else 1


if __name__ == "__main__":
    sys.exit(main())
