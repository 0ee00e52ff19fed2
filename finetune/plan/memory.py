"""`finetune plan`: will this run fit? A per-device memory plan from `config.json` alone.

    finetune plan configs/train/llama3_70b_qlora_zero3.yaml --gpus-per-node 8 --gpu-memory 80GiB

Reads the model's `config.json` (a local directory, a file bundled in finetune/model_configs/, or a hub id only
when online; never weights), the training config, and the DeepSpeed JSON, then adds up what one
device holds at the peak of a training step: weights, trainable parameters with their gradients and
optimizer states (partitioned by ZeRO, moved to host by offload), activations, and an allowance.
Nothing here imports torch: the plan prints in well under a second.

Every formula below names where it comes from. Bytes per parameter, with Psi parameters, N ranks:
  ZeRO (Rajbhandari et al. 2020, sec. 3): mixed-precision Adam holds 2Psi (16-bit params) + 2Psi
    (16-bit grads) + K*Psi (K = 12: fp32 master, m, v); stage 1 divides K*Psi by N, stage 2 also
    the grads, stage 3 also the params. DeepSpeed's own estimator adds 4Psi for the fp32 gradient
    partition it keeps for the step (K = 16, "18 = 2 + 16" in stage_1_and_2.py / stage3.py); we
    count it too, so the two agree (tests/finetune/test_plan.py).
  NF4 (Dettmers et al. 2023, QLoRA sec. 3): 4 bits = 0.5 byte/param, plus one fp32 absmax per
    64-weight block = 32/64 = 0.5 bit/param; double quantization stores 8-bit absmax plus one fp32
    constant per 256 absmax: 8/64 + 32/(64*256) = 0.127 bit/param.
Activations are counted the way autograd saves them for a Llama-style block (RMSNorm, GQA attention
through SDPA/flash, SwiGLU MLP); see `layer_activation_bytes`, checked against a real
LlamaDecoderLayer with `torch.autograd.graph.saved_tensors_hooks` in the tests.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

from finetune.data.kinds import kind
from finetune.methods import registry as methods
from finetune.plan.shapes import (
    GiB,
    ModelShape,
    fmt_bytes,
    fmt_count,
    hub_id_to_key,
    lora_target_names,
    lora_trainable_params,
    param_counts,
    parse_size,
    resolve_model_config,
)

__all__ = [
    "Setup",
    "Plan",
    "Line",
    "setup_from_config",
    "setup_for_batch",
    "make_plan",
    "plan_from_batch",
    "render_plan",
    "activation_bytes",
    "layer_activation_bytes",
    "model_state_lines",
    "nf4_bytes_per_param",
    # the model's shape, re-exported for the plan's callers (finetune.plan.shapes)
    "ModelShape",
    "GiB",
    "param_counts",
    "lora_trainable_params",
    "resolve_model_config",
    "parse_size",
    "fmt_count",
    "hub_id_to_key",
]

# Expected cost of each way out, for the "what would fit" list (speed, relative to the plan as given).
COSTS = {
    "micro_batch": "same tokens/step with grad_accum raised to match; a smaller micro-batch uses the GPU less well",
    "checkpointing": "~1.3x step time: one extra forward per layer in backward (4 passes instead of 3)",
    "qlora": "~1.2-1.5x step time: every 4-bit weight is dequantized in forward and again in backward",
    "lora": "trains adapters instead of all weights: a different method, ~same step time, far less memory",
    "zero2": "~same speed: ZeRO-2 moves the same bytes as DDP (reduce-scatter + all-gather, ZeRO paper)",
    "zero3": "~1.1-1.3x step time on NVLink (1.5x DDP's communication volume, ZeRO paper); more across nodes",
    "offload_optimizer": "~1.5-3x step time: the Adam step runs on CPU and grads/params cross PCIe every step",
    "offload_param": "~2-5x step time: every layer's weights are fetched from host memory in forward and backward",
    "shorter": "same speed per token; examples longer than the new max_length are truncated (or dropped)",
    "precompute_ref": "one scoring pass over the training data before training, then no reference forward per step",
    "teacher_4bit": "the teacher's weights are dequantized in each of its forwards (~1.2-1.5x its forward time), and its "
                    "distributions carry the NF4 rounding error",
    "liger": "same or faster steps (fused Triton kernels); needs pip install 'finetune-kit[liger]' and a "
             "Llama/Mistral/Qwen2-family model",
}


# ----------------------------------------------------------------------------------------------
# the run: training config -> Setup
# ----------------------------------------------------------------------------------------------
@dataclass
class Setup:
    """Everything the plan depends on besides the model's shape."""

    adapter: str = "lora"  # lora | qlora | full
    lora_r: int = 16
    lora_targets: list[str] | str = "all-linear"
    modules_to_save: list[str] = field(default_factory=list)
    lora_dropout: float = 0.05
    quant_bits: int = 4
    double_quant: bool = True
    weight_dtype: str = "bfloat16"  # dtype the base weights are loaded in
    precision: str = "bf16"  # fp32 | bf16 | fp16 (mixed precision of the step)
    zero_stage: int = 0  # 0 = no DeepSpeed
    offload_optimizer: bool = False
    offload_param: bool = False
    max_live_parameters: float = 1e9  # ZeRO-3 stage3_max_live_parameters (DeepSpeed's default 1e9)
    nodes: int = 1
    gpus_per_node: int = 1
    micro_batch: int = 1
    seq_len: int = 2048  # tokens per row of the micro-batch the plan is for (padding included)
    max_length: int | None = None  # the config's max_length, when seq_len comes from the data instead
    batch_note: str = ""  # where micro_batch x seq_len comes from ("" = every row max_length tokens)
    # The share of the micro-batch's tokens that are trained (labels != -100: assistant turns, no padding):
    # the chunked loss, and distillation's divergence, run at those positions only. 1.0 without data.
    trained_fraction: float = 1.0
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    loss: str = "chunked"  # chunked | full (training.loss)
    kernels: str = "none"  # none | liger (training.kernels; GPU only)
    method: str = methods.DEFAULT  # the training method (finetune.methods): what it adds is asked of its record
    precompute_ref: bool = False  # the reference's log-probs are computed before training (its reference_off_key)
    # The run trains against a reference (Method.has_reference of its config); None: the method's record says.
    reference: bool | None = None
    teacher: ModelShape | None = None  # the frozen teacher's shape, for a method that trains against one
    teacher_4bit: bool = False  # the teacher loads in 4-bit
    teacher_dtype: str = "bfloat16"  # dtype the teacher's weights load in (the compute dtype)
    # A method that generates its completions while training (Method.completion_room): the longest
    # completion, and the rows one generation holds per device (micro-batch x the steps it serves).
    completion_len: int = 0
    rollout_rows: int = 0
    attn: str = "sdpa"  # sdpa | flash_attention_2 | eager
    device: str = "gpu"  # gpu | cpu (cpu: the validation target, fp32, process RSS)
    device_memory: int = 80 * GiB
    host_memory: int | None = None  # per node

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage > 0

    @property
    def method_spec(self) -> methods.Method:
        return methods.get(self.method)

    @property
    def has_reference(self) -> bool:
        return self.method_spec.reference if self.reference is None else self.reference

    @property
    def sequences_per_example(self) -> int:
        """Rows of a micro-batch per example: pairs run chosen and rejected in one forward."""
        return kind(self.method_spec.data).sequences_per_example

    @property
    def liger(self) -> bool:
        return self.kernels == "liger" and self.device == "gpu"

    @property
    def liger_fused_loss(self) -> bool:
        """Liger's fused linear cross-entropy is the loss (finetune.training.launch.kernel_settings: not
        under ZeRO-3, where the kit's chunked loss stays)."""
        return self.liger and self.loss == "chunked" and self.zero_stage != 3 and self.method_spec.token_loss


_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def _deepspeed_options(path: str | None) -> tuple[int, bool, bool, float]:
    if not path:
        return 0, False, False, 1e9
    from finetune.training.launch import read_deepspeed_json

    z = read_deepspeed_json(path).get("zero_optimization", {})
    dev = lambda k: str((z.get(k) or {}).get("device", "none")).lower() in ("cpu", "nvme")  # noqa: E731
    live = z.get("stage3_max_live_parameters", 1e9)
    live = 1e9 if isinstance(live, str) else float(live)  # "auto" is not resolved by HF: DeepSpeed's 1e9
    return int(z.get("stage", 0)), dev("offload_optimizer"), dev("offload_param"), live


def setup_from_config(cfg, *, nodes: int = 1, gpus_per_node: int = 1, device: str = "gpu",
                      device_memory: int = 80 * GiB, host_memory: int | None = None) -> Setup:
    """TrainConfig -> Setup. On a GPU, dtype/precision `auto` mean bf16 (an Ampere-or-newer GPU, as
    `finetune.models.loading.resolve_dtype` picks); on CPU they mean fp32, as training there runs."""
    stage, off_opt, off_par, max_live = _deepspeed_options(cfg.deepspeed)
    t = cfg.training
    if device == "cpu":
        wdtype = "float32" if cfg.dtype == "auto" else cfg.dtype
        precision = "fp32" if t.precision == "auto" else t.precision
    else:
        wdtype = "bfloat16" if cfg.dtype == "auto" else cfg.dtype
        precision = t.precision if t.precision != "auto" else ("bf16" if wdtype != "float32" else "fp32")
        if cfg.adapter == "full" and cfg.dtype == "auto" and not cfg.deepspeed:
            # finetune train loads fp32 master weights for full fine-tuning without DeepSpeed and
            # trains under bf16 autocast (train._weights_dtype): 4 B weights, grads and m, v.
            wdtype, precision = "float32", "bf16" if t.precision == "auto" else t.precision
    return Setup(
        adapter=cfg.adapter, lora_r=cfg.lora.r, lora_targets=cfg.lora.target_modules,
        modules_to_save=list(cfg.lora.modules_to_save), lora_dropout=cfg.lora.dropout,
        quant_bits=cfg.quantization.bits, double_quant=cfg.quantization.double_quant,
        weight_dtype=wdtype, precision=precision, zero_stage=stage, offload_optimizer=off_opt,
        offload_param=off_par and stage == 3, max_live_parameters=max_live, nodes=nodes, gpus_per_node=gpus_per_node,
        # A token budget's densest micro-batch: ceil(budget / max_length) rows of max_length tokens.
        micro_batch=(math.ceil(t.tokens_per_batch / cfg.max_length) if isinstance(t.tokens_per_batch, int)
                     else t.batch_size),
        seq_len=cfg.max_length, grad_accum=t.grad_accum,
        gradient_checkpointing=t.gradient_checkpointing, attn=cfg.attn_implementation or "sdpa",
        loss=getattr(t, "loss", "chunked"),
        kernels=_planned_kernels(cfg) if device == "gpu" else "none",  # Triton kernels: CUDA only
        method=cfg.method,
        precompute_ref=_precomputed_reference(cfg),
        reference=cfg.method_spec.has_reference(cfg),
        completion_len=cfg.method_spec.completion_room(cfg),
        # A generating method trains on its completions only (the prompt's positions are not scored).
        trained_fraction=min(1.0, cfg.method_spec.completion_room(cfg) / cfg.max_length) or 1.0,
        rollout_rows=(t.batch_size * t.grad_accum if cfg.method_spec.completion_room(cfg)
                      and isinstance(t.batch_size, int) else 0),
        **_teacher_setup(cfg, device),
        device=device, device_memory=device_memory, host_memory=host_memory,
    )


# Model families Liger has kernels for (liger_kernel.transformers.monkey_patch), for planning without
# importing it (it imports torch and Triton); a run asks Liger itself (finetune.training.launch.auto_kernels).
LIGER_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "granite")


def _planned_kernels(cfg) -> str:
    """`training.kernels` for a GPU plan: `auto` is Liger when liger-kernel is installed here and the
    model's family is one it covers (what a run on a GPU with it installed decides), else none (the
    larger plan)."""
    k = getattr(cfg.training, "kernels", "none")
    if k != "auto":
        return k
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return "none"
    try:
        raw, _ = resolve_model_config(cfg.model)
    except (FileNotFoundError, ValueError, KeyError):
        return "none"
    return "liger" if raw.get("model_type") in LIGER_FAMILIES else "none"


def _precomputed_reference(cfg) -> bool:
    """Whether the method's reference log-probs are computed before training (its reference_off_key)."""
    key = cfg.method_spec.reference_off_key
    return bool(key and functools.reduce(getattr, key.split("."), cfg))


def _teacher_setup(cfg, device: str) -> dict[str, Any]:
    """The teacher of a method that trains against one, from its config.json (loaded in the compute
    dtype: bf16 on a GPU, fp32 on CPU, at `dtype: auto`)."""
    teacher = cfg.method_spec.teacher(cfg)
    if teacher is None:
        return {}
    raw, src = resolve_model_config(teacher["model"])
    auto = "bfloat16" if device == "gpu" else "float32"
    return {"teacher": ModelShape.from_config(raw, src), "teacher_4bit": teacher["load_in_4bit"],
            "teacher_dtype": auto if cfg.dtype == "auto" else cfg.dtype}


# ----------------------------------------------------------------------------------------------
# the arithmetic
# ----------------------------------------------------------------------------------------------
def nf4_bytes_per_param(double_quant: bool) -> float:
    """QLoRA sec. 3: 4 bits + absmax. fp32 absmax per 64 weights: 32/64 = 0.5 bit; double quant:
    8-bit absmax per 64 + fp32 per 256 absmax: 8/64 + 32/(64*256) = 0.127 bit."""
    return (4 + (8 / 64 + 32 / (64 * 256) if double_quant else 32 / 64)) / 8


def _act_bytes(s: Setup) -> int:
    """Bytes of an activation element: autocast/16-bit weights on GPU compute in 16 bits."""
    if s.device == "cpu":
        return _BYTES[s.weight_dtype] if s.adapter != "qlora" else 4
    return 2 if s.precision in ("bf16", "fp16") else 4


def layer_activation_bytes(shape: ModelShape, s: Setup, micro_batch: int | None = None) -> float:
    """Bytes autograd saves per token for one decoder layer (no checkpointing).

    Counted from what each op saves for backward (A = activation bytes, norms compute in fp32):
      RMSNorm x2: fp32 input 4h (pow/mul save it) + rsqrt 4 + fp32 normalized 4h (only when the norm
        weight trains) + its A*h output (kept when a frozen-free consumer saves it: q/k/v or gate/up);
      attention (SDPA/flash): rotated q A*q, k and v A*kv (GQA: not repeated), output A*q (also o_proj's
        input), logsumexp 4*heads, cos/sin 2*A*head_dim/b; eager adds the probabilities
        (4 [+A]) * heads * seq and repeats k/v to q's width;
      SwiGLU: gate A*i (silu input), silu(gate) and up A*i each (mul inputs), product A*i (down_proj
        input, saved when down_proj's weight trains);
      LoRA with dropout > 0, per adapted linear of input width n: dropout mask (bool on GPU, a float
        tensor on CPU) + the dropped input, and A's output r; frozen base linears (and bitsandbytes'
        MatMul4Bit) save no input.
    Liger's kernels (training.kernels=liger) save less: its RMSNorm keeps the input in its own dtype
    (A*h) and the fp32 rstd, never an fp32 copy or the normalized tensor (the weight's gradient is
    recomputed from them); its SwiGLU keeps gate and up (2*A*i) and recomputes silu in backward.
    Its RoPE recomputes the rotation in backward too, but the rotated q/k are saved by attention
    anyway, so no saving is counted for it.
    """
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    nh, hd = shape.num_attention_heads, shape.head_dim
    A = _act_bytes(s)
    b = micro_batch or s.micro_batch
    full = s.adapter == "full"
    cpu = s.device == "cpu"
    out = 0.0
    # two RMSNorms
    out += 2 * ((A * h + 4) if s.liger else (4 * h + 4 + (4 * h if full else 0)))
    # attention core
    eager = s.attn == "eager"
    kv_w = q if eager else kv
    out += A * q + 2 * A * kv_w + A * q + (0 if eager else 4 * nh) + 2 * A * hd / b
    if eager:
        out += (4 + (A if A != 4 else 0)) * nh * s.seq_len
    # SwiGLU
    out += (2 if s.liger else 3) * A * i
    if full:
        out += A * h + A * h + A * i  # norm outputs (q/k/v and gate/up inputs) and down_proj input
        return out
    # LoRA / QLoRA adapters
    lin = shape.linears()
    targets = lora_target_names(shape, s.lora_targets)
    lora_dtype = 4 if not s.deepspeed or s.precision == "fp32" else 2  # peft keeps adapters fp32
    a_out = 4 if cpu else A
    if s.lora_dropout > 0:
        mask = lora_dtype if cpu else 1
        dropped = lora_dtype if cpu else A
        out += sum((mask + dropped) * lin[n][0] + a_out * s.lora_r for n in targets)
    else:
        inputs = {"q_proj": "n1", "k_proj": "n1", "v_proj": "n1", "o_proj": "attn", "gate_proj": "n2",
                  "up_proj": "n2", "down_proj": "prod"}
        seen = {inputs[n]: lin[n][0] for n in targets if inputs[n] != "attn"}  # attn output already counted
        out += A * sum(seen.values()) + sum(a_out * s.lora_r for _ in targets)
    return out


def trained_tokens(s: Setup, tokens: int) -> int:
    """The trained positions among a micro-batch's `tokens` (all of them without data)."""
    return max(1, min(tokens, math.ceil(tokens * s.trained_fraction)))


def activation_bytes(shape: ModelShape, s: Setup, micro_batch: int | None = None,
                     seq_len: int | None = None) -> dict[str, float]:
    """Activations at the start of backward (their peak), per device, for one micro-batch.

    DPO, ORPO and SimPO run chosen and rejected of every pair in one forward (TRL concatenates
    them): twice the sequences of the micro-batch. The reference's forward, and KTO's forward of
    the mismatched (KL) pairs, run without gradients (their activations are freed layer by layer),
    so they add no saved activations."""
    b = (micro_batch or s.micro_batch) * s.sequences_per_example
    t = seq_len or s.seq_len
    s2 = dataclasses.replace(s, micro_batch=b, seq_len=t)
    tokens = b * t
    A = _act_bytes(s2)
    per_layer = layer_activation_bytes(shape, s2, b)
    L = shape.num_hidden_layers
    recompute = 0.0
    if s.gradient_checkpointing:
        # each layer keeps only its input; backward recomputes one layer at a time
        recompute = per_layer * tokens
        layers = L * A * shape.hidden_size * tokens + recompute
    else:
        layers = L * per_layer * tokens
    # head: final norm + logits. logits (A), their fp32 copy for the loss, log_softmax output and its
    # gradient (fp32) are alive together at the start of backward: (A + 4 + 4) V per token, A=4 -> 12V.
    V = shape.vocab_size
    if s.method_spec.fused_lm_head:
        head_total = trl_fused_head_bytes(shape, s, b, t)
    elif s.liger_fused_loss:
        # Liger's fused linear cross-entropy: the gradient of the hidden states is computed in the
        # forward and kept ([tokens, H] in the compute dtype) instead of the hidden states; the loss
        # per token is fp32; logits exist one chunk at a time in the compute dtype, over every
        # position (ignored ones too), with chunk = next_pow2(tokens / ceil(V / H)), so a chunk of
        # logits is about the size of the hidden states. Plus the final norm's input (Liger's: A*H + 4).
        chunk = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(V / shape.hidden_size))))))
        head_total = (2 * A * shape.hidden_size + 4 + 4) * tokens + A * V * min(chunk, tokens)
    elif s.loss == "chunked":
        # finetune.models.losses: the hidden states of the trained positions are gathered (A*H per
        # trained token), and one chunk of positions at a time has fp32 logits; in the chunk's
        # backward its log-softmax output, that output's gradient and the logits' gradient are alive
        # together (12 B x V per position, as for full logits but for one chunk).
        from finetune.models.losses import LOGITS_CHUNK_BYTES

        trained = trained_tokens(s, tokens)
        chunk = min(trained, max(1, LOGITS_CHUNK_BYTES // (4 * V)))
        head_total = ((4 + A) * shape.hidden_size + 4) * trained + 12 * V * chunk
    else:
        head_total = ((4 * shape.hidden_size + 4) + V * (12 + (A if A != 4 else 0))) * tokens
    # With checkpointing, the first layer is recomputed only once backward has passed the head, whose
    # logits/log-softmax tensors are freed by then: the peak holds the larger of the two, not both
    # (measured: LoRA + checkpointing was predicted +15% high without this).
    return {"layers": layers, "head": head_total, "recompute_overlap": -min(recompute, head_total)}


# TRL's fused LM head (trl.kernels.chunked_logprob), which the preference trainers score through: the
# positions are projected in tiles of this many positions x vocabulary entries (a test keeps them in sync).
TRL_HEAD_TOKEN_TILE = 4096
TRL_HEAD_VOCAB_TILE = 32768
# fp32 tiles alive at once in its torch fallback (CPU), in backward, the step's peak: measured alone
# 8.3 per tile added (N = 1,024-4,096 positions, vocabulary 32,000; its forward holds 4.4).
TRL_HEAD_TILES_CPU = 8.3  # python scripts/measure_fused_head.py


def trl_fused_head_bytes(shape: ModelShape, s: Setup, rows: int, seq_len: int) -> float:
    """The LM head of a method that scores through TRL's fused head (Method.fused_lm_head), for `rows`
    sequences of `seq_len` tokens (pairs: chosen and rejected already counted in `rows`).

    It copies the hidden states of the positions it scores (A*H each; saved for backward), keeps
    seven fp32 statistics per position, and in backward accumulates their gradient in fp32 (4*H).
    With Triton (CUDA) only the trained positions are scored and each tile of logits is folded in
    place: one tile in the compute dtype (the fp32 accumulation is cuBLAS's out_dtype, no copies).
    Elsewhere (CPU) every position is scored and the torch fallback holds TRL_HEAD_TILES_CPU fp32
    tiles. The full [rows, seq_len, vocab] logits never exist."""
    A = _act_bytes(s)
    positions = rows * max(1, seq_len - 1)  # the next-token targets
    if s.device == "gpu":
        positions = trained_tokens(s, positions)
        tiles = A * 1.0
    else:
        tiles = 4 * TRL_HEAD_TILES_CPU
    tile = min(positions, TRL_HEAD_TOKEN_TILE) * min(shape.vocab_size, TRL_HEAD_VOCAB_TILE)
    return positions * ((A + 4) * shape.hidden_size + 7 * 4) + tiles * tile


@dataclass
class Line:
    name: str
    device: float
    host: float = 0.0
    note: str = ""


@dataclass
class Plan:
    shape: ModelShape
    setup: Setup
    lines: list[Line]
    params: dict[str, int]
    trainable: int
    allowance_note: str = ""
    max_micro_batch: int = 0
    alternatives: list[dict[str, Any]] = field(default_factory=list)
    worst_case_total: float | None = None  # the plan without data (every row max_length), beside a plan from data

    @property
    def device_total(self) -> float:
        return sum(x.device for x in self.lines)

    @property
    def host_total(self) -> float:
        return sum(x.host for x in self.lines)

    @property
    def fits(self) -> bool:
        ok = self.device_total <= self.setup.device_memory
        if self.setup.host_memory is not None:
            ok = ok and self.host_total * self.setup.gpus_per_node <= self.setup.host_memory
        return ok

    def model_states(self) -> float:
        return sum(x.device for x in self.lines if x.name.startswith(("weights", "trainable", "grads", "optimizer",
                                                                      "zero-3 gathered")))

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.shape.source, "setup": dataclasses.asdict(self.setup),
            "params_total": self.params["total"], "trainable": self.trainable,
            "lines": [dataclasses.asdict(x) for x in self.lines],
            "device_total": self.device_total, "host_total_per_rank": self.host_total,
            "fits": self.fits, "max_micro_batch": self.max_micro_batch, "alternatives": self.alternatives,
            "longest_batch": self.setup.batch_note or None, "worst_case_device_total": self.worst_case_total,
        }


def model_state_lines(shape: ModelShape, s: Setup) -> tuple[list[Line], int]:
    """Weights, trainable params, grads and optimizer states per rank (device and host)."""
    P = param_counts(shape)
    N = s.world
    st = s.zero_stage
    lines: list[Line] = []
    half = s.precision in ("bf16", "fp16")
    # DeepSpeed casts every floating parameter to the 16-bit training dtype (engine
    # _cast_module_mixed_precision); without it, weights stay in the dtype they were loaded in.
    w16 = 2 if (s.deepspeed and half) else _BYTES[s.weight_dtype]
    if s.device == "cpu" and not s.deepspeed:
        w16 = _BYTES[s.weight_dtype]
    p_div = N if st == 3 else 1
    p_host = s.offload_param and st == 3

    def place(name: str, nbytes: float, offload: bool, note: str) -> None:
        lines.append(Line(name, 0.0 if offload else nbytes, nbytes if offload else 0.0, note))

    if s.adapter == "full":
        trainable = P["total"]
        place("weights (trainable)", trainable * w16 / p_div, p_host,
              f"{fmt_count(P['total'])} params x {w16} B" + (f" / {N} (ZeRO-3)" if st == 3 else ""))
        if s.has_reference and not s.precompute_ref:
            # TRL loads the reference from the same path in the compute dtype, prepared by DeepSpeed
            # in evaluation mode (ZeRO-3: partitioned like the policy). With LoRA the reference is a
            # frozen copy of the adapter: no second copy of the weights.
            ref_b = 2 if half else _BYTES[s.weight_dtype]
            place(f"reference model ({s.method.upper()}, frozen)", P["total"] * ref_b / p_div, p_host,
                  f"{fmt_count(P['total'])} params x {ref_b} B" + (f" / {N} (ZeRO-3)" if st == 3 else "")
                  + (f"; {s.method_spec.reference_off_key}=true drops it" if s.method_spec.reference_off_key else ""))
    else:
        trainable = lora_trainable_params(shape, s.lora_r, s.lora_targets, s.modules_to_save)
        if s.adapter == "qlora":
            nf4 = nf4_bytes_per_param(s.double_quant)
            # peft's prepare_model_for_kbit_training upcasts the non-quantized params (embeddings,
            # lm_head, norms) to fp32; DeepSpeed casts them back to 16 bits.
            other = 4 if not s.deepspeed else w16
            q_b = P["linear_weights"] * 0.5 / p_div
            absmax = P["linear_weights"] * (nf4 - 0.5)  # quant_state is no parameter: ZeRO-3 keeps it whole
            rest = (P["embed_tokens"] + P["lm_head"] + P["other"]) * other / p_div
            place("weights: linear layers NF4", q_b, p_host, f"{fmt_count(P['linear_weights'])} x 0.5 B"
                  + (f" / {N}" if st == 3 else ""))
            lines.append(Line("weights: NF4 absmax", absmax, 0.0,
                              f"{(nf4 - 0.5) * 8:.3f} bit/param ({'double quant' if s.double_quant else 'fp32 absmax'})"))
            place("weights: embeddings, lm_head, norms", rest, p_host,
                  f"{fmt_count(P['total'] - P['linear_weights'])} x {other} B (not quantized)")
            ckpt_b = _BYTES.get(shape.torch_dtype, 2)
            # (ZeRO-3 copies every parameter into its partitions, which ends the views.)
            if s.device == "cpu" and st != 3 and ckpt_b == (w16 if s.deepspeed else _BYTES[s.weight_dtype]):
                # CPU only: transformers memory-maps the safetensors file; when the load dtype equals
                # the file's, the embeddings/lm_head/norms stay views of that mapping, so the mapping
                # lives on with every page quantization read: the pre-quantization linear weights,
                # counted in RSS (clean page cache, reclaimable). On a GPU everything is copied to
                # the device and the mapping goes. Measured: QLoRA was -18% without this line.
                lines.append(Line("mapped checkpoint pages (CPU)", P["linear_weights"] * ckpt_b, 0.0,
                                  f"CPU: the file's {fmt_count(P['linear_weights'])} linear weights x {ckpt_b} B "
                                  "(page cache, reclaimable)"))
        else:
            place("weights (frozen)", P["total"] * w16 / p_div, p_host,
                  f"{fmt_count(P['total'])} params x {w16} B" + (f" / {N} (ZeRO-3)" if st == 3 else ""))
        # modules_to_save: peft keeps the original and trains a copy
        copies = trainable - lora_trainable_params(shape, s.lora_r, s.lora_targets, [])
        lora_b = w16 if s.deepspeed else 4  # peft autocasts adapters to fp32 unless DeepSpeed recasts
        place("trainable params (adapters)", trainable * lora_b / p_div, p_host,
              f"{fmt_count(trainable)} x {lora_b} B" + (f" (incl. {fmt_count(copies)} modules_to_save copies)"
                                                         if copies else ""))
        if s.has_reference:
            # TRL's reference for a PEFT model: a frozen copy of the starting adapter ("ref").
            place(f"reference adapter ({s.method.upper()}, frozen)", trainable * lora_b / p_div, p_host,
                  f"{fmt_count(trainable)} x {lora_b} B, a copy of the starting adapter")
    Pt = trainable
    if s.deepspeed:
        g16 = 2 if half else 4
        g_div = N if st >= 2 else 1
        # ZeRO paper: K = 12 (fp32 master + m + v) for mixed precision; DeepSpeed's estimator also
        # counts a 4-byte fp32 gradient partition. In fp32, DeepSpeed still clones the partition as
        # the optimizer's master copy (stage_1_and_2.py single_partition_of_fp32_groups).
        # 16-bit grads live on the device only in stages 1-2 without offload: stage 3 reduce-scatters
        # each gradient into the fp32 partition as it is produced, and offload copies it to the host
        # (both leave only buckets, counted below); DeepSpeed's estimators make the same assumption.
        if half and st < 3 and not s.offload_optimizer:
            lines.append(Line("grads (16-bit)", Pt * g16 / g_div, 0.0,
                              f"{g16} B" + (f" / {N} (ZeRO-{st})" if g_div > 1 else "")))
            k_parts = "fp32 grad 4 + master 4 + m,v 8"
            K = 16
        elif st < 3 and not half and not s.offload_optimizer:
            # fp32 stages 1-2 (the CPU validation path): the reduced gradients land in a partition
            # buffer allocated during backward and freed after the step (stage_1_and_2.py
            # grads_in_partition, _release_ipg_buffers), so it is a "grads" line that reuses the
            # activations backward frees; the master is still a clone (single_partition_of_fp32_groups).
            lines.append(Line("grads (fp32 partition)", Pt * 4 / g_div, 0.0,
                              "4 B" + (f" / {N} (ZeRO-{st})" if g_div > 1 else "") + ", during backward and step"))
            K = 12
            k_parts = "master clone 4 + m,v 8"
        elif st == 3 and not half and not s.offload_optimizer:
            # stage3.py _create_fp32_partitions: when the partitioned params already are fp32 on the
            # optimizer's device, they ARE the master weights (no clone). Stages 1-2 always clone.
            K = 12
            k_parts = "fp32 grad partition 4 + m,v 8 (fp32 params are their own master)"
        else:
            K = 16  # fp32 grad partition 4 + master clone 4 + m,v 8; the params themselves are fp32
            k_parts = "fp32 grad partition 4 + master clone 4 + m,v 8"
        opt = Pt * K / N
        place("optimizer states", opt, s.offload_optimizer, f"{k_parts} = {K} B / {N} (ZeRO-{st})")
        if st == 3:
            if s.adapter == "full":
                # DeepSpeed's estimator: 4 bytes x the largest module's params for the gathered working set
                floor = 4 * P["largest_module"]
                lines.append(Line("zero-3 gathered params", floor, 0.0,
                                  "4 B x largest module (DeepSpeed estimator's working set)"))
                gathered_b = w16
            else:
                wb = 0.5 if s.adapter == "qlora" else w16
                per_layer = param_counts(shape)["per_layer"] * wb
                emb = P["embed_tokens"] * w16
                floor = 2 * max(per_layer, emb)
                lines.append(Line("zero-3 gathered params", floor, 0.0,
                                  "2 x the largest gathered module (current + prefetched)"))
                gathered_b = (P["linear_weights"] * wb + (P["total"] - P["linear_weights"]) * w16) / P["total"]
            # A gathered param stays resident while it will be reused (in backward) and fewer than
            # stage3_max_live_parameters are live (partitioned_param_coordinator.py): with the default
            # 1e9 a model under 1e9 params is whole on every rank during the step. Measured on CPU:
            # the step's peak rose by activations + the whole fp32 model (docs/plan.md).
            live = min(s.max_live_parameters, P["total"]) * gathered_b
            if live > floor:
                lines.append(Line("zero-3 live params", live - floor, 0.0,
                                  f"min(stage3_max_live_parameters {s.max_live_parameters:.0e}, params) x "
                                  f"{gathered_b:.2g} B, beyond the line above"))
    else:
        gb = _BYTES[s.weight_dtype] if s.adapter == "full" else 4
        lines.append(Line("grads", Pt * gb, 0.0, f"{gb} B per trainable param"))
        # torch AdamW keeps m and v in the parameter's dtype; no separate master copy
        lines.append(Line("optimizer states", Pt * 2 * gb, 0.0, f"AdamW m,v: 2 x {gb} B (no master copy)"))
        if s.world > 1:
            lines.append(Line("DDP gradient buckets", Pt * gb, 0.0, "the reducer's flat copy of the grads"))
    lines += _teacher_weight_lines(s)
    return lines, trainable


def _teacher_weight_lines(s: Setup) -> list[Line]:
    """The frozen teacher of a distillation run: its weights in its own dtype (DeepSpeed casts them
    to the 16-bit training dtype, as the student's), partitioned under ZeRO-3 (TRL's
    prepare_deepspeed), whole on every rank at the other stages and without DeepSpeed; in 4-bit, NF4
    linear layers as for QLoRA. No gradients, no optimizer states."""
    if s.teacher is None:
        return []
    P = param_counts(s.teacher)
    N = s.world if s.zero_stage == 3 else 1
    tb = 2 if (s.deepspeed and s.precision in ("bf16", "fp16")) else _BYTES[s.teacher_dtype]
    div = f" / {N} (ZeRO-3)" if N > 1 else ""
    host = s.offload_param and s.zero_stage == 3
    out = []

    def place(name: str, nbytes: float, note: str, offload: bool = host) -> None:
        out.append(Line(name, 0.0 if offload else nbytes, nbytes if offload else 0.0, note))

    if s.teacher_4bit:
        nf4 = nf4_bytes_per_param(s.double_quant)
        rest = P["total"] - P["linear_weights"]
        place("teacher weights: linear layers NF4", P["linear_weights"] * 0.5 / N,
              f"{fmt_count(P['linear_weights'])} x 0.5 B{div}")
        place("teacher weights: NF4 absmax", P["linear_weights"] * (nf4 - 0.5), f"{(nf4 - 0.5) * 8:.3f} bit/param",
              offload=False)
        place("teacher weights: embeddings, lm_head, norms", rest * tb / N,
              f"{fmt_count(rest)} x {tb} B (not quantized){div}")
    else:
        place("teacher weights (frozen)", P["total"] * tb / N, f"{fmt_count(P['total'])} params x {tb} B{div}")
    if s.zero_stage == 3:
        wb = 0.5 if s.teacher_4bit else tb
        out.append(Line("zero-3 teacher gathered params", 2 * max(P["per_layer"] * wb, P["embed_tokens"] * tb), 0.0,
                        "2 x the teacher's largest gathered module (current + prefetched) in its forward"))
    return out

def _overlap_and_buckets(shape: ModelShape, s: Setup, lines: list[Line]) -> list[Line]:
    """Backward frees each layer's activations as it allocates that layer's gradients, and the
    Trainer drops gradients after every step (zero_grad(set_to_none=True)): with one micro-batch per
    step the peak holds max(activations, grads), not their sum. With grad_accum > 1 the grads of the
    earlier micro-batches stay, so both count."""
    out = []
    grads = sum(x.device for x in lines if x.name.startswith("grads"))
    acts = sum(x.device for x in lines if x.name.startswith("activations"))
    if s.grad_accum == 1 and grads and acts:
        out.append(Line("overlap: grads reuse freed activations", -min(grads, acts), 0.0,
                        "peak holds max(activations, grads) when grad_accum = 1"))
    if s.deepspeed and s.zero_stage in (1, 2) and s.device == "gpu":
        bucket = 5e8 * (2 if s.precision != "fp32" else 4) + shape.hidden_size**2 * 4
        out.append(Line("zero buckets", bucket, 0.0, "allgather 5e8 + reduce h^2 elements (configs/deepspeed)"))
    return out


def _qlora_zero3_load_peak(shape: ModelShape, s: Setup, trainable: int) -> float:
    """Per-device bytes while a QLoRA model is loaded under ZeRO-3, before DeepSpeed partitions it.

    transformers does not build quantized models under zero.Init: every rank quantizes and holds
    the WHOLE 4-bit model on its own device, and peft's prepare_model_for_kbit_training upcasts the
    embeddings, lm_head and norms to fp32 (the 16-bit original of the tensor being upcast is alive
    meanwhile). Only deepspeed.initialize partitions it. For a 70B model that is ~44 GB per GPU
    whatever the GPU count, which the steady-state lines (divided by N) do not show."""
    if not (s.adapter == "qlora" and s.deepspeed and s.zero_stage == 3):
        return 0.0
    P = param_counts(shape)
    w16 = 2 if s.device == "gpu" else 4
    rest = P["embed_tokens"] + P["lm_head"] + P["other"]
    return (P["linear_weights"] * nf4_bytes_per_param(s.double_quant) + rest * 4
            + max(P["embed_tokens"], P["lm_head"]) * w16 + trainable * 4)


def _load_peak(shape: ModelShape, s: Setup, trainable: int, lines: list[Line]) -> list[Line]:
    """A line that lifts the total to the loading peak when loading needs more than the step."""
    load = _qlora_zero3_load_peak(shape, s, trainable)
    steady = sum(x.device for x in lines)
    if load <= steady:
        return []
    return [Line("zero-3 QLoRA load peak", load - steady, 0.0,
                 f"{load / GiB:.2f} GiB before partitioning: the whole 4-bit model on every rank, "
                 "non-quantized weights upcast to fp32")]


# TRL's ChunkedDivergenceFunction (trl/kernels/chunked_divergence.py) projects both models' hidden
# states onto tiles of this many positions x vocabulary entries, in fp32 (a test keeps them in sync).
KD_TOKEN_TILE = 4096
KD_VOCAB_TILE = 32768
# fp32 tiles alive at once: on a GPU its two buffers (the Triton kernels work in place) plus, in a
# 16-bit run, the 16-bit copy of the gradient tile in backward. On CPU its torch fallback holds
# temporaries too: measured alone, 8.0 tiles in forward and 10.8 in backward (512 and 1,024
# positions); in the CPU training runs of docs/plan.md the step's peak matches 8.
KD_TILES_CPU = 8.0


def _teacher_activation_lines(shape: ModelShape, s: Setup, lines: list[Line]) -> list[Line]:
    """What distillation adds to a step's peak (finetune.methods.distill), beyond the teacher's weights.

    The teacher runs first, without gradients, and keeps only its final hidden states at the
    trained positions (at most every token: tokens x H_teacher in the compute dtype) for the
    divergence. The divergence (TRL's kernel) holds fp32 tiles of min(tokens, 4096) x 32768 logits
    while it runs (KD_TILES_CPU on CPU, 2-2.5 on a GPU), accumulates the gradient of the student's
    hidden states in fp32 (4 B x H per token) and keeps three fp32 statistics per token. The cross-entropy's chunk of logits (counted in the head line) is freed
    before the divergence runs and recomputed after it, so the peak holds the larger of the two.
    The teacher's own forward (no autograd: one layer's intermediates at a time, the largest being
    the residual stream, its norm and the SwiGLU's gate/up/product, (2 H + 3 I) x A per token, or the
    attention's q/k/v and output) runs before the student's forward, so it counts only where it is
    larger than the student's activations. Validated on CPU (docs/plan.md); not on a GPU."""
    if s.teacher is None:
        return []
    from finetune.models.losses import LOGITS_CHUNK_BYTES

    t = s.teacher
    tokens = s.micro_batch * s.seq_len
    trained = trained_tokens(s, tokens)  # the teacher's hidden states and the divergence: trained positions only
    A = _act_bytes(s)
    hidden = trained * t.hidden_size * A
    rows = min(trained, KD_TOKEN_TILE)
    n_tiles = KD_TILES_CPU if s.device == "cpu" else (2.5 if A == 2 else 2.0)
    tile_bytes = n_tiles * rows * KD_VOCAB_TILE * 4
    out = [Line("activations: teacher hidden states", hidden, 0.0,
                f"{trained} trained tokens x {t.hidden_size} x {A} B, kept for the divergence"),
           Line("activations: divergence tiles", tile_bytes + trained * (4 * shape.hidden_size + 12), 0.0,
                f"TRL's kernel: {n_tiles:g} fp32 tiles of {rows} x {KD_VOCAB_TILE} + fp32 grad of the hidden states")]
    ce_logits = 12 * shape.vocab_size * min(trained, max(1, LOGITS_CHUNK_BYTES // (4 * shape.vocab_size)))
    out.append(Line("overlap: divergence after the logits are freed", -min(ce_logits, tile_bytes), 0.0,
                    "the cross-entropy's chunk of logits and the divergence's tiles are not alive together"))
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    teacher_fwd = tokens * A * max(2 * t.hidden_size + 3 * t.intermediate_size, 2 * t.hidden_size + 3 * q + 2 * kv)
    student_step = sum(x.device for x in lines + out if x.name.startswith(("activations", "overlap")))
    if teacher_fwd > student_step:
        out.append(Line("teacher forward peak", teacher_fwd - student_step, 0.0,
                        "the teacher's no-grad forward needs more than the student's step"))
    return out


def _rollout_lines(shape: ModelShape, s: Setup, lines: list[Line]) -> list[Line]:
    """A generating method's rollouts (transformers' generate, no gradients): the KV cache of the
    generation batch at its longest (every row prompt + completion: 2 x layers x kv heads x head_dim x
    A bytes per token), the current position's logits (fp32, with the sampling's softmax and its copy:
    12 V per row) and one layer's no-grad intermediates. Rollouts and the training step do not run
    at the same time, so the line is what the rollouts need beyond the step's activations (0 when
    the step needs more). Not yet validated against a measured run."""
    if not s.completion_len or not s.rollout_rows:
        return []
    A = _act_bytes(s)
    rows, t = s.rollout_rows, s.seq_len
    kv = 2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_dim * A * rows * t
    step = rows * (12 * shape.vocab_size + A * (2 * shape.hidden_size + 3 * shape.intermediate_size))
    acts = sum(x.device for x in lines if x.name.startswith(("activations", "overlap")))
    beyond = max(0.0, kv + step - acts)
    return [Line("rollouts: KV cache beyond the step", beyond, 0.0,
                 f"generation of {rows} rows x {t} tokens: KV cache {kv / GiB:.2f} GiB + logits/sampling "
                 f"{step / GiB:.2f} GiB, not alive with the step's activations")]


ALLOWANCE_GPU_FIXED = 1.0 * GiB
ALLOWANCE_FRACTION = 0.05


def make_plan(shape: ModelShape, s: Setup, *, alternatives: bool = True) -> Plan:
    """The full per-device breakdown, verdict, largest fitting micro-batch and the ways out."""
    lines, trainable = model_state_lines(shape, s)
    act = activation_bytes(shape, s)
    note_ckpt = "checkpointing on" if s.gradient_checkpointing else "no checkpointing"
    if s.liger:
        note_ckpt += ", Liger RMSNorm/SwiGLU"
    rows = (f"{s.micro_batch} pairs = {2 * s.micro_batch} sequences (chosen + rejected)"
            if s.sequences_per_example == 2
            else f"{s.micro_batch}")
    lines.append(Line("activations: decoder layers", act["layers"], 0.0, f"{rows} x {s.seq_len} tokens, {note_ckpt}"))
    if s.method_spec.fused_lm_head:
        head_note = (f"TRL's fused LM head: tiles of {TRL_HEAD_TOKEN_TILE} positions x {TRL_HEAD_VOCAB_TILE} "
                     + ("entries, trained positions only" if s.device == "gpu" else "entries, every position"))
    elif s.liger_fused_loss:
        head_note = "Liger fused linear cross-entropy: one chunk of logits, gradient computed in forward"
    elif s.loss == "chunked":
        head_note = "chunked: one chunk of fp32 logits at a time"
    else:
        head_note = "full fp32 logits (training.loss=full)"
    lines.append(Line("activations: logits + loss", act["head"], 0.0, f"vocab {shape.vocab_size}, {head_note}"))
    if act["recompute_overlap"]:
        lines.append(Line("overlap: recompute after the loss is freed", act["recompute_overlap"], 0.0,
                          "checkpointing: the recomputed layer and the logits are not alive together"))
    lines += _teacher_activation_lines(shape, s, lines)
    lines += _rollout_lines(shape, s, lines)
    lines += _overlap_and_buckets(shape, s, lines)
    lines += _load_peak(shape, s, trainable, lines)
    dynamic = sum(x.device for x in lines)
    if s.device == "gpu":
        allow = ALLOWANCE_GPU_FIXED + ALLOWANCE_FRACTION * dynamic
        note = "1 GiB CUDA context/NCCL + 5% caching-allocator fragmentation"
    else:
        allow = ALLOWANCE_FRACTION * dynamic
        note = "5% heap fragmentation (glibc malloc, no caching allocator)"
    lines.append(Line("allowance", allow, 0.0, note))
    plan = Plan(shape, s, lines, param_counts(shape), trainable, allowance_note=note)
    plan.max_micro_batch = _max_micro_batch(shape, s)
    if alternatives:
        plan.alternatives = _alternatives(shape, s, plan)
    return plan


def setup_for_batch(s: Setup, batch) -> Setup:
    """`s` for the micro-batch that sets the peak (finetune.plan.batches.LongestBatch): its rows and its
    tokens per row instead of batch_size x max_length, and the share of them that is trained."""
    fraction = batch.trained_tokens / batch.tokens if batch.trained_tokens else 1.0
    return dataclasses.replace(s, micro_batch=batch.rows, seq_len=batch.row_tokens, max_length=s.seq_len,
                               batch_note=batch.describe(), trained_fraction=min(1.0, fraction))


def plan_from_batch(shape: ModelShape, s: Setup, batch, *, alternatives: bool = True) -> Plan:
    """The plan for the data's longest micro-batch, with the worst case (every row max_length) beside it."""
    plan = make_plan(shape, setup_for_batch(s, batch), alternatives=alternatives)
    plan.worst_case_total = make_plan(shape, s, alternatives=False).device_total
    return plan


def _quick(shape: ModelShape, s: Setup) -> Plan:
    lines, trainable = model_state_lines(shape, s)
    act = activation_bytes(shape, s)
    lines += [Line("activations", act["layers"]), Line("activations: head", act["head"]),
              Line("overlap: recompute", act["recompute_overlap"])]
    lines += _teacher_activation_lines(shape, s, lines)
    lines += _rollout_lines(shape, s, lines)
    lines += _overlap_and_buckets(shape, s, lines)
    lines += _load_peak(shape, s, trainable, lines)
    dyn = sum(x.device for x in lines)
    allow = (ALLOWANCE_GPU_FIXED if s.device == "gpu" else 0) + ALLOWANCE_FRACTION * dyn
    lines.append(Line("allowance", allow))
    return Plan(shape, s, lines, {}, trainable)


def _max_micro_batch(shape: ModelShape, s: Setup, limit: int = 1024) -> int:
    if not _quick(shape, dataclasses.replace(s, micro_batch=1)).fits:
        return 0
    lo, hi = 1, 2
    while hi <= limit and _quick(shape, dataclasses.replace(s, micro_batch=hi)).fits:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # memory grows monotonically with the micro-batch
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _quick(shape, dataclasses.replace(s, micro_batch=mid)).fits else (lo, mid)
    return lo


def _candidates(s: Setup) -> list[tuple[str, str, Setup]]:
    out: list[tuple[str, str, Setup]] = []
    R = dataclasses.replace
    if not s.gradient_checkpointing:
        out.append(("gradient checkpointing on", "checkpointing", R(s, gradient_checkpointing=True)))
    off_key = s.method_spec.reference_off_key
    if off_key and s.has_reference and s.adapter == "full" and not s.precompute_ref:
        out.append((f"{off_key}=true (no reference model in memory)", "precompute_ref", R(s, precompute_ref=True)))
    four_bit_key = s.method_spec.teacher_4bit_key
    if four_bit_key and s.teacher is not None and not s.teacher_4bit:
        out.append((f"{four_bit_key}=true", "teacher_4bit", R(s, teacher_4bit=True)))
    if s.device == "gpu" and s.kernels == "none":
        out.append(("training.kernels none -> liger", "liger", R(s, kernels="liger")))
    if s.adapter == "lora":
        out.append(("LoRA -> QLoRA (NF4, double quant)", "qlora", R(s, adapter="qlora")))
    if s.adapter == "full":
        out.append(("full -> LoRA r=16 all-linear", "lora", R(s, adapter="lora", lora_r=16, lora_targets="all-linear")))
    if s.world > 1 or s.zero_stage:
        if s.zero_stage < 2:
            out.append((f"ZeRO-{s.zero_stage} -> ZeRO-2", "zero2", R(s, zero_stage=2)))
        if s.zero_stage < 3:
            out.append((f"ZeRO-{s.zero_stage} -> ZeRO-3", "zero3", R(s, zero_stage=3)))
    if s.deepspeed and not s.offload_optimizer:
        out.append(("offload optimizer to CPU", "offload_optimizer", R(s, offload_optimizer=True)))
    if s.zero_stage == 3 and not s.offload_param:
        out.append(("offload params to CPU (ZeRO-3)", "offload_param",
                    R(s, offload_optimizer=True, offload_param=True)))
    if not s.deepspeed and s.world == 1:
        out.append(("ZeRO-3 + offload optimizer/params to CPU", "offload_param",
                    R(s, zero_stage=3, offload_optimizer=True, offload_param=True)))
    max_length = s.max_length or s.seq_len
    for frac in (2, 4):
        if max_length // frac >= 256 and max_length // frac < s.seq_len:
            out.append((f"max_length {max_length} -> {max_length // frac}", "shorter",
                        R(s, seq_len=max_length // frac)))
    return out


def _alternatives(shape: ModelShape, s: Setup, plan: Plan) -> list[dict[str, Any]]:
    """Single changes that fit (each with its micro-batch and cost); pairs only when no single one does."""
    results = []
    for label, cost_key, alt in _candidates(s):
        mb = _max_micro_batch(shape, alt)
        if mb >= 1:
            fitting = dataclasses.replace(alt, micro_batch=min(s.micro_batch, mb))
            results.append({"change": label, "device_total": _quick(shape, fitting).device_total,
                            "max_micro_batch": mb, "cost": COSTS[cost_key]})
    if not results and not plan.fits:
        singles = _candidates(s)
        for a in range(len(singles)):
            for b in range(a + 1, len(singles)):
                (la, ka, _), (lb, kb, _) = singles[a], singles[b]
                if ka == kb:
                    continue
                both = [x for x in _candidates(singles[a][2]) if x[0] == lb]
                if not both:
                    continue
                alt = both[0][2]
                mb = _max_micro_batch(shape, alt)
                if mb >= 1:
                    fitting = dataclasses.replace(alt, micro_batch=min(s.micro_batch, mb))
                    results.append({"change": f"{la} + {lb}", "device_total": _quick(shape, fitting).device_total,
                                    "max_micro_batch": mb, "cost": f"{COSTS[ka]}; {COSTS[kb]}"})
    order = list(COSTS)
    results.sort(key=lambda r: (order.index(next(k for k in COSTS if COSTS[k] in r["cost"])),
                                r["device_total"]))
    return results


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def render_plan(plan: Plan) -> str:
    s, sh = plan.setup, plan.shape
    dev = "GPU" if s.device == "gpu" else "process (CPU RSS)"
    zero = f"ZeRO-{s.zero_stage}" if s.zero_stage else "no ZeRO"
    off = " + offload " + "/".join(x for x, on in (("optimizer", s.offload_optimizer), ("params", s.offload_param))
                                   if on) if (s.offload_optimizer or s.offload_param) else ""
    head = [
        f"model     {sh.source}  ({fmt_count(plan.params['total'])} params, {sh.num_hidden_layers} layers, "
        f"hidden {sh.hidden_size}, {sh.num_attention_heads}/{sh.num_key_value_heads} heads q/kv, vocab {sh.vocab_size})",
        f"run       {s.adapter}" + (f" r={s.lora_r}" if s.adapter != "full" else "")
        + f", {s.precision}, {zero}{off}, {s.nodes} node(s) x {s.gpus_per_node} = {s.world} rank(s), "
        f"micro-batch {s.micro_batch} x {s.seq_len} tokens, checkpointing {'on' if s.gradient_checkpointing else 'off'}"
        + (", Liger kernels" if s.liger else ""),
        f"trainable {fmt_count(plan.trainable)} params ({100 * plan.trainable / plan.params['total']:.3f}%)",
        (f"batch     longest: {s.batch_note}" if s.batch_note
         else f"batch     every row {s.seq_len} tokens (max_length): the worst case; `finetune plan --data` plans "
              "from the data's own lengths"),
        *([f"teacher   {s.teacher.source}  ({fmt_count(param_counts(s.teacher)['total'])} params, "
           f"{'NF4' if s.teacher_4bit else s.teacher_dtype}, frozen)"] if s.teacher else []),
        "",
        f"{'per ' + dev:38s} {'device':>12s} {'host':>12s}   how",
    ]
    rows = [f"{x.name:38s} {fmt_bytes(x.device):>12s} {fmt_bytes(x.host) if x.host else '':>12s}   {x.note}"
            for x in plan.lines]
    total = (f"{'TOTAL':38s} {fmt_bytes(plan.device_total):>12s} "
             f"{fmt_bytes(plan.host_total) if plan.host_total else '':>12s}   "
             f"of {fmt_bytes(s.device_memory).strip()} per device")
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    out = head + rows + ["-" * 100, total, ""]
    out.append(f"verdict   {verdict}: {fmt_bytes(plan.device_total).strip()} predicted per device, "
               f"{fmt_bytes(s.device_memory).strip()} available"
               + (f"; host {fmt_bytes(plan.host_total * s.gpus_per_node).strip()} per node" if plan.host_total else ""))
    if plan.worst_case_total is not None:
        out.append(f"without data (every row {s.max_length} tokens): {fmt_bytes(plan.worst_case_total).strip()} "
                   "per device, the worst case")
    out.append(f"largest micro-batch that fits: {plan.max_micro_batch}" if plan.max_micro_batch
               else "largest micro-batch that fits: none (even 1 does not fit)")
    if plan.alternatives:
        out.append("")
        out.append("would fit (change -> predicted per device, largest micro-batch; expected speed cost):")
        for a in plan.alternatives:
            out.append(f"  - {a['change']}: {fmt_bytes(a['device_total']).strip()}, micro-batch <= "
                       f"{a['max_micro_batch']}; {a['cost']}")
    return "\n".join(out)


