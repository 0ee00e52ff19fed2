#!/usr/bin/env python
"""Training throughput: plain TRL `SFTTrainer` (its defaults) vs `finetune train` (the kit's defaults).

    python scripts/bench_train.py                      # the figures in docs/benchmarks.md
    python scripts/bench_train.py --smoke              # toy size, about a minute (run by the tests)

One run, one machine, the same data, epochs, LoRA settings, per-device batch size and optimizer
settings (learning rate, schedule, warmup) for both arms; everything else is each tool's default.
Both arms train the same tokens (the assistant answer): TRL gets the data in its conversational
prompt-completion form, where `completion_only_loss` (on by default) masks the prompt; the kit
gets the chat JSONL and masks by its chat template. Every arm runs in a fresh child process (so
peak RSS is its own) with the same thread count, and every resulting adapter is scored by the
kit's `evaluate()` (what `finetune eval` runs) on the same held-out file: token-weighted NLL of
the answer tokens, and exact match of greedy answers.

Printed per arm: wall time of `trainer.train()`, non-pad tokens/s, trained (loss) tokens/s, peak
RSS, eval loss, exact match, achieved GFLOP/s and MFU against the matmul ceiling measured in the
same run. Extra arms (`--arms`) isolate where the difference comes from:
  trl            TRL defaults (random batches, gradient checkpointing on, entropy/accuracy logged)
  trl_grouped    TRL + train_sampling_strategy="group_by_length" (transformers' sampler)
  trl_nockpt     TRL + gradient_checkpointing=False
  kit            finetune train defaults (length-grouped, batch-shuffled sampler; no checkpointing)
  kit_random     finetune train with training.group_by_length=false
  kit_fulllogits finetune train with training.loss=full (the model's own loss over full logits)
  kit_cmd        the `finetune train` command itself (python -m finetune train ...), timed by this
                 script from its launch to its exit; train s from the run's metrics.jsonl

Every arm also gets its wall time from launch: for TRL to the end of training (on_train_end), for
`kit_cmd` to the command's exit (adapter saved, interpreter shut down), i.e. start-up included:

    python scripts/bench_train.py --arms trl,kit_cmd      # the start-to-exit comparison

The large-vocabulary comparison (issue: step memory at real vocabularies) is the same script with
the model's vocabulary set to Llama 3's, sequences up to 1,024 and batch 4, a few steps:

    python scripts/bench_train.py --model-vocab 128256 --batch-size 4 --max-length 1024 --max-steps 6 \
        --examples 400 --arms trl,kit,kit_fulllogits --work bench_output/train_vocab128k
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

from make_quickstart_data import FILLERS, QUESTIONS, STORES, distinct_products, statement  # noqa: E402

SYSTEMS = ["You answer questions about a shop's catalogue.", "Answer with the price only.", None]


# ----------------------------------------------------------------------------------------------
# data and model
# ----------------------------------------------------------------------------------------------
def make_example(rng: random.Random, min_items: int, max_items: int) -> dict:
    """A catalogue of N priced products among filler sentences; the question asks for one price.

    N is uniform in [min_items, max_items], so lengths spread over roughly 60-370 tokens with the
    default settings; the answer is a short sentence quoting the price."""
    prods = distinct_products(rng, rng.randint(min_items, max_items))
    parts = [statement(rng, n, p) for n, p in prods]
    for _ in range(rng.randint(0, max(1, len(prods) // 2))):
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(FILLERS))
    name, price = rng.choice(prods)
    question = rng.choice(QUESTIONS).format(name=name)
    msgs = []
    system = rng.choice(SYSTEMS)
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": f"{rng.choice(STORES)} catalogue: {' '.join(parts)}\n\n{question}"})
    msgs.append({"role": "assistant", "content": price if system == SYSTEMS[1] else f"The {name} costs {price}."})
    return {"messages": msgs}


def prepare(work: Path, args) -> dict:
    from finetune.tiny import build_tiny_model

    rng = random.Random(args.seed)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    splits = {"train": args.examples, "test": args.eval_examples}
    for split, n in splits.items():
        with (data / f"{split}.jsonl").open("w") as fh:
            for _ in range(n):
                fh.write(json.dumps(make_example(rng, args.min_items, args.max_items)) + "\n")
    model = work / "model"
    if not (model / "config.json").exists():
        build_tiny_model(model, [data / "train.jsonl"], vocab_size=args.vocab_size,
                         hidden_size=args.hidden_size, layers=args.layers, seed=args.seed)
    if args.model_vocab:
        # A real model's vocabulary size (e.g. Llama 3's 128,256) on the small model: the LM head and
        # the logits get their real size, which is what the large-vocabulary arm measures. The
        # tokenizer stays small; the extra rows are never a target.
        big = work / f"model_vocab{args.model_vocab}"
        if not (big / "config.json").exists():
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            torch.manual_seed(args.seed)
            m = AutoModelForCausalLM.from_pretrained(model)
            m.resize_token_embeddings(args.model_vocab, mean_resizing=False)
            m.save_pretrained(big)
            AutoTokenizer.from_pretrained(model).save_pretrained(big)
        model = big
    return {"train": str(data / "train.jsonl"), "test": str(data / "test.jsonl"), "model": str(model)}


def token_lengths(model_dir: str, path: str) -> tuple[list[int], list[int]]:
    """(tokens, trained tokens) per example under the kit's chat template."""
    from finetune.data.chat_template import encode_chat
    from finetune.data.files import read_chat_jsonl
    from finetune.models.loading import load_tokenizer

    tok = load_tokenizer(model_dir)
    lens, trained = [], []
    for rec in read_chat_jsonl(path):
        enc = encode_chat(tok, rec["messages"], max_length=None, loss_on="assistant")
        lens.append(len(enc.input_ids))
        trained.append(enc.n_trained)
    return lens, trained


# ----------------------------------------------------------------------------------------------
# FLOPs and the ceiling
# ----------------------------------------------------------------------------------------------
def matmul_ceiling(dtype_name: str, seconds: float = 2.0, n: int = 2048) -> float:
    """Best-of-runs GFLOP/s of an n x n x n matmul (2n^3 FLOPs) in this process's thread setting.

    n is the largest power of two up to `n` whose matmul takes under 0.25 s here: on a CPU without
    bf16 units a 2048^3 bf16 matmul takes a minute (0.3 GFLOP/s on the CI machine), and a ceiling
    that slow is measured as well on a smaller one."""
    import torch

    dtype = getattr(torch, dtype_name)
    size = 256
    while True:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if size >= n or time.perf_counter() - t0 > 0.25 / 8:  # the next size takes 8x longer
            break
        size *= 2
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return best


def model_counts(model_dir: str, lora_r: int) -> dict:
    """N (matmul parameters: every Linear incl. lm_head, not the embedding lookup), N_lora, L, d,
    from config.json through finetune.plan.memory's counts (tested equal to the transformers model's)."""
    from finetune.plan.memory import ModelShape, lora_trainable_params, param_counts, resolve_model_config

    shape = ModelShape.from_config(*resolve_model_config(model_dir))
    p = param_counts(shape)
    n = p["linear_weights"] + shape.vocab_size * shape.hidden_size  # the head is a matmul even when tied
    return {"N": n, "N_lora": lora_trainable_params(shape, lora_r, "all-linear"),
            "layers": shape.num_hidden_layers, "hidden": shape.hidden_size}


def train_flops(lengths: list[int], c: dict, epochs: float) -> float:
    """Useful FLOPs of LoRA training over `lengths` (pad tokens and recomputation excluded).

    Per token: frozen weights do forward (2N) and input-gradient (2N) matmuls but no weight-
    gradient matmul, so 4N; LoRA weights do all three, 6 N_lora. Per sequence of s tokens and per
    layer, attention scores and the weighted sum are two s x s x d matmuls, 4 s^2 d forward and
    twice that backward: 12 L d s^2 (counting the full square, as PaLM's MFU does). Full fine-
    tuning would be 6N per token plus the same attention term."""
    per_token = 4 * c["N"] + 6 * c["N_lora"]
    return epochs * sum(per_token * s + 12 * c["layers"] * c["hidden"] * s * s for s in lengths)


# ----------------------------------------------------------------------------------------------
# the arms (each in its own child process)
# ----------------------------------------------------------------------------------------------
def timer_callback():
    """Seconds from on_train_begin to on_train_end (the training loop, checkpoint saves included),
    measured the same way in both arms; plus steps and the mean training loss."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.t0 = self.t1 = 0.0
            self.first_step_abs = self.end_abs = 0.0
            self.steps = 0
            self.losses: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                self.first_step_abs = time.time()

        def on_train_end(self, args, state, control, **kw):
            self.t1, self.steps = time.perf_counter(), state.global_step
            self.end_abs = time.time()

    return Timer()


def run_trl(spec: dict, out: Path, variant: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from finetune.data.files import read_chat_jsonl

    rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in read_chat_jsonl(spec["train"])]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="float32")
    extra = {}
    if variant == "trl_grouped":
        extra["train_sampling_strategy"] = "group_by_length"
    if variant == "trl_nockpt":
        extra["gradient_checkpointing"] = False
    if spec.get("max_steps"):
        extra["max_steps"] = spec["max_steps"]
    args = SFTConfig(
        output_dir=str(out / "trl_out"),
        num_train_epochs=spec["epochs"],
        per_device_train_batch_size=spec["batch_size"],
        learning_rate=spec["lr"],
        lr_scheduler_type=spec["scheduler"],
        warmup_steps=spec["warmup"],
        bf16=False,  # SFTConfig's default bf16=True; this CPU path is measured in fp32 like the kit
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        seed=spec["seed"],
        max_length=spec["max_length"],
        **extra,
    )
    peft_config = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    timer = timer_callback()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, peft_config=peft_config, callbacks=[timer])
    ds = trainer.train_dataset
    lengths = [len(x) for x in ds["input_ids"]]
    trained = [sum(1 for x in lab if x != -100) for lab in ds["labels"]]
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    return {"train_s": timer.t1 - timer.t0, "lengths": lengths, "trained_tokens_per_epoch": sum(trained),
            "steps": timer.steps, "last_train_loss": timer.losses[-1] if timer.losses else None,
            "first_step_abs": timer.first_step_abs, "end_abs": timer.end_abs}


def kit_overrides(spec: dict, out: Path, variant: str) -> list[str]:
    overrides = [
        f"model={spec['model']}", f"data.train={spec['train']}", f"output_dir={out / 'run'}",
        f"training.epochs={spec['epochs']}", f"training.batch_size={spec['batch_size']}",
        f"training.learning_rate={spec['lr']}", f"training.lr_scheduler={spec['scheduler']}",
        f"training.warmup={spec['warmup']}", f"lora.r={spec['lora_r']}", f"lora.alpha={spec['lora_alpha']}",
        f"lora.dropout={spec['lora_dropout']}", f"max_length={spec['max_length']}", f"seed={spec['seed']}",
        "training.report_to=[none]", "overwrite=true",
    ]
    if variant == "kit_random":
        overrides.append("training.group_by_length=false")
    if variant == "kit_fulllogits":
        overrides.append("training.loss=full")
    if spec.get("max_steps"):
        overrides.append(f"training.max_steps={spec['max_steps']}")
    return overrides


def run_kit(spec: dict, out: Path, variant: str) -> dict:
    """The kit in-process with the same Timer callback as TRL (the token counts come from the parent,
    which tokenizes the same file with the same template: none of that work happens in this child)."""
    from finetune.config import load_config
    from finetune.training.recipe import train

    timer = timer_callback()
    train(load_config(None, kit_overrides(spec, out, variant)), callbacks=[timer])
    return {"train_s": timer.t1 - timer.t0, "steps": timer.steps,
            "last_train_loss": timer.losses[-1] if timer.losses else None,
            "first_step_abs": timer.first_step_abs, "end_abs": timer.end_abs,
            "adapter_dir": str(out / "run" / "adapter")}


def run_kit_command(spec: dict, out: Path, env: dict) -> tuple[dict, str]:
    """`python -m finetune train ...` as a user runs it; wall time from launch to exit and its own peak
    RSS (wait4 on that child); train s and steps from the run's metrics.jsonl (the Trainer's
    train_runtime: on_train_begin to on_train_end, what the Timer measures in the other arms)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stderr.txt", "w") as err:
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "finetune", "train", *kit_overrides(spec, out, "kit")],
                                env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        t1 = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return {}, (out / "stderr.txt").read_text()[-8000:]
    last = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    return {"train_s": last["train_runtime"], "steps": last["step"], "last_train_loss": last.get("train_loss"),
            "whole_s": t1 - t0, "peak_rss_mb": usage.ru_maxrss / 1024,
            "adapter_dir": str(out / "run" / "adapter")}, ""


def child(spec_path: str, arm: str, seed: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    same = int(seed) == spec["seed"] and spec.get("seeds", 1) == 1
    spec["seed"] = int(seed)  # data order, LoRA init and dropout; the data and the base model stay
    out = Path(spec["work"]) / (arm if same else f"{arm}-seed{seed}")
    out.mkdir(parents=True, exist_ok=True)
    res = (run_trl if arm.startswith("trl") else run_kit)(spec, out, arm)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res.setdefault("adapter_dir", str(out / "adapter"))
    (out / "result.json").write_text(json.dumps(res))


def score(spec: dict, adapter: str, out: Path) -> dict:
    from finetune.eval.evaluation import evaluate

    rep = evaluate(data=spec["test"], adapter=adapter, output=out, metrics=["exact_match"],
                   max_new_tokens=24, batch_size=32, distributed=False)
    tuned = rep["models"]["tuned"]
    return {"eval_loss": tuned["intrinsic"]["nll"], "eval_tokens": tuned["intrinsic"]["tokens"],
            "exact_match": tuned["extrinsic"]["exact_match"]}


# ----------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench_output/train", help="working directory (data, model, runs)")
    ap.add_argument("--arms", default="trl,kit", help="comma list of: trl, trl_grouped, trl_nockpt, kit, kit_random")
    ap.add_argument("--examples", type=int, default=1500)
    ap.add_argument("--eval-examples", type=int, default=300)
    ap.add_argument("--min-items", type=int, default=1, help="products per catalogue (sets the length spread)")
    ap.add_argument("--max-items", type=int, default=22)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4, help="both arms (the kit's default)")
    ap.add_argument("--scheduler", default="cosine", help="both arms (the kit's default)")
    ap.add_argument("--warmup", type=float, default=0.03, help="both arms (the kit's default)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--vocab-size", type=int, default=512, help="the tokenizer's (trained locally)")
    ap.add_argument("--model-vocab", type=int, default=0,
                    help="give the model this vocabulary size (e.g. 128256, Llama 3's): the large-vocabulary arm")
    ap.add_argument("--max-steps", type=int, default=0, help="stop both arms after this many steps (0: epochs)")
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="toy size for CI: 96 examples, 1 layer, hidden 64")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--seeds", type=int, default=1,
                    help="train every arm with seeds seed..seed+N-1 (same data and model) and report mean ± sd")
    ap.add_argument("--_child", nargs=3, metavar=("SPEC", "ARM", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        child(*args._child)
        return 0
    if args.smoke:
        args.examples, args.eval_examples, args.max_items = 96, 24, 6
        args.hidden_size, args.layers, args.vocab_size = 64, 1, 320
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ("trl", "trl_grouped", "trl_nockpt", "kit", "kit_random", "kit_fulllogits",
                                        "kit_cmd")]
    if bad:
        ap.error(f"--arms: unknown arm(s) {bad}")

    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work).resolve()
    spec = prepare(work, args)
    spec.update(work=str(work), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                scheduler=args.scheduler, warmup=args.warmup, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout, max_length=args.max_length, seed=args.seed, threads=args.threads,
                seeds=args.seeds, max_steps=args.max_steps)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    lens, trained = token_lengths(spec["model"], spec["train"])
    counts = model_counts(spec["model"], args.lora_r)
    ceiling = {"fp32": matmul_ceiling("float32"), "bf16": matmul_ceiling("bfloat16")}
    print(f"data: {len(lens)} train examples, {min(lens)}-{max(lens)} tokens (mean {sum(lens) / len(lens):.0f}); "
          f"{args.eval_examples} held out")
    print(f"model: {counts['layers']} layers, hidden {counts['hidden']}, N={counts['N'] / 1e6:.2f}M matmul "
          f"params, N_lora={counts['N_lora'] / 1e6:.3f}M; {args.threads} threads")
    print(f"matmul ceiling (n^3, n <= 2048, best of 2 s): fp32 {ceiling['fp32']:.0f} GFLOP/s, bf16 {ceiling['bf16']:.0f} GFLOP/s")

    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for k in range(args.seeds):
        seed = args.seed + k
        for arm in arms:
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
            tag = arm if args.seeds == 1 else f"{arm}-seed{seed}"
            print(f"[{tag}] training ...", flush=True)
            out = work / tag
            if arm == "kit_cmd":
                if seed != args.seed:
                    print(f"[{tag}] kit_cmd runs the command with the config's seed only; skipped", flush=True)
                    continue
                res, err = run_kit_command(spec, out, env)
                if err:
                    sys.stderr.write(err)
                    print(f"[{tag}] failed", file=sys.stderr)
                    return 1
            else:
                t_launch = time.time()
                proc = subprocess.run([sys.executable, __file__, "--_child", str(spec_path), arm, str(seed)],
                                      env=env, capture_output=True, text=True)
                t_exit = time.time()
                if proc.returncode != 0:
                    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                    print(f"[{tag}] failed with exit code {proc.returncode}", file=sys.stderr)
                    return 1
                res = json.loads((out / "result.json").read_text())
                # TRL: launch to the end of training; the kit: launch to the exit of its process.
                res["whole_s"] = (res["end_abs"] if arm.startswith("trl") else t_exit) - t_launch
                res["to_first_step_s"] = res["first_step_abs"] - t_launch
            if arm.startswith("kit"):  # the parent's count, same file and template as the kit's
                res["lengths"], res["trained_tokens_per_epoch"] = lens, sum(trained)
            res.update(score(spec, res["adapter_dir"], out / "eval"))
            # With --max-steps only part of an epoch is seen: the tokens of that share (both arms alike).
            share = min(1.0, res["steps"] * args.batch_size / len(res["lengths"])) if args.max_steps else args.epochs
            tokens = share * sum(res["lengths"])
            t = res["train_s"]
            res["seed"] = seed
            res["tokens_per_s"] = tokens / t
            res["trained_tokens_per_s"] = share * res["trained_tokens_per_epoch"] / t
            res["gflops"] = train_flops(res.pop("lengths"), counts, share) / t / 1e9
            res["mfu_fp32"] = res["gflops"] / ceiling["fp32"]
            runs[arm].append(res)

    def mean(xs):
        return sum(xs) / len(xs)

    def sd(xs):
        return (sum((x - mean(xs)) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0

    results: dict = {}
    for arm, rs in runs.items():
        if not rs:
            continue
        agg = {key: mean([r[key] for r in rs]) for key in rs[0] if isinstance(rs[0][key], (int, float))
               and not isinstance(rs[0][key], bool)}
        agg["steps"] = rs[0]["steps"]
        agg["eval_loss_sd"] = sd([r["eval_loss"] for r in rs])
        agg["tokens_per_s_sd"] = sd([r["tokens_per_s"] for r in rs])
        agg["runs"] = rs
        results[arm] = agg

    head = f"{'arm':<15}{'seed':>5}{'train s':>9}{'whole s':>9}{'1st step s':>11}{'steps':>7}{'tok/s':>9}" \
           f"{'trained tok/s':>15}{'peak RSS MB':>13}{'eval loss':>11}{'EM':>7}{'GFLOP/s':>9}{'MFU fp32':>10}"
    print("\n" + head)
    for arm, agg in results.items():
        for r in agg["runs"]:
            first = f"{r['to_first_step_s']:>11.1f}" if "to_first_step_s" in r else f"{'-':>11}"
            print(f"{arm:<15}{r['seed']:>5}{r['train_s']:>9.1f}{r['whole_s']:>9.1f}{first}{r['steps']:>7}"
                  f"{r['tokens_per_s']:>9.0f}{r['trained_tokens_per_s']:>15.0f}{r['peak_rss_mb']:>13.0f}"
                  f"{r['eval_loss']:>11.4f}{r['exact_match']:>7.3f}{r['gflops']:>9.1f}{r['mfu_fp32']:>10.1%}")
    print("whole s: TRL from launch to the end of training; the kit from launch to its process's exit")
    if args.seeds > 1:
        print(f"\n{'arm':<12}{'tok/s mean ± sd':>22}{'eval loss mean ± sd':>26}{'MFU fp32':>10}   ({args.seeds} seeds)")
        for arm, agg in results.items():
            print(f"{arm:<12}{agg['tokens_per_s']:>12.0f} ± {agg['tokens_per_s_sd']:<7.0f}"
                  f"{agg['eval_loss']:>15.4f} ± {agg['eval_loss_sd']:<8.4f}{agg['mfu_fp32']:>10.1%}")
    if "trl" in results and "kit" in results:
        b, k = results["trl"], results["kit"]
        speed = k["tokens_per_s"] / b["tokens_per_s"]
        dloss = k["eval_loss"] / b["eval_loss"] - 1
        print(f"\nkit vs trl{' (means)' if args.seeds > 1 else ''}: {speed:.2f}x tokens/s, eval loss {dloss:+.2%} "
              f"(target: >= 2x, <= +2%) -> {'MET' if speed >= 2 and dloss <= 0.02 else 'NOT MET'}")
        results["summary"] = {"speedup": speed, "eval_loss_rel": dloss}
    if "trl" in results and "kit_cmd" in results:
        b, k = results["trl"], results["kit_cmd"]
        whole = b["whole_s"] / k["whole_s"]
        dloss = k["eval_loss"] / b["eval_loss"] - 1
        print(f"`finetune train` start to exit vs TRL script start to end of training: {whole:.2f}x "
              f"({k['whole_s']:.1f} s vs {b['whole_s']:.1f} s), eval loss {dloss:+.2%} "
              f"(target: >= 2x, equal or better) -> {'MET' if whole >= 2 and dloss <= 0.0 else 'NOT MET'}")
        results.setdefault("summary", {}).update(whole_speedup=whole, whole_eval_loss_rel=dloss)
    results["ceiling_gflops"] = ceiling
    results["model"] = counts
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
