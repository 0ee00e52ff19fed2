#!/usr/bin/env python
"""The memory of TRL's fused LM head (trl.kernels.chunked_logprob, what DPO, KTO, ORPO and SimPO score
tokens through) in its torch fallback on CPU, in tiles: the constant TRL_HEAD_TILES_CPU of
finetune/plan/memory.py comes from here.

    python scripts/measure_fused_head.py                  # 1,024, 2,048 and 4,096 positions, vocabulary 32,000

Each size runs in a fresh process with MALLOC_MMAP_THRESHOLD_=131072 (large tensors mapped on their own,
so freed ones leave the resident set at once) and measures the resident high-water mark (VmHWM, reset
through /proc/self/clear_refs) over the forward and, separately, over the backward, in tiles of
min(N, 4096) x min(V, 32768) fp32. The slope between sizes is the per-tile cost the plan uses; the
intercept is what does not grow with the positions (the weight's transposed copy, autograd's threads).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def child(n: int, hidden: int, vocab: int) -> dict:
    import torch
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE, ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    def status(key: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        return 0

    def reset() -> None:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")

    torch.manual_seed(0)
    h = torch.randn(n, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden) * 0.02
    targets = torch.randint(0, vocab, (n,))
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")  # what DPOTrainer asks for
    base = status("VmRSS:")
    reset()
    logps, *_ = ChunkedLogProbFunction.apply(h, w, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs)
    fwd = status("VmHWM:") - base
    start = status("VmRSS:")
    reset()
    logps.sum().backward()
    bwd = status("VmHWM:") - start
    tile = min(n, TOKEN_CHUNK_SIZE) * min(vocab, _CHUNKED_LOGPROB_CHUNK_SIZE) * 4
    return {"positions": n, "tile_bytes": tile, "forward_bytes": fwd, "backward_bytes": bwd}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(*(int(x) for x in sys.argv[2:5]))))
        return 0
    hidden, vocab = 768, 32000
    rows = []
    for n in (1024, 2048, 4096):
        out = subprocess.run([sys.executable, __file__, "--child", str(n), str(hidden), str(vocab)], capture_output=True,
                             text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"hidden {hidden}, vocabulary {vocab}, fp32, CPU (torch fallback)")
    print(f"{'positions':>10}{'tile MiB':>10}{'forward tiles':>15}{'backward tiles':>16}")
    for r in rows:
        print(f"{r['positions']:>10}{r['tile_bytes'] / 2**20:>10.0f}{r['forward_bytes'] / r['tile_bytes']:>15.2f}"
              f"{r['backward_bytes'] / r['tile_bytes']:>16.2f}")
    a, b = rows[0], rows[-1]
    slope = (b["backward_bytes"] - a["backward_bytes"]) / (b["tile_bytes"] - a["tile_bytes"])
    fixed = a["backward_bytes"] - slope * a["tile_bytes"]
    print(f"backward: {slope:.2f} tiles per tile added, {fixed / 2**20:.0f} MiB that does not grow with the positions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
