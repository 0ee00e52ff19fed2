"""What a run achieves, measured in the run itself: tokens per second (all and trained), achieved
TFLOP/s and model FLOPs utilisation (MFU), and peak memory, in every training log line
(metrics.jsonl and the console) and in a summary when training ends.

Useful FLOPs per token, two conventions, both labelled:

- `mfu` (the kit's, "4N+6N_trainable"): 4 FLOPs per frozen matmul weight (forward, and the backward
  that carries the gradient to the layer's input; no weight gradient) plus 6 per trainable one
  (forward, input gradient, weight gradient). With LoRA the frozen base is most of the model, so this
  is the work the step really has to do.
- `mfu_6n` ("6N"): 6 FLOPs per matmul weight, trained or not: the usual convention for full
  fine-tuning and pre-training, and what most tools report for LoRA too (overstating its work).

Both add the attention scores, 12 x layers x (heads x head_dim) x s^2 per sequence of s tokens
(forward QK^T and AV, backward twice that; no causal halving), with s each example's own length
(padding is not useful work; packed examples count separately). Matmul weights are every linear
layer's in x out features (LoRA's A and B included, the LM head included even when tied to the
embeddings; embedding lookups and norms are not matmuls). Recomputation under activation
checkpointing, a reference model's or a teacher's forward are not counted: they are cost, not the
model's work, so they lower MFU, as they should.

The peak it is measured against: the GPU's dense bf16 tensor-core peak from a table of known parts
(no sparsity), else a measured bf16 matmul; on CPU a measured fp32 matmul (the dtype CPU runs train
in), named in the log (`mfu_peak`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelFlops", "model_flops", "device_peak", "batch_counts", "peak_memory", "ThroughputAccounting",
           "GPU_PEAK_TFLOPS", "significant"]

# Dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' datasheets; matched as a
# substring of torch.cuda.get_device_name(), the first match in this order (PCIe/NVL before SXM).
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0), ("B200", 2250.0), ("B100", 1750.0),
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("H20", 148.0),
    ("A100", 312.0), ("A800", 312.0), ("A30", 165.0), ("A10G", 70.0), ("A10", 125.0), ("A40", 150.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("RTX 6000 Ada", 364.0), ("RTX A6000", 155.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("MI300X", 1307.0), ("MI325X", 1307.0), ("MI250X", 383.0),
)


@dataclass(frozen=True)
class ModelFlops:
    frozen: int  # matmul weights that do not train
    trainable: int  # matmul weights that train (LoRA's A and B; every layer in full fine-tuning)
    attn_layers: int
    attn_width: int  # heads x head_dim

    def per_token(self, convention: str = "kit") -> int:
        if convention == "6n":
            return 6 * (self.frozen + self.trainable)
        return 4 * self.frozen + 6 * self.trainable

    def attention(self, sum_sq: float) -> float:
        """FLOPs of the attention scores of sequences whose squared lengths sum to `sum_sq`."""
        return 12.0 * self.attn_layers * self.attn_width * sum_sq


def model_flops(model) -> ModelFlops:
    """Matmul weights of `model` (a transformers model, possibly wrapped by peft), frozen and
    trainable. A linear layer is any module with in_features/out_features and a weight (torch's
    Linear, bitsandbytes' 4-bit and 8-bit layers: their packed weights do not have the matmul's
    shape, so the features are used); peft's LoRA wrappers are skipped (their base layer and A/B
    are counted themselves)."""
    frozen = trainable = 0
    for module in model.modules():
        if hasattr(module, "base_layer") or not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            continue
        weight = getattr(module, "weight", None)
        if weight is None or not isinstance(module.in_features, int):
            continue
        n = module.in_features * module.out_features
        if weight.requires_grad:
            trainable += n
        else:
            frozen += n
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    head_dim = getattr(cfg, "head_dim", None) or (int(getattr(cfg, "hidden_size", 0) or 0) // max(1, heads))
    return ModelFlops(frozen, trainable, layers, heads * int(head_dim))


def _measured_matmul(device, dtype, n: int, repeat: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up (kernel selection, thread pool)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync()
    return 2.0 * n**3 * repeat / (time.perf_counter() - t0)


def device_peak(device) -> tuple[float, str]:
    """(FLOP/s the utilisation is measured against, what it is)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for part, tflops in GPU_PEAK_TFLOPS:
            if part in name:
                return tflops * 1e12, f"{name}: dense bf16 peak {tflops:g} TFLOP/s (datasheet)"
        flops = _measured_matmul(device, torch.bfloat16, 8192, 20)
        return flops, f"{name}: measured bf16 matmul {flops / 1e12:.0f} TFLOP/s (not in the table of known GPUs)"
    flops = _measured_matmul(device, torch.float32, 1024, 8)
    return flops, f"CPU: measured fp32 matmul {flops / 1e12:.3f} TFLOP/s ({torch.get_num_threads()} threads)"


def batch_counts(inputs: dict[str, Any]):
    """[tokens, trained tokens, sum of squared sequence lengths] of one micro-batch, as a float64
    tensor on the batch's device (no host synchronisation). Sequences: padded rows by their
    attention mask; packed rows (position_ids restarting at 0) per example; else whole rows.
    Trained: labels other than -100 past each row's first position (the positions the loss scores),
    else a completion mask (preference data), else every token."""
    import torch

    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    mask = inputs.get("attention_mask")
    pos = inputs.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.shape == ids.shape and (mask is None or bool(mask.dim() != 2)):
        # packed: an example ends where the next position is 0 (or the row ends); its length is its last position + 1
        last = torch.ones_like(pos, dtype=torch.bool)
        last[:, :-1] = pos[:, 1:] == 0
        lengths = (pos + 1).to(torch.float64) * last
        tokens = torch.tensor(float(ids.numel()), dtype=torch.float64, device=ids.device)
    elif isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
        lengths = mask.sum(dim=1, dtype=torch.float64)
        tokens = lengths.sum()
    else:
        lengths = torch.full((ids.shape[0],), float(ids.shape[1]), dtype=torch.float64, device=ids.device)
        tokens = lengths.sum()
    labels = inputs.get("labels")
    completion = inputs.get("completion_mask")
    if isinstance(labels, torch.Tensor) and labels.shape == ids.shape:
        trained = (labels[:, 1:] != -100).sum(dtype=torch.float64)
    elif isinstance(completion, torch.Tensor) and completion.shape == ids.shape:
        trained = completion[:, 1:].sum(dtype=torch.float64)
    else:
        trained = tokens
    return torch.stack([tokens, trained, (lengths * lengths).sum()])


class ThroughputAccounting:
    """Trainer mixin (before the Trainer class): counts each micro-batch's tokens, trained tokens and
    squared sequence lengths on its device, and at every training log adds, over all ranks since the
    previous log: `tokens_per_s`, `trained_tokens_per_s`, `tflops` (achieved per device, the kit's
    convention), `mfu` and `mfu_6n` (fractions of `mfu_peak`), and `peak_mem_gib` (this rank's:
    the allocator's peak on a GPU, the process's resident high-water mark on CPU). Numbers reach the
    host only at log time, so counting costs no synchronisation per step."""

    _acc = None
    _t_last: float | None = None
    _flops: ModelFlops | None = None
    _peak: tuple[float, str] | None = None
    throughput_total: dict[str, float] | None = None

    def training_step(self, model, inputs, *args, **kwargs):
        counts = batch_counts(inputs)
        if counts is not None:
            self._acc = counts if self._acc is None else self._acc + counts.to(self._acc.device)
        if self._t_last is None:
            self._t_last = time.perf_counter()
        return super().training_step(model, inputs, *args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._acc is not None and self._t_last is not None:
            logs.update(self._interval())
        return super().log(logs, *args, **kwargs)

    def _interval(self) -> dict[str, Any]:
        import torch

        if self._flops is None:  # once; the peak's matmul is not the run's time
            started = time.perf_counter()
            self._flops = model_flops(self.accelerator.unwrap_model(self.model))
            self._peak = device_peak(self.args.device)
            self._t_last += time.perf_counter() - started
        now = time.perf_counter()
        dt = max(now - self._t_last, 1e-9)
        acc = self._acc.clone()
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            torch.distributed.all_reduce(acc)
        tokens, trained, sum_sq = (float(x) for x in acc.tolist())
        self._acc.zero_()
        self._t_last = now
        kit = tokens * self._flops.per_token() + self._flops.attention(sum_sq)
        six = tokens * self._flops.per_token("6n") + self._flops.attention(sum_sq)
        per_device = kit / dt / world
        total = self.throughput_total or {"seconds": 0.0, "tokens": 0.0, "trained": 0.0, "flops": 0.0, "flops_6n": 0.0}
        for k, v in (("seconds", dt), ("tokens", tokens), ("trained", trained), ("flops", kit), ("flops_6n", six)):
            total[k] += v
        total["world"] = world
        self.throughput_total = total
        return {"tokens_per_s": round(tokens / dt, 1), "trained_tokens_per_s": round(trained / dt, 1),
                "tflops": significant(per_device / 1e12), "mfu": significant(per_device / self._peak[0]),
                "mfu_6n": significant(six / dt / world / self._peak[0]), "peak_mem_gib": round(peak_memory(self.args.device) / 2**30, 3)}

    def throughput_summary(self) -> dict[str, Any] | None:
        """Totals over the whole run (the logged intervals): what run.json records and the recipe prints."""
        t = self.throughput_total
        if not t or t["seconds"] <= 0 or self._peak is None:
            return None
        per_device = t["flops"] / t["seconds"] / t["world"]
        return {"tokens": int(t["tokens"]), "trained_tokens": int(t["trained"]), "seconds": t["seconds"],
                "tokens_per_s": round(t["tokens"] / t["seconds"], 1),
                "trained_tokens_per_s": round(t["trained"] / t["seconds"], 1),
                "tflops_per_device": significant(per_device / 1e12), "mfu": significant(per_device / self._peak[0]),
                "mfu_6n": significant(t["flops_6n"] / t["seconds"] / t["world"] / self._peak[0]),
                "mfu_peak": self._peak[1], "peak_mem_gib": round(peak_memory(self.args.device) / 2**30, 3),
                "flops_per_token": {"kit": self._flops.per_token(), "6n": self._flops.per_token("6n")},
                "matmul_weights": {"frozen": self._flops.frozen, "trainable": self._flops.trainable}}


def significant(x: float) -> float:
    """Four significant figures (a CPU's 0.01 TFLOP/s and a GPU's 400 alike)."""
    return float(f"{x:.4g}")


def peak_memory(device) -> int:
    import torch

    from finetune.training.callbacks import process_rss

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return process_rss("VmHWM") or 0
