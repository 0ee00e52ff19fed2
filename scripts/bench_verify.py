#!/usr/bin/env python
"""What verifying checksums on read costs: a 200k-example data cache and an 8B model's weights.

    python scripts/bench_verify.py                     # 200k examples, 16 GB of weights (docs/benchmarks.md)
    python scripts/bench_verify.py --checkpoint-gb 4   # a smaller checkpoint (disk space, time)
    python scripts/bench_verify.py --smoke             # toy sizes, seconds (run by the tests)

Two artifacts, each hashed three ways on the same files in the same run:
  read      reading every byte (as many files at once as verification) and doing nothing with it:
            the floor any verification pays
  xxh3_128  the kit's verification (kitcore.integrity.verify_entries: size + XXH3-128, 4 files at once)
  sha256    what the Hub's LFS pointers and data-prep's shard manifests record, for comparison
each warm (the files just written, in the page cache) and, when this process may drop the page
cache (root: /proc/sys/vm/drop_caches), cold (read from the disk).

The data cache is the real thing: `finetune`'s builder tokenizes N catalogue chats (scripts/bench_train.py's
task) with a tiny model's tokenizer, as `finetune prepare` would. The checkpoint stands in for an 8B model's
bf16 weights (8e9 x 2 bytes = 16 GB) as 4 GB shards of random bytes: hashing cost depends on bytes, not
on what they mean. A full fine-tune's checkpoint adds the optimizer state (fp32 Adam: 6x the bf16
weights), which verifies at the same GB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench_train import make_example  # noqa: E402

CHUNK = 8 << 20


def drop_page_cache() -> bool:
    """Write back and drop the page cache (root only); False when this process may not."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def read_only(root: Path, names: list[str]) -> None:
    """Read every byte, as many files at once as verification reads (kitcore.integrity's threads)."""
    from concurrent.futures import ThreadPoolExecutor

    from kitcore.integrity import HASH_THREADS

    def one(n: str) -> None:
        buf = bytearray(CHUNK)
        with open(root / n, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass

    with ThreadPoolExecutor(min(HASH_THREADS, len(names))) as pool:
        list(pool.map(one, names))


def measure(root: Path, files: dict[str, dict], cold: bool) -> dict[str, float]:
    """GB/s of each way over the files; `cold`: the page cache is dropped before each."""
    from kitcore.integrity import verify_entries

    names = sorted(files)
    size = sum((root / n).stat().st_size for n in names)
    ways = {
        "read": lambda: read_only(root, names),
        "xxh3_128": lambda: verify_entries(root, files),
        "sha256": lambda: verify_entries(root, {n: {"bytes": files[n]["bytes"], "sha256": "0" * 64} for n in names}),
    }
    out = {"bytes": size}
    for way, fn in ways.items():
        if cold and not drop_page_cache():
            return {}
        if not cold:
            read_only(root, names)  # warm: in the page cache
        t0 = time.perf_counter()
        rep = fn()
        dt = time.perf_counter() - t0
        if way == "xxh3_128":
            assert rep.ok, rep.summary()
        out[way] = size / dt / 1e9
    return out


def build_cache(work: Path, n: int) -> tuple[Path, dict[str, dict]]:
    from finetune.config import load_config
    from finetune.data.cache import prepared_split
    from finetune.models.loading import load_tokenizer
    from finetune.tiny import build_tiny_model

    rng = random.Random(0)
    data = work / f"chats_{n}.jsonl"
    if not data.exists():
        with data.open("w") as fh:
            for _ in range(n):
                fh.write(json.dumps(make_example(rng, 4, 30)) + "\n")
    model = work / "tiny"
    if not (model / "config.json").exists():
        corpus = work / "corpus.jsonl"
        with corpus.open("w") as fh, data.open() as src:
            for _, line in zip(range(2000), src):
                fh.write(line)
        build_tiny_model(model, [corpus], vocab_size=2048, hidden_size=64, layers=2, heads=4, kv_heads=2,
                         max_positions=1024)
    cfg = load_config(None, [f"model={model}", f"data.train={data}", f"output_dir={work / 'run'}",
                              "max_length=1024", f"data.cache_dir={work / 'cache'}", "training.report_to=[none]"])
    t0 = time.perf_counter()
    _, stats, final = prepared_split(cfg, load_tokenizer(str(model)), str(data), progress=False)
    print(f"data cache: {stats.examples} examples, {stats.tokens:,} tokens, built or opened in "
          f"{time.perf_counter() - t0:.1f} s -> {final}", flush=True)
    meta = json.loads((final / "meta.json").read_text())
    return final, {sh["file"]: sh for sh in meta["shards"]}


def build_checkpoint(work: Path, gb: float) -> tuple[Path, dict[str, dict]]:
    from kitcore.integrity import write_manifest

    d = work / "checkpoint"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    total = int(gb * 1e9)
    shard = min(total, 4 * 10**9)
    block = random.Random(1).randbytes(64 << 20)
    i = 0
    while total > 0:
        n = min(shard, total)
        with open(d / f"model-{i:05d}.safetensors", "wb") as fh:
            left = n
            while left > 0:
                fh.write(block[: min(left, len(block))])
                left -= len(block)
        total -= n
        i += 1
    t0 = time.perf_counter()
    files = write_manifest(d)
    dt = time.perf_counter() - t0
    size = sum(e["bytes"] for e in files.values())
    print(f"checkpoint: {len(files)} file(s), {size / 1e9:.1f} GB; manifest written (hashed) in {dt:.2f} s = "
          f"{size / dt / 1e9:.2f} GB/s", flush=True)
    return d, files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=200_000)
    ap.add_argument("--checkpoint-gb", type=float, default=16.0, help="bf16 weights of an 8B model: 16")
    ap.add_argument("--work", type=Path, default=Path("bench_verify_work"))
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--smoke", action="store_true", help="toy sizes: 2,000 examples, 0.2 GB")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint files (else removed at the end)")
    args = ap.parse_args()
    if args.smoke:
        args.examples, args.checkpoint_gb = 2000, 0.2
    args.work.mkdir(parents=True, exist_ok=True)
    import platform

    import xxhash

    print(f"python {platform.python_version()}, xxhash {xxhash.VERSION}, {os.cpu_count()} CPU(s), "
          f"{platform.processor() or platform.machine()}", flush=True)
    artifacts = {"data cache": build_cache(args.work, args.examples),
                 "checkpoint": build_checkpoint(args.work, args.checkpoint_gb)}
    results = []
    for name, (root, files) in artifacts.items():
        for cold in (False, True):
            r = measure(root, files, cold)
            if not r:
                print(f"{name}: cold runs skipped (this process may not drop the page cache)")
                continue
            results.append({"artifact": name, "cache": "cold" if cold else "warm", **r})
    print(f"\n{'artifact':<12} {'page cache':<10} {'GB':>7} {'read GB/s':>10} {'xxh3 GB/s':>10} {'sha256 GB/s':>12} "
          f"{'xxh3 / read':>12}")
    for r in results:
        print(f"{r['artifact']:<12} {r['cache']:<10} {r['bytes'] / 1e9:>7.3f} {r['read']:>10.2f} {r['xxh3_128']:>10.2f} "
              f"{r['sha256']:>12.2f} {r['xxh3_128'] / r['read']:>12.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not args.keep:
        shutil.rmtree(args.work / "checkpoint", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
