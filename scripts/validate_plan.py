"""Check `finetune plan`'s CPU-mode prediction against real training runs on this machine.

    python scripts/validate_plan.py            # ~10 min on 2 cores; rewrites the table in docs/plan.md

Every case runs the real code path, `finetune train` (single process: `python -m finetune train`-
equivalent; 2 processes: `accelerate launch --config_file configs/accelerate/deepspeed_zero{2,3}.yaml
--num_processes 2`), on a generated ~125M-parameter Llama (hidden 768, 12 layers, GQA 12/4 heads,
vocab 32000), with examples longer than max_length so every row is exactly max_length tokens.

What is measured, per process: the training peak = VmHWM (the kernel's RSS high-water mark) over
`Trainer.train()` minus VmRSS right after the imports (torch, transformers, peft, deepspeed,
bitsandbytes, datasets). The high-water mark is reset (`/proc/self/clear_refs` = 5) when
`Trainer.train()` starts, so the load-time transient (from_pretrained reads the safetensors file while
building the model) is reported separately, not mixed in. The plan predicts the same quantity with
`--device cpu`: fp32, no CUDA caching allocator, a 5% allowance for heap fragmentation. The children
run with MALLOC_MMAP_THRESHOLD_=131072 so that a freed tensor's memory goes back to the OS (see
docs/plan.md: glibc otherwise keeps it, and the peak measures allocation history).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("PLAN_VALIDATE_DIR", "/tmp/finetune_plan_validate"))
DOC = REPO / "docs" / "plan.md"
TOLERANCE = 0.15

# name, adapter, deepspeed stage (0 = none), processes, max_length, gradient checkpointing
CASES = [
    ("full", "full", 0, 1, 256, False),
    ("full", "full", 0, 1, 512, False),
    ("lora", "lora", 0, 1, 256, False),
    ("lora", "lora", 0, 1, 512, False),
    ("lora+ckpt", "lora", 0, 1, 512, True),
    ("qlora", "qlora", 0, 1, 256, False),
    ("qlora", "qlora", 0, 1, 512, False),
    ("full ZeRO-2", "full", 2, 2, 256, False),
    ("full ZeRO-3", "full", 3, 2, 256, False),
    ("lora ZeRO-2", "lora", 2, 2, 256, False),
    ("lora ZeRO-3", "lora", 3, 2, 256, False),
    ("qlora ZeRO-2", "qlora", 2, 2, 256, False),
    # method distill: the same student, a larger teacher (TEACHER_SHAPE) sharing its tokenizer
    ("lora distill", "lora", 0, 1, 256, False),
    ("lora distill", "lora", 0, 1, 512, False),
    ("lora distill ZeRO-3", "lora", 3, 2, 256, False),
]
TEACHER_SHAPE = dict(hidden=1024, intermediate=2816, layers=16, heads=16, kv_heads=4)
BATCH = 2
REUSE = False

# --varied: data of realistic, varying length (the plan reads its lengths from the data cache), a second
# model size, preference pairs. name, adapter, stage, processes, max_length, checkpointing, model, batch
VARIED_CASES = [
    ("full", "full", 0, 1, 512, False, "model", 4),
    ("lora", "lora", 0, 1, 512, False, "model", 4),
    ("lora+ckpt", "lora", 0, 1, 512, True, "model", 4),
    ("qlora", "qlora", 0, 1, 512, False, "model", 4),
    ("full", "full", 0, 1, 1024, False, "small", 4),
    ("lora", "lora", 0, 1, 1024, False, "small", 4),
    ("lora ZeRO-2", "lora", 2, 2, 512, False, "model", 4),
    ("lora dpo", "lora", 0, 1, 512, False, "model", 2),
    ("full dpo", "full", 0, 1, 512, False, "model", 2),
    ("lora simpo", "lora", 0, 1, 512, False, "model", 2),
    ("lora kto", "lora", 0, 1, 512, False, "model", 4),
    ("lora distill", "lora", 0, 1, 512, False, "model", 4),
    # method grpo: the chats read as prompts (their reply is the reference), 4 completions of up to 256
    # tokens per prompt (the random model never stops early), 2 prompts per micro-batch (docs/plan.md,
    # "Online RL from rewards").
    ("lora grpo", "lora", 0, 1, 512, False, "model", 8),
]
GRPO_SETTINGS = {"rewards": [{"type": "exact_match"}], "num_generations": 4, "max_completion_length": 256}
# Methods whose cases train on the preference pairs (KTO reads each pair as a desirable and an undesirable example).
PAIR_METHODS = ("dpo", "simpo", "kto")
SMALL_SHAPE = dict(hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=2, max_positions=2048)


# ----------------------------------------------------------------------------------------------
# child: runs inside each training process
# ----------------------------------------------------------------------------------------------
def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(argv: list[str]) -> int:
    import gc

    import bitsandbytes  # noqa: F401
    import datasets  # noqa: F401
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers
    from transformers.models.llama import modeling_llama  # noqa: F401

    from finetune import cli, train  # noqa: F401

    gc.collect()
    baseline = _status("VmRSS")
    out_dir = Path(os.environ["PLAN_VALIDATE_OUT"])
    rank = int(os.environ.get("RANK", "0"))
    record: dict[str, int] = {"baseline": baseline}
    original = transformers.Trainer.train

    def measured_train(self, *a, **kw):
        record["load_peak"] = _status("VmHWM") - baseline
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        record["start"] = _status("VmRSS") - baseline
        try:
            return original(self, *a, **kw)
        finally:
            record["train_peak"] = _status("VmHWM") - baseline
            (out_dir / f"rank{rank}.json").write_text(json.dumps(record))

    transformers.Trainer.train = measured_train
    return cli.main(argv)


# ----------------------------------------------------------------------------------------------
# parent: builds the model and data, launches, compares
# ----------------------------------------------------------------------------------------------
def build_model(path: Path, *, vocab: int = 32000, hidden: int = 768, intermediate: int = 2048,
                layers: int = 12, heads: int = 12, kv_heads: int = 4, max_positions: int = 1024) -> Path:
    """A random-init Llama of the given shape with the small local tokenizer (its ids fit any vocab)."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.tiny import _DEFAULT_CORPUS, build_tokenizer

    tok = build_tokenizer(_DEFAULT_CORPUS, vocab_size=512)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                      tie_word_embeddings=False, bos_token_id=None,
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_data(path: Path, *, rows: int = 64, words: int = 900, overwrite: bool = False) -> Path:
    """Chats whose reply is longer than max_length, so every row is truncated to exactly max_length."""
    if path.is_file() and not overwrite:
        return path
    rng = random.Random(0)
    vocab = "the quick brown fox jumps over lazy dog price kettle costs lamp chair desk".split()
    out = []
    for _ in range(rows):
        reply = " ".join(rng.choice(vocab) for _ in range(words))  # > 512 tokens: every row is truncated
        out.append({"messages": [{"role": "user", "content": "Say something."},
                                 {"role": "assistant", "content": reply}]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def build_varied_data(path: Path, *, rows: int = 256, pairs: bool = False, overwrite: bool = False) -> Path:
    """Chats (or preference pairs) whose lengths spread like real data: log-normal reply lengths, median
    about 120 words, a tail past 1,000 (truncated at max_length), a few very short ones."""
    if path.is_file() and not overwrite:
        return path
    rng = random.Random(1)
    vocab = "the quick brown fox jumps over lazy dog price kettle costs lamp chair desk".split()

    def text(median: float, most: int = 2500) -> str:
        n = max(1, min(most, int(rng.lognormvariate(math.log(median), 0.9))))
        return " ".join(rng.choice(vocab) for _ in range(n))

    out = []
    for _ in range(rows):
        prompt = [{"role": "user", "content": text(15, most=150)}]  # every prompt leaves room for its reply
        if pairs:
            out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": text(120)}],
                        "rejected": [{"role": "assistant", "content": text(120)}]})
        else:
            out.append({"messages": [*prompt, {"role": "assistant", "content": text(120)}]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(case, model: Path, data: Path, teacher: Path | None = None, *, batch: int = BATCH,
             prefix: str = "") -> dict:
    import yaml

    name, adapter, stage, nproc, length, ckpt = case[:6]
    tag = re.sub(r"\W+", "_", f"{prefix}{name}_{length}_{nproc}_{int(ckpt)}")
    d = WORK / "runs" / tag
    d.mkdir(parents=True, exist_ok=True)
    if REUSE and len(list(d.glob("rank*.json"))) == nproc and (d / "train.yaml").is_file():
        secs = json.loads((d / "seconds.json").read_text()) if (d / "seconds.json").is_file() else float("nan")
        return {"cfg": d / "train.yaml", "ranks": [json.loads(f.read_text()) for f in sorted(d.glob("rank*.json"))],
                "seconds": secs}
    for f in d.glob("rank*.json"):
        f.unlink()
    cfg = {
        "model": str(model), "adapter": adapter, "data": {"train": str(data)}, "output_dir": str(d / "run"),
        "overwrite": True, "max_length": length, "seed": 0,
        "lora": {"r": 16, "target_modules": "all-linear"},
        "training": {"max_steps": 3, "batch_size": batch, "logging_steps": 1, "save_steps": 1000,
                     "warmup": 0, "lr_scheduler": "constant", "report_to": ["none"],
                     "gradient_checkpointing": ckpt},
    }
    if stage:
        cfg["deepspeed"] = str(REPO / f"configs/deepspeed/zero{stage}.json")
    if "distill" in name:
        cfg.update(method="distill", distill={"teacher": str(teacher)})
    for method in PAIR_METHODS:
        if method in name.split():
            cfg.update(method=method)
    if "grpo" in name.split():
        cfg.update(method="grpo", grpo=GRPO_SETTINGS)
    cfg_path = d / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    # glibc's dynamic mmap threshold keeps freed 0.1-32 MB tensors in the heap, so without a fixed
    # threshold the RSS peak follows allocation history, not live tensors (LoRA measured +33% here).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PLAN_VALIDATE_OUT": str(d), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    me = str(Path(__file__).resolve())
    if nproc == 1:
        cmd = [sys.executable, me, "--child", "train", str(cfg_path)]
    else:
        accel = Path(sys.executable).with_name("accelerate")
        cmd = [str(accel), "launch", "--config_file", f"configs/accelerate/deepspeed_zero{stage}.yaml",
               "--num_processes", str(nproc), "--main_process_port", str(_free_port()), me, "--child", "train",
               str(cfg_path)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    secs = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{tag} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    (d / "seconds.json").write_text(json.dumps(round(secs, 1)))
    ranks = [json.loads(f.read_text()) for f in sorted(d.glob("rank*.json"))]
    if len(ranks) != nproc:
        raise RuntimeError(f"{tag}: expected {nproc} rank reports, got {len(ranks)}")
    return {"cfg": cfg_path, "ranks": ranks, "seconds": secs}


def predict_from_data(cfg_path: Path, nproc: int):
    """The plan `finetune train` itself makes: for the longest micro-batch of the run's data (its cache)."""
    from finetune.config import load_config
    from finetune.plan.command import data_batch_inputs, plan_for_training, run_longest_batch

    cfg = load_config(cfg_path)
    lengths, trained_of, mean = data_batch_inputs(cfg)
    batch = run_longest_batch(cfg, lengths, world_size=nproc, trained_of=trained_of, mean_trained=mean)
    return plan_for_training(cfg, world_size=nproc, gpus_per_node=nproc, device="cpu", device_memory=1 << 40,
                             batch=batch)


def predict(cfg_path: Path, nproc: int):
    from finetune.plan.command import load_plan_config
    from finetune.plan.memory import (
        ModelShape,
        make_plan,
        resolve_model_config,
        setup_from_config,
    )

    cfg = load_plan_config(cfg_path)
    raw, src = resolve_model_config(cfg.model)
    return make_plan(ModelShape.from_config(raw, src),
                     setup_from_config(cfg, gpus_per_node=nproc, device="cpu"), alternatives=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="regex: run only matching case names")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite docs/plan.md")
    ap.add_argument("--reuse", action="store_true", help="reuse measurements already in the work directory")
    ap.add_argument("--varied", action="store_true",
                    help="data of varying length, planned from the data (the table under 'Planned from the data')")
    args = ap.parse_args()
    global REUSE
    REUSE = args.reuse
    if args.varied:
        return main_varied(args)
    WORK.mkdir(parents=True, exist_ok=True)
    model = build_model(WORK / "model")
    teacher = build_model(WORK / "teacher", **TEACHER_SHAPE)
    data = build_data(WORK / "train.jsonl")
    rows, worst = [], 0.0
    t_all = time.monotonic()
    for case in CASES:
        if args.only and not re.search(args.only, case[0]):
            continue
        res = run_case(case, model, data, teacher)
        plan = predict(res["cfg"], case[3])
        pred = plan.device_total
        meas = max(r["train_peak"] for r in res["ranks"])
        err = (pred - meas) / meas
        worst = max(worst, abs(err))
        name, adapter, stage, nproc, length, ckpt = case
        acts = sum(x.device for x in plan.lines if x.name.startswith("activations"))
        row = (f"| {name}{' +ckpt' if ckpt and '+ckpt' not in name else ''} | {nproc} | {length} | "
               f"{meas / 2**20:,.0f} | {pred / 2**20:,.0f} | {100 * err:+.1f}% | {acts / 2**20:,.0f} | "
               f"{max(r['load_peak'] for r in res['ranks']) / 2**20:,.0f} | {res['seconds']:.0f} |")
        rows.append(row)
        print(row, flush=True)
    header = ("| case | procs | max_length | measured peak MiB | predicted MiB | error | of which activations "
              "(pred.) | load peak MiB (not predicted) | run s |\n|---|---|---|---|---|---|---|---|---|")
    table = "\n".join([header, *rows])
    summary = (f"Model: Llama 124.7M params (hidden 768, 12 layers, 12/4 heads, vocab 32000), micro-batch {BATCH}, "
               f"3 steps, fp32 on CPU; distill cases: a 245.9M teacher (hidden 1024, 16 layers, 16/4 heads, the same "
               f"tokenizer). Worst error {100 * worst:.1f}% (tolerance {100 * TOLERANCE:.0f}%). "
               f"Total {time.monotonic() - t_all:.0f} s.")
    print(table + "\n" + summary)
    if not args.no_write and not args.only:
        write_doc_block("validation", table, summary)
    return 0 if worst <= TOLERANCE else 1


def write_doc_block(name: str, table: str, summary: str, *, after: str | None = None) -> None:
    """Replace docs/plan.md's `<!-- NAME:start -->` ... `<!-- NAME:end -->` block; a missing one goes after
    block `after`."""
    text = DOC.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{table}\n\n{summary}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.replace(f"<!-- {after}:end -->", f"<!-- {after}:end -->\n\n" + block, 1)
    DOC.write_text(text)


def main_varied(args) -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    models = {"model": build_model(WORK / "model"), "small": build_model(WORK / "small", **SMALL_SHAPE)}
    teacher = build_model(WORK / "teacher", **TEACHER_SHAPE)
    chats = build_varied_data(WORK / "varied" / "train.jsonl")
    pairs = build_varied_data(WORK / "varied_pairs" / "train.jsonl", rows=128, pairs=True)
    rows, worst, run_s = [], 0.0, 0.0
    for case in VARIED_CASES:
        name, adapter, stage, nproc, length, ckpt, model_key, batch = case
        if args.only and not re.search(args.only, name):
            continue
        res = run_case(case, models[model_key], pairs if set(name.split()) & set(PAIR_METHODS) else chats, teacher, batch=batch,
                       prefix=f"varied_{model_key}_")
        plan = predict_from_data(res["cfg"], nproc)
        pred, meas = plan.device_total, max(r["train_peak"] for r in res["ranks"])
        err = (pred - meas) / meas
        worst_case_err = (plan.worst_case_total - meas) / meas
        worst = max(worst, abs(err))
        shape = "124.7M" if model_key == "model" else "small"
        row = (f"| {name} | {shape} | {nproc} | {batch} x {length} | {plan.setup.micro_batch} x {plan.setup.seq_len} | "
               f"{meas / 2**20:,.0f} | {pred / 2**20:,.0f} | {100 * err:+.1f}% | "
               f"{plan.worst_case_total / 2**20:,.0f} ({100 * worst_case_err:+.0f}%) | {res['seconds']:.0f} |")
        rows.append(row)
        run_s += res["seconds"]
        print(row, flush=True)
    header = ("| case | model | procs | batch x max_length | longest batch (data) | measured peak MiB | "
              "predicted from data MiB | error | without data MiB (error) | run s |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
    table = "\n".join([header, *rows])
    small = SMALL_SHAPE
    summary = (f"Data: 256 chats (128 preference pairs for DPO, SimPO and KTO, which reads each pair as a desirable and an undesirable example) with log-normal reply lengths (median ~120 words, "
               f"tail truncated at max_length), the first 3 micro-batches of the length-grouped sampler as "
               f"training runs them. Models: the 124.7M Llama above and a smaller one (hidden {small['hidden']}, "
               f"{small['layers']} layers, {small['heads']}/{small['kv_heads']} heads, vocab 32000); distill: the "
               f"245.9M teacher. Worst error planned from the data {100 * worst:.1f}%. Training runs "
               f"{run_s:.0f} s in all.")
    print(table + "\n" + summary)
    if not args.no_write and not args.only:
        write_doc_block("validation-data", table, summary, after="validation")
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        raise SystemExit(child(sys.argv[2:]))
    raise SystemExit(main())
