"""The recipe schema: every setting of a build, validated before any work.

`data-prep run RECIPE.yaml key=value ...` loads YAML, applies dotted overrides, and reports every
problem at once (unknown keys, wrong types, missing files) with dotted key names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data_prep import storage
from data_prep.readers.text import DEFAULT_SPEAKERS
from data_prep.steps.filters import ChatThresholds, GopherThresholds
from data_prep.steps.redact import PII_TYPES
from kitcore import overrides as kitcore_overrides

_GOPHER = GopherThresholds()
_CHAT = ChatThresholds()

Format = Literal["auto", "html", "text", "transcript", "csv", "tsv", "xlsx", "json", "jsonl"]


class _KeyProblems(ValueError):
    """Problems found across keys by a model validator, each already starting with its dotted key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ColumnsConfig(_Strict):
    """Column names for annotated sources; unset means "first default name found in the row".

    `user`, `assistant` and `join` are read by chat (SFT) builds; `prompt`, `chosen`, `rejected`
    (and for `task: kto` `completion`, `label`) by preference builds; `context` and `system` by both.
    A prompts build reads the chat columns but `join`; its `assistant` column (the reference answer)
    may be missing or empty, and every column it does not map is kept for the reward functions.
    """

    user: str | None = Field(None, description="column with the question / prompt (user turn)")
    assistant: str | None = Field(None, description="column with the answer (assistant turn)")
    context: str | None = Field(None, description="column with a passage prepended to the user turn")
    join: str | None = Field(
        None, description="column naming a page (file name, id or URL) to use as context"
    )
    system: str | None = Field(None, description="column with a per-row system prompt")
    tools: str | None = Field(None, description="column with the tools a row declares (a JSON list of function "
                              "schemas, OpenAI's {type, function} or bare {name, parameters})")
    tool_calls: str | None = Field(None, description="column with the call(s) the assistant makes: JSON "
                                   "{name, arguments} or a list of them (then the answer column may be empty)")
    prompt: str | None = Field(None, description="preference: column with the prompt (text or messages)")
    chosen: str | None = Field(None, description="preference: column with the preferred answer")
    rejected: str | None = Field(None, description="preference: column with the dispreferred answer")
    completion: str | None = Field(None, description="task kto: column with the unpaired answer")
    label: str | None = Field(None, description="task kto: column saying whether that answer is desirable")


SFT_COLUMNS = ("user", "assistant", "join", "tools", "tool_calls")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
UNPAIRED_COLUMNS = ("completion", "label")


class SourceConfig(_Strict):
    path: str = Field(description="file, directory (walked recursively) or glob")
    format: Format = "auto"
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    system: str | None = Field(None, description="system prompt for this source's examples")

    @field_validator("path")
    @classmethod
    def _exists(cls, path: str) -> str:
        try:
            found = storage.exists(path)
        except ImportError as err:  # s3:// without s3fs, ...: fsspec names the package
            raise ValueError(str(err)) from None
        if not found:
            raise ValueError(f"no such file, directory or glob match: {path}")
        return path


class ExtractionConfig(_Strict):
    fast: bool = True
    favor_precision: bool = True
    include_tables: bool = True
    dl_requires_question: bool = Field(
        True, description="<dl> pairs count as Q/A only if <dt> is a question ('?', '？', '؟', ...)"
    )


class CleanConfig(_Strict):
    fix_unicode: bool = True


class RedactConfig(_Strict):
    enabled: bool = True
    types: list[Literal["email", "phone", "ip", "card"]] = Field(default_factory=lambda: list(PII_TYPES))


class QualityConfig(_Strict):
    """Gopher rules for long scraped text: context pages and transcripts of at least `min_words` words.

    Shorter texts are left to the per-field chat checks. A context page failing a rule is only
    counted (`context_action: warn`) by default: an annotator chose that page on purpose.
    """

    enabled: bool = True
    context_action: Literal["warn", "reject"] = "warn"
    min_words: int = _GOPHER.min_words
    max_words: int = _GOPHER.max_words
    min_mean_word_length: float = _GOPHER.min_mean_word_length
    max_mean_word_length: float = _GOPHER.max_mean_word_length
    max_symbol_word_ratio: float = _GOPHER.max_symbol_word_ratio
    max_bullet_lines_ratio: float = _GOPHER.max_bullet_lines_ratio
    max_ellipsis_lines_ratio: float = _GOPHER.max_ellipsis_lines_ratio
    min_alpha_words_ratio: float = _GOPHER.min_alpha_words_ratio
    min_stop_words: int = _GOPHER.min_stop_words
    max_duplicate_line_fraction: float = _GOPHER.max_duplicate_line_fraction
    max_top_2gram_char_fraction: float = _GOPHER.max_top_2gram_char_fraction
    max_dup_5gram_char_fraction: float = _GOPHER.max_dup_5gram_char_fraction


class ChatFilterConfig(_Strict):
    min_user_chars: int = _CHAT.min_user_chars
    min_assistant_chars: int = _CHAT.min_assistant_chars
    max_message_words: int = _CHAT.max_message_words


class DedupConfig(_Strict):
    exact: bool = True
    near: bool = True
    threshold: float = Field(0.8, gt=0, le=1)
    near_action: Literal["drop", "group"] = Field(
        "drop", description="drop near-duplicates, or keep them all in the split of the first one"
    )
    num_perm: int = Field(128, ge=16)
    shingle_size: int = Field(5, ge=1)


class SplitConfig(_Strict):
    val_fraction: float = Field(0.05, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _sum(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1")
        return self


class ContextConfig(_Strict):
    budget: int = Field(512, ge=1, description="max words (or tokens with a tokenizer) of a joined page")


class TranscriptConfig(_Strict):
    speakers: dict[str, Literal["system", "user", "assistant"]] = Field(
        default_factory=lambda: dict(DEFAULT_SPEAKERS), description="speaker label (lowercase) -> role"
    )


class RayConfig(_Strict):
    """Settings of `engine: ray` (ignored by the local engine)."""

    address: str | None = Field(
        None,
        description="cluster to run on: unset uses RAY_ADDRESS (set for `ray job submit` drivers) or "
        "else starts Ray in this process (or uses the one this process already started); `auto` joins the "
        "cluster of `ray start` on this machine, HOST:PORT a cluster's head, `ray://HOST:10001` Ray Client",
    )
    parallelism: int | None = Field(
        None,
        ge=1,
        description="blocks, shuffle partitions and concurrent tasks (default: the cluster's CPUs)",
    )
    wait_for_nodes: int | None = Field(
        None,
        ge=1,
        description="wait (up to 10 minutes) until the cluster has this many nodes before planning: "
        "a Slurm or KubeRay cluster whose workers are still joining",
    )
    shard_records: int = Field(50_000, ge=1, description="about this many lines per output shard")
    shuffle: Literal["sort", "hash"] = Field(
        "sort",
        description="Ray Data's shuffle for the groupbys: sort (tasks only; far less start-up on "
        "small and medium builds) or hash (aggregator actors)",
    )

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and v != "auto" and ":" not in v:
            raise ValueError(f"expected auto, ray://HOST:10001 or HOST:PORT, got {v!r}")
        return v


class Recipe(_Strict):
    sources: list[SourceConfig] = Field(min_length=1)
    output_dir: str
    task: Literal["sft", "preference", "kto", "prompts"] = Field(
        "sft",
        description="sft: chat examples; preference: prompt/chosen/rejected pairs (DPO, ORPO, SimPO); "
        "kto: pairs and unpaired prompt/completion/label examples; prompts: prompt records for GRPO (the answer "
        "optional, every other column kept for the reward functions). All but sft split by prompt",
    )
    overwrite: bool = False
    provenance: bool = True
    system: str | None = None
    engine: Literal["local", "ray"] = Field(
        "local",
        description="local: processes on this machine (`workers`); ray: a Ray cluster (the `ray` extra)",
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    workers: int = Field(1, ge=1)
    tokenizer: str | None = Field(None, description="local tokenizer dir for context budget and length stats")
    extraction: ExtractionConfig = Field(default_factory=ExtractionConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    redact: RedactConfig = Field(default_factory=RedactConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    chat_filter: ChatFilterConfig = Field(default_factory=ChatFilterConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    context: ContextConfig = Field(default_factory=ContextConfig)
    transcript: TranscriptConfig = Field(default_factory=TranscriptConfig)

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_exists(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).is_dir():
            raise ValueError(f"no such directory: {path}")
        return path

    @model_validator(mode="after")
    def _task(self) -> Recipe:
        sft = self.task == "sft"
        problems = []
        for i, src in enumerate(self.sources):
            for name in SFT_COLUMNS + PAIR_COLUMNS + UNPAIRED_COLUMNS:
                if getattr(src.columns, name) is None:
                    continue
                key = f"sources.{i}.columns.{name}"
                if self.task == "prompts":
                    if name == "join":
                        problems.append(f"{key}: a prompts build reads no pages: put a passage in a context column")
                    elif name not in SFT_COLUMNS:
                        problems.append(f"{key}: a preference column; a prompts build reads the chat (SFT) columns "
                                        "user (the prompt) and assistant (its reference answer, optional)")
                elif sft and name not in SFT_COLUMNS:
                    problems.append(f"{key}: a preference column; set task: preference (or kto)")
                elif not sft and name in SFT_COLUMNS:
                    problems.append(f"{key}: a chat (SFT) column; a {self.task} build reads "
                                    + ("no pages: put a passage in a context column" if name == "join"
                                       else "prompt/chosen/rejected columns"))
                elif self.task == "preference" and name in UNPAIRED_COLUMNS:
                    problems.append(f"{key}: an unpaired (KTO) column; set task: kto")
        if not sft:
            # near-similar prompts join one split group; see data_prep.preference for why none is dropped
            if "near_action" in self.dedup.model_fields_set and self.dedup.near_action == "drop":
                problems.append(f"dedup.near_action: a {self.task} build groups near-similar prompts "
                                "into one split and drops none; leave it unset or set group")
            self.dedup.near_action = "group"
        if problems:
            raise _KeyProblems(problems)
        return self

    @model_validator(mode="after")
    def _engine_paths(self) -> Recipe:
        # the local engine writes through temp files renamed into place, which object stores lack
        if self.engine == "local" and storage.is_url(self.output_dir):
            raise ValueError(
                f"output_dir {self.output_dir}: the local engine writes to a local or shared path; "
                "use engine: ray for a URL"
            )
        # fsspec's memory:// lives inside one process: Ray's workers would find nothing there
        if self.engine == "ray":
            for p in [s.path for s in self.sources] + [self.output_dir]:
                if p.startswith("memory://"):
                    raise ValueError(
                        f"{p}: memory:// is not shared with Ray's worker processes; use file:// or s3://"
                    )
        return self


class RecipeError(ValueError):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid recipe:\n" + "\n".join(f"  - {p}" for p in problems))


def format_errors(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        if isinstance(e.get("ctx", {}).get("error"), _KeyProblems):
            out += e["ctx"]["error"].problems
            continue
        key = ".".join(str(p) for p in e["loc"]) or "(recipe)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against configs/data/*.yaml)"
        out.append(f"{key}: {msg}")
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b=value` sets data['a']['b'] and `sources.0.path=...` an item of a list, in kitcore.overrides'
    grammar (the one `finetune train` reads too); every bad item is reported at once."""
    try:
        return kitcore_overrides.merge(data, kitcore_overrides.parse_overrides(overrides))
    except kitcore_overrides.OverrideError as err:
        raise RecipeError([f"{key}: {msg}" for key, msg in err.problems]) from None


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe; relative source paths are taken relative to the current directory."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as err:
        raise RecipeError([f"{path}: {err.strerror}"]) from err
    except yaml.YAMLError as err:
        raise RecipeError([f"{path}: invalid YAML: {err}"]) from err
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: a recipe is a mapping of keys, got {type(data).__name__}"])
    data = apply_overrides(data, overrides or [])
    return validate_recipe(data)


def validate_recipe(data: dict[str, Any]) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_errors(err)) from None
