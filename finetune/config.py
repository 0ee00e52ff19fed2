"""Training configuration: YAML recipe + dotted ``key=value`` overrides, one typed schema.

Every problem in a config (unknown key, wrong type, bad value, missing file) is collected and
reported at once, each with its dotted key, before any model or data is loaded.

Relative paths (`model`, `deepspeed`, `init_adapter`, `data.train`, `data.eval`, `eval.data`,
`distill.teacher`, `distill.teacher_adapter`): a path written in a YAML file is read from that
file's directory, so a config works from any working directory
(`deepspeed: ../deepspeed/zero3.json` in configs/train/). When nothing exists there, the current
directory is used instead, for configs written when paths were read from the working directory.
A path given as `key=value` on the command line is read from the current directory. Outputs
(`output_dir`, `data.cache_dir`) are always relative to the current directory.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from finetune.methods import registry as methods
from finetune.methods.distill import DistillSection
from finetune.methods.dpo import DPOSection
from finetune.methods.grpo import GRPOSection
from finetune.methods.kto import KTOSection
from finetune.methods.reference_free import ORPOSection, SimPOSection
from finetune.section import Section, model_present
from kitcore import overrides as kitcore_overrides

__all__ = [
    "ConfigError",
    "Section",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "parse_overrides",
    "resolve_yaml_path",
    "validation_problems",
]


class ConfigError(ValueError):
    """A config failed to load; ``problems`` lists every ``(dotted key, message)``."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{len(problems)} problem(s) in config {source}:"]
        lines += [f"  - {key}: {msg}" for key, msg in problems]
        super().__init__("\n".join(lines))


class DataConfig(Section):
    train: str = Field(description="Chat JSONL for training (as `data-prep` writes it): a file, a shard "
                       "directory of `data-prep --engine ray` (read through its manifest.json), or a glob of "
                       "JSONL shards.")
    eval: str | None = Field(None, description="Chat JSONL for evaluation during training (a file, shard "
                             "directory or glob, as data.train).")
    loss_on: Literal["assistant", "last_assistant", "all"] = Field(
        "assistant",
        description="Which tokens are trained: every assistant turn (content + end-of-turn token), "
        "only the last assistant turn, or the whole sequence.",
    )
    too_long: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with examples longer than `max_length`; both are counted."
    )
    cache_dir: str | None = Field(
        None, description="Where the tokenized data cache lives (default: `.finetune-cache/` next to the data "
        "file, shared by every run and sweep trial on it; `<output_dir>/data-cache/` when that is not writable).",
    )
    cache_key: Literal["content", "stat"] = Field(
        "content", description="How the cache recognises the data file: its SHA-256 (content), or its path, "
        "size and mtime (stat: no read of a very large file at every start).",
    )
    cache_build: Literal["local_main", "main"] = Field(
        "local_main", description="Who tokenizes under a launcher: local rank 0 of each node (right for "
        "node-local and shared cache directories), or global rank 0 only (one build, for a shared one).",
    )
    cache_wait_s: float = Field(
        7200, gt=0, description="How long the other ranks wait for the cache build before giving up.",
    )
    num_proc: int | None = Field(
        None, ge=1, description="Tokenizer worker processes for a cache build (default: the cores this "
        "process may use, at most one per 1.5 GiB of available memory).",
    )

    @field_validator("train", "eval")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from finetune.data.files import DataError, data_files

        try:
            ds = data_files(v)
        except DataError as exc:
            raise ValueError(str(exc)) from None
        if ds.single and not ds.files[0].is_file():
            raise ValueError(f"file not found: {v}")
        return v


class TrainingConfig(Section):
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use `epochs`).")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    batch_size: int | Literal["auto"] = Field(
        4, description="Examples per device per micro-batch. `auto`: the most the memory plan says fit the device "
        "with memory_margin to spare (planned for the data's longest example), grad_accum derived so that a step "
        "holds examples_per_step.")
    examples_per_step: int | None = Field(
        None, ge=1, description="With batch_size: auto, the examples of one optimizer step over all ranks (what the "
        "learning rate is tuned for); grad_accum is derived from it and the batch size that fits.")
    tokens_per_batch: int | Literal["auto"] | None = Field(
        None, description="Micro-batches of up to this many tokens (padding included; packed: the row's "
        "length) instead of batch_size examples: many short examples or few long ones, so every step carries "
        "about the same tokens. At least max_length. Tokens per optimizer step: up to tokens_per_batch x "
        "grad_accum x ranks. Chat data (sft, distill). `auto`: the largest budget the memory plan says fits the "
        "device with memory_margin to spare, grad_accum derived so that a step holds tokens_per_step.")
    tokens_per_step: int | None = Field(
        None, ge=1, description="With tokens_per_batch: auto, the tokens of one optimizer step over all ranks "
        "(what the learning rate is tuned for); grad_accum is derived from it and the budget that fits.")
    memory_margin: float = Field(
        0.1, ge=0, lt=1, description="tokens_per_batch: auto and batch_size: auto leave this share of the device's "
        "memory unplanned.")
    eval_batch_size: int | None = Field(None, ge=1, description="Per-device eval batch (default: batch_size).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    warmup: float = Field(0.03, ge=0, description="Warmup: a fraction of total steps if < 1, else steps.")
    lr_scheduler: str = Field("cosine", description="transformers scheduler name (cosine, linear, constant...).")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    logging_steps: int = Field(10, ge=1, description="Log loss, learning rate and tokens/s every N steps.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (default: once per epoch).")
    save_steps: int | None = Field(None, ge=1, description="Checkpoint every N steps (default: once per epoch).")
    save_total_limit: int = Field(
        2, ge=2, description="Checkpoints kept (the best one too). At least 2, so that a kill while "
        "the newest is being written always leaves a complete one to resume from.",
    )
    preemption_grace_s: float = Field(
        120, gt=0, description="After SIGTERM/SIGUSR1: seconds to save a checkpoint before exiting anyway."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after N evaluations without eval-loss improvement."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    loss: Literal["chunked", "full"] = Field(
        "chunked", description="chunked: the LM head runs only at trained positions, a chunk of fp32 logits "
        "at a time (no [batch, seq, vocab] tensor; finetune.models.losses); full: the model's own loss over full logits.",
    )
    kernels: Literal["auto", "none", "liger"] = Field(
        "auto", description="GPU kernel library: liger = Liger's Triton kernels for RMSNorm, RoPE, SwiGLU and a "
        "fused linear cross-entropy (pip install 'finetune-kit[liger]'; Llama/Mistral/Qwen2/3/Gemma-family models). "
        "CUDA only: on CPU the run goes on without them, with a warning. auto: liger on CUDA when liger-kernel is "
        "installed and has kernels for the model's family, none otherwise (the run summary says which).",
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer (regional: one compiled graph shared by the layers; the "
        "first step compiles, later steps run faster). Not with ZeRO-3.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 on CPU."
    )
    group_by_length: bool = Field(
        True,
        description="Batch examples of similar length, then shuffle the batches (less padding; "
        "lengths still mixed across steps). 2.2x the tokens/s of random batches at equal eval loss "
        "in docs/benchmarks.md. false: a uniformly random batch order.",
    )
    group_window: int = Field(
        64, ge=1, description="group_by_length: examples are sorted by length within windows of this many batches."
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"], description="tensorboard, wandb, mlflow, or none."
    )
    ddp_timeout_s: int = Field(1800, ge=1, description="Timeout of every collective, in seconds.")

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be at least 1 or auto (got {v})")
        return v

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainingConfig:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("max_steps must be -1 (use epochs) or a positive number")
        return self


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names to adapt, or `all-linear`."
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head).",
    )


class QuantConfig(Section):
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    storage_dtype: Literal["auto", "uint8", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="bnb_4bit_quant_storage. auto = the compute dtype, required by ZeRO-3 "
        "to partition 4-bit weights (PEFT docs).",
    )


class EvalConfig(Section):
    after_train: bool = Field(False, description="Run `finetune eval` (base vs tuned) after training.")
    data: str | None = Field(None, description="Held-out chat JSONL for the post-training eval.")
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(16, ge=1)
    metrics: list[str] = Field(default_factory=lambda: ["exact_match", "f1", "rouge_l", "chrf"])
    max_examples: int | None = Field(None, ge=1)

    @field_validator("data")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"file not found: {v}")
        return v


# The settings of the built-in training methods: each method's module declares its section
# (finetune.methods); re-exported here, where the schema assembles them.
METHOD_SECTIONS = {m.name: m.section for m in methods.methods() if m.section is not None}


class TrainConfig(Section):
    model: str = Field(description="Base model: a local directory or a hub id.")
    adapter: Literal["lora", "qlora", "full"] = Field("lora", description="What is trained.")
    method: str = Field(
        methods.DEFAULT, json_schema_extra={"enum": methods.names()},
        description="The training method (finetune.methods): "
        + "; ".join(f"{m.name}: {m.description}" for m in methods.methods()) + ".")
    dpo: DPOSection = Field(default_factory=DPOSection)
    orpo: ORPOSection = Field(default_factory=ORPOSection)
    simpo: SimPOSection = Field(default_factory=SimPOSection)
    kto: KTOSection = Field(default_factory=KTOSection)
    distill: DistillSection = Field(default_factory=DistillSection, validate_default=True)
    grpo: GRPOSection = Field(default_factory=GRPOSection, validate_default=True)
    init_adapter: str | None = Field(
        None, description="A LoRA adapter directory to continue training (e.g. an SFT run's adapter/ before "
        "DPO, which then also serves as the reference).")
    data: DataConfig
    output_dir: str = Field(description="Run directory (adapter/, checkpoints/, metrics.jsonl, run.json).")
    seed: int = 42
    max_length: int = Field(2048, ge=8, description="Tokens per example after the chat template.")
    chat_template: str | None = Field(
        None, description="Jinja chat template, or a template the kit ships: `chatml`, or `chatml_tools` (ChatML "
        "that renders tools and tool calls, Qwen2.5/Hermes format). Default: the tokenizer's own, else `chatml`."
    )
    packing: bool | Literal["auto"] = Field(
        "auto", description="Pack each micro-batch's examples into one padding-free row (no attention across "
        "examples, the same loss). auto: on CUDA for chat-data methods, with the flash-attention the config names, "
        "else a Hub flash-attention kernel already in the local cache, else flex_attention; off on CPU. true: on any device (CPU: sdpa's block-diagonal mask).")
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quantization: QuantConfig = Field(default_factory=QuantConfig)
    deepspeed: str | None = Field(None, description="DeepSpeed JSON (configs/deepspeed/), or null.")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    resume: bool | Literal["latest_intact"] = Field(
        False, description="Continue from the latest checkpoint in output_dir (its checksums verified first; "
        "a damaged one is refused). `latest_intact`: fall back to the newest intact checkpoint instead.")
    overwrite: bool = Field(False, description="Allow training into an output_dir that holds a run.")
    force: bool = Field(False, description="Train even when `finetune plan` predicts the run does not fit.")
    trust_remote_code: bool = Field(False, description="Run code shipped with the model repository.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype the base weights are loaded in."
    )
    attn_implementation: str | None = Field(None, description="sdpa, eager, flash_attention_2...")

    @field_validator("init_adapter")
    @classmethod
    def _adapter_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        if info.data.get("adapter") == "full":
            raise ValueError("an adapter to continue needs adapter: lora or qlora, not full")
        if not (Path(v) / "adapter_config.json").is_file():
            raise ValueError(f"no adapter_config.json in {v} (expected a PEFT adapter directory, e.g. RUN/adapter)")
        return v

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        methods.get(v)  # ValueError naming the registered methods
        return v

    @field_validator(*METHOD_SECTIONS)
    @classmethod
    def _section_needs_method(cls, v: Section, info: ValidationInfo) -> Section:
        # A saved config (config.yaml of a run or a sweep trial) holds every key with its default:
        # only settings that differ from the defaults are a mistake under another method.
        name = info.field_name
        if info.data.get("method") != name and v != METHOD_SECTIONS[name]():
            raise ValueError(f"set, but method is {info.data.get('method')!r}; set method: {name} or remove this "
                             "section")
        return v

    @field_validator("*")
    @classmethod
    def _method_checks(cls, v: Any, info: ValidationInfo) -> Any:
        """What the run's method requires of this field (its record's `checks`)."""
        try:
            method = methods.get(info.data.get("method", methods.DEFAULT))
        except ValueError:
            return v  # reported on `method`
        check = method.checks.get(info.field_name)
        problem = check(v, info.data) if check else None
        if problem:
            key, message = problem
            raise PydanticCustomError("value_error", message, {"key": key} if key else {})
        return v

    @field_validator("packing")
    @classmethod
    def _packing_supported(cls, v: bool, info: ValidationInfo) -> bool:
        method = info.data.get("method", methods.DEFAULT)
        if v is True and method in methods.names() and not methods.get(method).packing:
            raise ValueError(f"not supported with method {method!r} (pairs are scored per sequence)")
        return v

    @model_validator(mode="after")
    def _completion_fits(self) -> TrainConfig:
        room = self.method_spec.completion_room(self)
        if room and room >= self.max_length:
            raise PydanticCustomError(
                "value_error", f"{room} leaves no room for a prompt under max_length ({self.max_length}): a row is "
                "prompt + completion", {"key": f"{self.method}.max_completion_length"})
        if self.method_spec.data == "prompts" and self.training.batch_size == "auto":
            raise PydanticCustomError(
                "value_error", f"method {self.method} generates its completions while training: its batch is "
                "completions, set it (a multiple of num_generations per optimizer step)", {"key": "training.batch_size"})
        return self

    @model_validator(mode="after")
    def _auto_batch_size(self) -> TrainConfig:
        t = self.training
        if t.examples_per_step is not None and t.batch_size != "auto":
            raise PydanticCustomError("value_error", "only used with batch_size: auto (a fixed batch's step is "
                                      "batch_size x grad_accum x ranks)", {"key": "training.examples_per_step"})
        if t.batch_size == "auto":
            if t.examples_per_step is None:
                raise PydanticCustomError(
                    "value_error", "batch_size: auto needs training.examples_per_step, the examples of one optimizer "
                    "step (the batch size then depends on the device; the step must not)",
                    {"key": "training.examples_per_step"})
            if t.tokens_per_batch is not None:
                raise PydanticCustomError("value_error", "batch_size: auto with tokens_per_batch: a token budget "
                                          "batches by tokens, not examples; set one of them",
                                          {"key": "training.batch_size"})
        return self

    @model_validator(mode="after")
    def _token_budget_fits(self) -> TrainConfig:
        budget, per_step = self.training.tokens_per_batch, self.training.tokens_per_step
        if per_step is not None and budget != "auto":
            raise PydanticCustomError("value_error", "only used with tokens_per_batch: auto (a fixed budget's step is "
                                      "tokens_per_batch x grad_accum x ranks)", {"key": "training.tokens_per_step"})
        if budget is None:
            return self
        if budget == "auto":
            if per_step is None:
                raise PydanticCustomError(
                    "value_error", "tokens_per_batch: auto needs training.tokens_per_step, the tokens of one optimizer "
                    "step (the budget then depends on the device; the step must not)", {"key": "training.tokens_per_step"})
        elif budget < self.max_length:
            raise PydanticCustomError("value_error", f"{budget} is less than max_length ({self.max_length}): an example "
                                      "of max_length tokens must fit in one micro-batch", {"key": "training.tokens_per_batch"})
        if self.method_spec.data != "chat":
            raise PydanticCustomError("value_error", f"method {self.method} reads {self.method_spec.data}, which is "
                                      "batched by training.batch_size (a budget batches chat data)",
                                      {"key": "training.tokens_per_batch"})
        return self

    @field_validator("deepspeed")
    @classmethod
    def _ds_exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"file not found: {v}")
        return v

    @field_validator("model")
    @classmethod
    def _model_present(cls, v: str) -> str:
        return model_present(v)

    @property
    def packed(self) -> bool:
        """Whether batches are packed: `packing: true`, or `auto` once a run has decided it for its
        device (finetune.training.launch.packing_settings); an undecided `auto` counts as off."""
        return self.packing is True

    @property
    def method_spec(self) -> methods.Method:
        """The record of this run's training method (finetune.methods)."""
        return methods.get(self.method)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["lora.r=16", "training.max_steps=20"]`` into a nested dict (kitcore.overrides' grammar,
    the one `data-prep run` reads too); every bad item is reported at once."""
    try:
        return kitcore_overrides.parse_overrides(items)
    except kitcore_overrides.OverrideError as exc:
        raise ConfigError("<command line>", exc.problems) from None


def apply_overrides(raw: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """`raw` (a loaded YAML mapping) with `key=value` items laid over it; `raw` is not modified."""
    return _merge(raw, parse_overrides(items))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    try:
        return kitcore_overrides.merge(base, extra)
    except kitcore_overrides.OverrideError as exc:
        raise ConfigError("<command line>", exc.problems) from None


def resolve_yaml_path(value: str, yaml_dir: Path) -> str:
    """A relative path written in a YAML file in `yaml_dir`: the absolute path next to that file
    when something exists there; else `value` unchanged, i.e. relative to the current directory
    (backward compatibility: configs were once read from the working directory). Absolute paths
    and hub ids come back as written."""
    if not value or Path(value).is_absolute():
        return value
    candidate = yaml_dir / value
    found = candidate.exists() or (glob.has_magic(value) and glob.glob(str(candidate)))
    return os.path.abspath(candidate) if found else value


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> None:
    """The YAML's own paths, read from its directory (see resolve_yaml_path); overrides are merged
    after this, so theirs stay relative to the current directory."""

    def fix(container: dict[str, Any], key: str) -> None:
        v = container.get(key)
        if isinstance(v, str):
            container[key] = resolve_yaml_path(v, base_dir)

    for key in ("deepspeed", "model", "init_adapter"):
        fix(raw, key)
    sections = [("data", ("train", "eval")), ("eval", ("data",))]
    sections += [(m.name, m.path_keys) for m in methods.methods() if m.path_keys]
    for section, keys in sections:
        if isinstance(raw.get(section), dict):
            for key in keys:
                fix(raw[section], key)


def validation_problems(err: ValidationError) -> list[tuple[str, str]]:
    """pydantic's errors as (dotted key, message) pairs, the way ConfigError lists them."""
    import re

    # A value that may be one of several types (`int | "auto"`) fails once per member, each with the
    # member's tag in its location: the key is the field's, the messages are joined with "or".
    member = re.compile(r"^(function-.*|(constrained-)?(int|str|float|bool|none)|(literal|list|dict|tuple)\[.*\])$")
    problems: list[tuple[str, str]] = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not member.match(str(p))]
        if (e.get("ctx") or {}).get("key"):  # a section's validator naming the key inside it
            loc.append(str(e["ctx"]["key"]))
        key = ".".join(loc) or "<root>"
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `finetune train --help-config`)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and e["type"] not in ("value_error",) and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
        if problems and problems[-1][0] == key and key != "<root>" and e["type"] != "extra_forbidden":
            problems[-1] = (key, f"{problems[-1][1].split(' (got ')[0]} or {msg[0].lower()}{msg[1:]}")
        else:
            problems.append((key, msg))
    return problems


def load_config(path: str | Path | None, overrides: list[str] | None = None, **extra: Any) -> TrainConfig:
    """Load a YAML recipe, apply dotted overrides, validate, and report every problem at once."""
    raw: dict[str, Any] = {}
    source = str(path) if path else "<overrides>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(source, [("<file>", f"config file not found: {p}")])
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark else "<file>"
            raise ConfigError(source, [(where, f"not valid YAML: {exc}")]) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(source, [("<root>", "a config must be a mapping of keys to values")])
        raw = loaded
        _resolve_paths(raw, p.parent)
    raw = apply_overrides(raw, overrides or [])
    raw = _merge(raw, extra)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(source, validation_problems(err)) from None


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _type_name(ann: Any) -> str:
    from typing import get_args, get_origin

    if get_origin(ann) is Literal:
        return " / ".join(str(a) for a in get_args(ann))
    args = get_args(ann)
    if args:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else ""
        )
    return getattr(ann, "__name__", str(ann).replace("typing.", ""))


def describe_schema(model: type[BaseModel] = TrainConfig, prefix: str = "", markdown: bool = False) -> list[str]:
    """One line per key: dotted name, type, default, description (drives `--help-config` and
    docs/configuration.md)."""
    lines = []
    if markdown and not prefix:
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        ann = field.annotation
        key = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.extend(describe_schema(ann, key + ".", markdown))
            continue
        # The factory itself, not get_default(call_default_factory=True): pydantic 2.10 refuses that call
        # without validated data, even for a factory that takes none.
        if field.is_required():
            default = "required"
        else:
            default = repr(field.default_factory() if field.default_factory is not None else field.default)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        tname = " / ".join(map(str, extra["enum"])) if "enum" in extra else _type_name(ann)
        if markdown:
            lines.append(f"| `{key}` | {tname} | `{default}` | {field.description or ''} |")
        else:
            lines.append(f"{key:38s} {tname:28.28s} {default:14.14s} {field.description or ''}")
    return lines
