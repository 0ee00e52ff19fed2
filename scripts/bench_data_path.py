#!/usr/bin/env python
"""The training data path at scale: time to the first optimizer step and peak RSS, kit vs TRL.

    python scripts/bench_data_path.py                       # 25k and 200k examples (docs/benchmarks.md)
    python scripts/bench_data_path.py --sizes 1000000       # the documented 1M run (about an hour here)
    python scripts/bench_data_path.py --smoke               # toy sizes, seconds (run by the tests)
    python scripts/bench_data_path.py --task dpo            # preference pairs: kit DPO vs TRL DPOTrainer

Per size N, on the same variable-length chat JSONL (the catalogue task of bench_train.py, 60-480
tokens per example) and the same tiny Llama (4 layers, hidden 256), each arm in a fresh child
process, one after the other:
  kit_cold  `finetune train` with an empty data cache (it tokenizes into the cache)
  kit_warm  the same command again (the cache is there)
  trl       plain TRL SFTTrainer on `datasets.load_dataset("json")` of the same file, its dataset
            cache emptied first (it tokenizes with datasets.map into Arrow)
  resume    (after the arms) the cost of resuming 90% into the epoch: accelerate's SkipBatchSampler
            over the kit's sampler, as the Trainer uses it, vs reading the skipped batches from the
            memory-mapped cache (what a loader without an index-level skip pays)
With --task dpo the data are preference pairs made from the same chats (prompt = the chat up to
its answer, chosen = the answer, rejected = the answer with another price) in TRL's conversational
format, the kit arms train `method: dpo` (its preference cache) and the TRL arm is plain
`DPOTrainer` with the same LoRA (reference = the adapter disabled, as the kit's). The resume
measurement is SFT's only.
Time to first step: from the child's launch to the end of optimizer step 1 (a TrainerCallback
writes the time), so imports, model load, data and the step itself all count. Peak RSS: the sum
over the child and all its descendants (tokenizer workers too), sampled every 50 ms; it includes
the first step, whose activations follow the length of the first batch (which differs between
data sets). RSS before the step: the child's own, when training begins (data and model set up).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench_train import make_example  # noqa: E402


def first_step_callback(path: str):
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        rss_begin = 0

        def on_train_begin(self, args, state, control, **kw):
            import psutil

            self.rss_begin = psutil.Process().memory_info().rss  # data and model are set up

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1 and state.is_world_process_zero:
                Path(path).write_text(json.dumps({"t": time.time(), "rss_begin": self.rss_begin}))

    return FirstStep()


# ----------------------------------------------------------------------------------------------
# children
# ----------------------------------------------------------------------------------------------
def child_kit(spec: dict, out: str, stamp: str) -> None:
    from finetune.config import load_config
    from finetune.training.recipe import train

    cfg = load_config(None, [
        f"model={spec['model']}", f"data.train={spec['train']}", f"output_dir={out}", "max_length=512",
        "training.max_steps=1", "training.batch_size=8", "training.report_to=[none]", "overwrite=true",
        f"data.cache_dir={spec['cache']}", *(["method=dpo"] if spec.get("task") == "dpo" else []),
    ])
    train(cfg, callbacks=[first_step_callback(stamp)])


def child_trl(spec: dict, out: str, stamp: str) -> None:
    """Plain TRL on `datasets.load_dataset("json")`: SFTTrainer, or DPOTrainer for --task dpo."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.get("task") == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer
    else:
        from trl import SFTConfig as Config
        from trl import SFTTrainer as Trainer

    ds = load_dataset("json", data_files=spec["train"], split="train", cache_dir=spec["trl_cache"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="float32")
    args = Config(output_dir=out, max_steps=1, per_device_train_batch_size=8, bf16=False, use_cpu=True,
                  report_to="none", save_strategy="no", max_length=512)
    trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                      peft_config=LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"),
                      callbacks=[first_step_callback(stamp)])
    trainer.train()


# ----------------------------------------------------------------------------------------------
# parent
# ----------------------------------------------------------------------------------------------
def make_pair(rng: random.Random) -> dict:
    """A chat of make_example as a preference pair: the right price chosen, another one rejected."""
    msgs = make_example(rng, 2, 14)["messages"]
    answer = msgs[-1]["content"]
    wrong = re.sub(r"\$[0-9][0-9.,]*", lambda _: f"${rng.randint(1, 999)}.{rng.randint(0, 99):02d}", answer, count=1)
    if wrong == answer:
        wrong = answer + " Or less."
    return {"prompt": msgs[:-1], "chosen": [msgs[-1]], "rejected": [{"role": "assistant", "content": wrong}]}


def make_data(path: Path, n: int, seed: int = 0, task: str = "sft") -> None:
    if path.is_file() and sum(1 for _ in path.open()) == n:
        return
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as fh:
        for _ in range(n):
            fh.write(json.dumps(make_pair(rng) if task == "dpo" else make_example(rng, 2, 14)) + "\n")
    os.replace(tmp, path)


def run_arm(arm: str, spec: dict, work: Path) -> dict:
    import psutil

    stamp = work / f"{arm}.stamp"
    stamp.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--child", "trl" if arm == "trl" else "kit", json.dumps(spec),
           str(work / f"out_{arm}"), str(stamp)]
    t0 = time.time()
    # stderr to a file, not a pipe: a child's progress bars fill a pipe nobody reads until exit,
    # and the child then blocks forever (seen with TRL at 1M examples).
    log = (work / f"{arm}.log").open("w+")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [ps, *ps.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    log.seek(0)
    err = log.read()
    log.close()
    if proc.returncode != 0 or not stamp.is_file():
        raise RuntimeError(f"{arm} failed (exit {proc.returncode}):\n{err[-4000:]}")
    got = json.loads(stamp.read_text())
    return {"first_step_s": got["t"] - t0, "peak_rss_mb": peak / 2**20, "rss_before_step_mb": got["rss_begin"] / 2**20}


def resume_skip(cache: Path, batch_size: int = 8) -> dict:
    """Seconds to the first batch after skipping 90% of an epoch: by index vs by reading."""
    import glob

    from accelerate.data_loader import SkipBatchSampler
    from datasets import Dataset, concatenate_datasets
    from torch.utils.data import BatchSampler

    from finetune.data.sampler import LengthGroupedShuffledSampler

    shards = sorted(glob.glob(str(cache / "*" / "shard-*.arrow")))
    ds = concatenate_datasets([Dataset.from_file(f) for f in shards])
    lengths = ds.data.column("length").to_numpy()
    n_batches = len(ds) // batch_size
    skip = int(0.9 * n_batches)
    t0 = time.perf_counter()
    sampler = LengthGroupedShuffledSampler(lengths, batch_size, seed=0)
    first = next(iter(SkipBatchSampler(BatchSampler(sampler, batch_size, drop_last=False), skip_batches=skip)))
    _ = ds[first]
    by_index = time.perf_counter() - t0
    t0 = time.perf_counter()
    it = iter(BatchSampler(sampler, batch_size, drop_last=False))
    for _ in range(skip):
        _ = ds[next(it)]  # the rows a loader would fetch and throw away
    by_reading = time.perf_counter() - t0
    return {"examples": len(ds), "skipped_batches": skip, "by_index_s": by_index, "by_reading_s": by_reading}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", help="comma-separated example counts (default 25000,200000; with --smoke 500,2000)")
    ap.add_argument("--arms", default="kit_cold,kit_warm,trl")
    ap.add_argument("--work", default="bench_output/data_path")
    ap.add_argument("--smoke", action="store_true", help="toy sizes: 500 and 2000 unless --sizes is given")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--task", choices=("sft", "dpo"), default="sft", help="chats (sft) or preference pairs (dpo)")
    ap.add_argument("--child", nargs=4, metavar=("ARM", "SPEC", "OUT", "STAMP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        arm, spec, out, stamp = args.child
        (child_trl if arm == "trl" else child_kit)(json.loads(spec), out, stamp)
        return 0
    sizes = [int(x) for x in (args.sizes or ("500,2000" if args.smoke else "25000,200000")).split(",")]
    arms = args.arms.split(",")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "config.json").is_file():
        from finetune.tiny import build_tiny_model

        sample = work / "tokenizer_corpus.jsonl"
        make_data(sample, 2000, seed=99)
        build_tiny_model(model, [sample], vocab_size=400, hidden_size=256, layers=4, seed=0)
    results = []
    tag = "" if args.task == "sft" else f"{args.task}_"
    for n in sizes:
        data = work / f"train_{tag}{n}.jsonl"
        make_data(data, n, task=args.task)
        spec = {"model": str(model), "train": str(data), "cache": str(work / f"cache_{tag}{n}"),
                "trl_cache": str(work / f"trl_cache_{tag}{n}"), "task": args.task}
        for arm in arms:
            if arm == "kit_cold":
                shutil.rmtree(spec["cache"], ignore_errors=True)
            if arm == "trl":
                shutil.rmtree(spec["trl_cache"], ignore_errors=True)
            r = {"examples": n, "jsonl_mb": round(data.stat().st_size / 2**20, 1), "arm": arm, **run_arm(arm, spec, work)}
            results.append(r)
            print(f"{n:>8} examples ({r['jsonl_mb']:6.1f} MB)  {arm:9s}  first step {r['first_step_s']:7.1f} s  "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MB  (before the step {r['rss_before_step_mb']:6.0f} MB)", flush=True)
    if args.task == "sft" and ("kit_warm" in arms or "kit_cold" in arms):
        for n in sizes:
            r = resume_skip(work / f"cache_{n}")
            results.append({"arm": "resume", **r})
            print(f"{n:>8} examples  resume at batch {r['skipped_batches']}: first batch after {r['by_index_s']:.2f} s "
                  f"(skip by index) vs {r['by_reading_s']:.1f} s (reading the skipped batches)", flush=True)
    by = {(r["examples"], r["arm"]): r for r in results}
    print("\nratios")
    for n in sizes:
        cold, warm, trl = by.get((n, "kit_cold")), by.get((n, "kit_warm")), by.get((n, "trl"))
        if cold and trl:
            print(f"  {n}: kit cold / TRL time to first step = {cold['first_step_s'] / trl['first_step_s']:.2f}"
                  f"   peak RSS {cold['peak_rss_mb'] / trl['peak_rss_mb']:.2f}")
        if cold and warm:
            print(f"  {n}: kit warm / kit cold time to first step = {warm['first_step_s'] / cold['first_step_s']:.2f}")
    warm = [by[(n, "kit_warm")] for n in sizes if (n, "kit_warm") in by]
    if len(warm) >= 2:
        print(f"  warm peak RSS at {sizes[-1]} / at {sizes[0]} = {warm[-1]['peak_rss_mb'] / warm[0]['peak_rss_mb']:.2f}"
              f"   (RSS before the first step: {warm[-1]['rss_before_step_mb'] / warm[0]['rss_before_step_mb']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
