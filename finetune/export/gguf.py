"""`finetune export`: a trained model as one GGUF file for llama.cpp, Ollama and LM Studio.

    finetune export --adapter runs/x/adapter --format gguf --quant q8_0 --output exported/
    ollama create my-model -f exported/Modelfile

With `--adapter`, the adapter is first merged into its base exactly as `finetune merge` does (a
QLoRA adapter into the dequantized 4-bit base it was trained on), into a temporary directory, and
that merge is converted. `--adapter-only` writes the adapter alone in llama.cpp's LoRA layout, for
runtimes that apply it on top of a base GGUF. The file carries the architecture's hyper-parameters,
the tokenizer and the chat template the adapter was trained with, so a runtime formats prompts as
training did.

The file format, tensor names and quantizers are the `gguf` package's (maintained with llama.cpp);
what is decided here is only which Hugging Face tensor becomes which GGUF tensor, in what type.
Tensors are converted one at a time from the safetensors files (one tensor in memory, not the
model), and the file appears under its name only once complete.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import ExportError
from finetune.export.ollama import end_of_turn, write_modelfile
from kitcore.integrity import require_intact, update_manifest

logger = logging.getLogger(__name__)

__all__ = ["export_gguf", "ExportResult", "SUPPORTED_ARCHITECTURES", "MODEL_QUANTS", "ADAPTER_QUANTS"]

# Hugging Face class -> llama.cpp architecture. Mistral runs as "llama" in llama.cpp (as its own
# converter does); Qwen2 differs by its q/k/v biases and by rotating halves (no q/k permutation).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
MODEL_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
# llama.cpp applies adapters in these types (its own LoRA converter offers the same).
ADAPTER_QUANTS = ("f32", "f16", "bf16", "q8_0")

# The split regexes of the byte-level BPE tokenizers this exporter knows, as their tokenizer.json
# spells them, and the name llama.cpp gives each pre-tokenizer (`tokenizer.ggml.pre`).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}

# Values quantized at once: bounds the float32 working copies of a large tensor (a 128k-vocabulary
# embedding is 4 GB in float32; the numpy quantizers make a few temporaries of their input's size)
# to 16 MB each.
_CHUNK_ELEMENTS = 4 * 1024 * 1024


@dataclass
class ExportResult:
    gguf: Path
    modelfile: Path
    quant: str
    tensors: int


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
def export_gguf(
    output: str | Path,
    *,
    adapter: str | Path | None = None,
    model: str | Path | None = None,
    quant: str = "f16",
    adapter_only: bool = False,
    dtype: str = "auto",
    base_gguf: str | None = None,
    progress: bool = True,
) -> ExportResult:
    """Write `output/model-<quant>.gguf` (or `adapter-<quant>.gguf`) and `output/Modelfile`.

    `adapter`: a run's adapter directory; merged into its base first (`model` then overrides the
    base it names, as in `finetune merge`), or, with `adapter_only`, converted alone.
    `model`: without `adapter`, a Hugging Face model directory (a `finetune merge` output).
    `dtype`: the merge's dtype (default auto: float32 on CPU; bfloat16 halves a large merge's memory).
    `base_gguf`: for `adapter_only`, the base GGUF the Modelfile's FROM names (default: the base
    model directory, which Ollama converts itself).
    """
    _check_quant(quant, adapter_only)
    if adapter is None and model is None:
        raise ExportError("export needs --adapter RUN/adapter or --model MODEL_DIR")
    if adapter_only and adapter is None:
        raise ExportError("--adapter-only exports an adapter: pass --adapter RUN/adapter")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if adapter_only:
        return _export_adapter(Path(adapter), output, quant, base_model=model, base_gguf=base_gguf,
                               progress=progress)
    if adapter is None:
        return _export_model(_model_dir(model), output, quant, progress=progress)
    from finetune.inference.load import merge_adapter

    # Next to the output, not in /tmp: a 70B merge needs its disk space, and /tmp is often small.
    with tempfile.TemporaryDirectory(prefix=".merge-", dir=output) as tmp:
        merged = merge_adapter(adapter, Path(tmp) / "merged", dtype=dtype,
                               base_model=str(model) if model else None)
        import gc

        gc.collect()  # the merged model is on disk now; PEFT's reference cycles would keep it in memory
        return _export_model(merged, output, quant, run_dir=Path(adapter).resolve().parent, progress=progress)


def _check_quant(quant: str, adapter_only: bool) -> None:
    allowed = ADAPTER_QUANTS if adapter_only else MODEL_QUANTS
    if quant not in allowed:
        what = "an adapter" if adapter_only else "a model"
        raise ExportError(f"--quant {quant} is not supported for {what}; supported: {', '.join(allowed)}")


def _model_dir(model: str | Path) -> Path:
    d = Path(model)
    if not (d / "config.json").is_file():
        if (d / "adapter_config.json").is_file():
            raise ExportError(f"{d} is an adapter, not a model: pass it as --adapter")
        raise ExportError(f"{d} is not a model directory (no config.json): pass a `finetune merge` output "
                          "or another Hugging Face model directory as --model")
    require_intact(d, "model", note=logging.WARNING if (d / "finetune.json").is_file() else logging.DEBUG)
    return d


def _read_config(model_dir: Path) -> dict[str, Any]:
    cfg = json.loads((model_dir / "config.json").read_text())
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"{model_dir}/config.json: architecture {arch} cannot be exported to GGUF; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if cfg.get("use_sliding_window"):
        raise ExportError(f"{model_dir}/config.json: use_sliding_window=true is not supported by this exporter "
                          "(llama.cpp's qwen2 architecture attends over the whole context)")
    return cfg


# ----------------------------------------------------------------------------------------------
# the merged model
# ----------------------------------------------------------------------------------------------
def _export_model(model_dir: Path, output: Path, quant: str, *, run_dir: Path | None = None,
                  progress: bool = True) -> ExportResult:
    import gguf

    cfg = _read_config(model_dir)
    arch = SUPPORTED_ARCHITECTURES[cfg["architectures"][0]]
    plan = _model_tensor_plan(model_dir, cfg, arch, quant)
    tokenizer = _load_tokenizer(model_dir)
    n_vocab = next(t.shape[0] for t in plan if t.name == "token_embd.weight")

    def metadata(w) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(model_dir.name if run_dir is None else run_dir.name)
        _add_hparams(w, cfg, n_vocab)
        _add_vocab(w, tokenizer, model_dir, n_vocab)
        _add_file_type(w, quant)

    path = output / f"model-{quant}.gguf"
    _write_gguf(path, arch, metadata, plan, progress=progress)
    modelfile = write_modelfile(output, path.name, tokenizer, run_dir=run_dir)
    update_manifest(output, [path.name, modelfile.name])  # `finetune verify` checks them later
    logger.info("GGUF -> %s (%d tensors, %s); Ollama: ollama create NAME -f %s", path, len(plan), quant, modelfile)
    return ExportResult(path, modelfile, quant, len(plan))


@dataclass
class _Tensor:
    """One tensor of the output: where it comes from, its GGUF name, shape and type."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    file: Path | None
    key: str | None
    permute_heads: int | None = None  # llama: reorder q/k rows for llama.cpp's rotary layout
    transpose: bool = False
    data: Any = None  # a tensor computed here (rope_freqs), not read from a file


def _safetensors_index(model_dir: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file that holds it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / v for k, v in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir} holds no .safetensors weights; save the model with "
                          "save_pretrained(safe_serialization=True) (what `finetune merge` does)")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            out.update(dict.fromkeys(st.keys(), f))
    return out


def _head_dim(cfg: dict[str, Any]) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _model_tensor_plan(model_dir: Path, cfg: dict[str, Any], arch: str, quant: str) -> list[_Tensor]:
    import gguf
    from safetensors import safe_open

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, cfg["num_hidden_layers"])
    index = _safetensors_index(model_dir)
    tied = cfg.get("tie_word_embeddings", False)
    plan, unmapped = [], []
    for key, file in index.items():
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue  # recomputed by the runtime / the same tensor as the embedding
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            unmapped.append(key)
            continue
        with safe_open(str(file), framework="pt") as st:
            shape = tuple(st.get_slice(key).get_shape())
        heads = None
        if arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = cfg["num_attention_heads"] if ".attn_q." in name else cfg["num_key_value_heads"]
        plan.append(_Tensor(name, shape, _tensor_qtype(name, shape, quant), file, key, heads))
    if unmapped:
        raise ExportError(f"{model_dir}: {len(unmapped)} tensor(s) have no GGUF name for this architecture, e.g. "
                          f"{', '.join(unmapped[:3])}; is the checkpoint a plain {cfg['architectures'][0]}?")
    if not any(t.name == "token_embd.weight" for t in plan):
        raise ExportError(f"{model_dir}: no token embedding (model.embed_tokens.weight) in the safetensors files")
    freqs = _llama3_rope_factors(cfg)
    if freqs is not None:
        plan.append(_Tensor("rope_freqs.weight", tuple(freqs.shape), gguf.GGMLQuantizationType.F32, None, None,
                            data=freqs))
    return plan


def _tensor_qtype(name: str, shape: tuple[int, ...], quant: str):
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return Q.F32  # norms and biases: a few KB, and llama.cpp computes them in float32
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]
    if qtype == Q.Q4_0 and name == "output.weight":
        # The output projection is the most quantization-sensitive matrix; llama.cpp's own Q4_0
        # recipe keeps it at 6 bits (a K-quant the numpy quantizers cannot write), so 8 bits here.
        qtype = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        logger.info("%s: rows of %d do not split into %s blocks of %d; stored as F16", name, shape[-1],
                    qtype.name, block)
        return Q.F16
    return qtype


def _llama3_rope_factors(cfg: dict[str, Any]):
    """llama.cpp's `rope_freqs` tensor for Llama 3.1-style frequency scaling (None otherwise): per
    rotary dimension, the factor it divides the base frequency by."""
    rope = _rope_params(cfg)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    import numpy as np

    base, dim = rope["rope_theta"], _head_dim(cfg)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_ctx / high, 1.0,
                       np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 writes `rope_parameters` (theta included); older configs `rope_theta` + `rope_scaling`.
    rope = {"rope_theta": cfg.get("rope_theta", 10000.0), **(cfg.get("rope_scaling") or {})}
    rope.update(cfg.get("rope_parameters") or {})
    return rope


def _add_hparams(w, cfg: dict[str, Any], n_vocab: int) -> None:
    import gguf

    head_dim = _head_dim(cfg)
    w.add_vocab_size(n_vocab)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = _rope_params(cfg)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rtype == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings", cfg["max_position_embeddings"])))
    elif rtype not in ("default", "llama3"):  # llama3: the rope_freqs tensor carries it
        raise ExportError(f"config.json: rope scaling {rtype!r} is not supported by this exporter; supported: "
                          "default, linear, yarn, llama3")
    if cfg.get("sliding_window") and cfg["architectures"][0] == "MistralForCausalLM":
        logger.warning("config.json: sliding_window=%s is not kept: llama.cpp runs Mistral with full attention "
                       "(the same as the model within %s tokens)", cfg["sliding_window"], cfg["sliding_window"])


def _add_file_type(w, quant: str) -> None:
    import gguf

    F = gguf.LlamaFileType
    w.add_file_type({"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
                     "q4_0": F.MOSTLY_Q4_0}[quant])
    if quant in ("q8_0", "q4_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ----------------------------------------------------------------------------------------------
# the tokenizer
# ----------------------------------------------------------------------------------------------
def _load_tokenizer(model_dir: Path):
    # AutoTokenizer as saved, not finetune.models.loading.load_tokenizer: that one installs a ChatML
    # template (and its tokens) when the directory has none, which would change the vocabulary.
    from transformers import AutoTokenizer

    if not (model_dir / "tokenizer.json").is_file():
        raise ExportError(f"{model_dir} has no tokenizer.json; the GGUF needs the tokenizer the model was "
                          "trained with (save it with tokenizer.save_pretrained into that directory)")
    return AutoTokenizer.from_pretrained(str(model_dir))


def _add_vocab(w, tok, model_dir: Path, n_vocab: int) -> None:
    """The vocabulary as llama.cpp reads it: byte-level BPE ("gpt2": tokens, merges, pre-tokenizer
    name) or SentencePiece-style BPE with byte fallback ("llama": tokens, scores, token types)."""
    import gguf

    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    bpe = tj.get("model", {})
    if bpe.get("type") != "BPE":
        raise ExportError(f"{model_dir}/tokenizer.json: a {bpe.get('type')} tokenizer cannot be exported; supported: "
                          "byte-level BPE (Llama 3, Qwen2) and SentencePiece BPE with byte fallback (Llama 2, Mistral)")
    spm = bool(bpe.get("byte_fallback"))
    if not spm and (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(f"{model_dir}/tokenizer.json: a BPE tokenizer without a ByteLevel decoder or byte "
                          "fallback is neither GPT-2 style nor SentencePiece style; it cannot be exported")
    vocab = tok.get_vocab()
    if len(vocab) > n_vocab:
        raise ExportError(f"{model_dir}: the tokenizer has {len(vocab)} tokens but the embedding only "
                          f"{n_vocab} rows; resize the model's embeddings to the tokenizer before exporting")
    id_to_token = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    # SentencePiece ranks merges by the score of the piece they make; llama.cpp's SPM tokenizer
    # does the same, so a piece's score is minus the rank of the first merge that makes it.
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), r)
    T = gguf.TokenType
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        t = id_to_token.get(i)
        score = 0.0
        if t is None:
            t, typ = f"[PAD{i}]", T.UNUSED  # embedding rows past the tokenizer (padded vocabularies)
        elif i == tok.unk_token_id:
            typ = T.UNKNOWN
        elif spm and re.fullmatch(r"<0x[0-9A-F]{2}>", t):
            typ = T.BYTE  # the byte-fallback pieces, even when a tokenizer lists them as added tokens
        elif i in added:
            typ = T.CONTROL if added[i].special else T.USER_DEFINED
        else:
            typ = T.NORMAL
            score = -float(rank.get(t, len(merges) if len(t) > 1 else 0))
        tokens.append(t)
        types.append(typ)
        scores.append(score)
    if spm:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_scores(scores)
        w.add_add_space_prefix(_adds_space_prefix(tj))
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_pre_tokenizer_name(tj, model_dir))
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{kind}_token_id")
        if tid is not None:
            getattr(w, f"add_{kind}_token_id")(tid)
    # What the tokenizer adds around plain text, read from its behaviour rather than its config.
    probe = tok("a")["input_ids"]
    w.add_add_bos_token(tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id])
    w.add_add_eos_token(tok.eos_token_id is not None and probe[-1:] == [tok.eos_token_id])
    template = getattr(tok, "chat_template", None)
    if template:
        w.add_chat_template(template)
        eot = end_of_turn(tok)
        if eot is not None:
            # llama.cpp stops generating at the end-of-turn token, which is not always EOS.
            w.add_eot_token_id(tok.convert_tokens_to_ids(eot))
    else:
        logger.warning("%s: the tokenizer has no chat template; a runtime will apply its own default", model_dir)


def _pre_tokenizer_name(tj: dict[str, Any], model_dir: Path) -> str:
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # ByteLevel's own split is GPT-2's regex
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    splits = [p for p in parts if p.get("type") == "Split"]
    if len(splits) == 1 and len(parts) == 2 and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex"):
        pattern = splits[0].get("pattern", {}).get("Regex")
        if pattern in _PRE_TOKENIZERS:
            return _PRE_TOKENIZERS[pattern]
    raise ExportError(f"{model_dir}/tokenizer.json: its pre-tokenizer is not one llama.cpp is known to reproduce "
                      "here; supported: GPT-2 (ByteLevel), Llama 3 and Qwen2 split patterns")


def _adds_space_prefix(tj: dict[str, Any]) -> bool:
    """Whether the SentencePiece tokenizer puts "▁" before the text (Llama 2, Mistral do)."""
    def walk(node):
        if isinstance(node, dict):
            yield node
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    for node in walk([tj.get("normalizer"), tj.get("pre_tokenizer")]):
        if node.get("type") == "Prepend" and node.get("prepend") == "▁":
            return True
        if node.get("type") == "Metaspace":
            return node.get("prepend_scheme", "always") != "never" and node.get("add_prefix_space", True)
    return False


# ----------------------------------------------------------------------------------------------
# the adapter alone
# ----------------------------------------------------------------------------------------------
def _export_adapter(adapter_dir: Path, output: Path, quant: str, *, base_model: str | Path | None,
                    base_gguf: str | None, progress: bool = True) -> ExportResult:
    """llama.cpp's LoRA layout: `general.type=adapter`, `adapter.type=lora`, `adapter.lora.alpha`, and
    per adapted weight `<gguf name>.lora_a` (r x in) and `.lora_b` (out x r); llama.cpp scales the
    product by alpha / r, where r is read from each lora_b."""
    import gguf
    from safetensors import safe_open

    from finetune.inference.load import read_adapter_info

    info = read_adapter_info(adapter_dir)
    base = Path(base_model or info.get("base_model_name_or_path") or "")
    if not (base / "config.json").is_file():
        raise ExportError(f"the adapter's base model {base} is not a local directory; pass --model BASE_DIR "
                          "(its config.json gives the architecture the adapter is applied to)")
    cfg = _read_config(base)
    arch = SUPPORTED_ARCHITECTURES[cfg["architectures"][0]]
    alpha = _adapter_alpha(info, adapter_dir)
    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        raise ExportError(f"{adapter_dir} has no adapter_model.safetensors")
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, cfg["num_hidden_layers"])
    plan, full = [], []
    with safe_open(str(file), framework="pt") as st:
        keys = sorted(st.keys())
        shapes = {k: tuple(st.get_slice(k).get_shape()) for k in keys}
    for key in keys:
        if key.endswith(".base_layer.weight"):
            # PEFT saves the base embedding next to an embedding LoRA; it is the base's (the LoRA
            # shapes would not fit a resized one), so the base GGUF already has it.
            continue
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_(embedding_)?([AB])(?:\.weight)?", key)
        if m is None:
            full.append(key)
            continue
        module, embedding, ab = m.groups()
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise ExportError(f"{file}: {key} adapts {module}, which has no GGUF name for {arch}")
        heads = None
        if ab == "B" and arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = cfg["num_attention_heads"] if ".attn_q." in name else cfg["num_key_value_heads"]
        shape = shapes[key]
        # An embedding's A (r x vocab) is stored transposed: llama.cpp gathers its rows by token id.
        transpose = bool(embedding) and ab == "A"
        if transpose:
            shape = shape[::-1]
        out_name = f"{name}.lora_{ab.lower()}"
        plan.append(_Tensor(out_name, shape, _tensor_qtype(out_name, shape, quant), file, key, heads,
                            transpose=transpose))
    if full:
        raise ExportError(
            f"{file} holds weights trained in full ({', '.join(sorted(full)[:3])}{', ...' if len(full) > 3 else ''}: "
            "lora.modules_to_save), which llama.cpp's LoRA format cannot carry; export the merged model instead "
            "(drop --adapter-only)"
        )
    if not plan:
        raise ExportError(f"{file} holds no LoRA weights")
    # lora_a then lora_b of each weight, in layer order (llama.cpp's size accounting expects pairs).
    plan.sort(key=lambda t: (t.name.rsplit(".", 1)[0], t.name))

    def metadata(w) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(adapter_dir.resolve().parent.name)
        _add_file_type(w, quant)

    path = output / f"adapter-{quant}.gguf"
    _write_gguf(path, arch, metadata, plan, progress=progress)
    from finetune.inference.load import load_adapter_tokenizer

    tokenizer, _ = load_adapter_tokenizer(adapter_dir, str(base))
    modelfile = write_modelfile(output, base_gguf or str(base.resolve()), tokenizer, adapter=path.name,
                                run_dir=adapter_dir.resolve().parent)
    update_manifest(output, [path.name, modelfile.name])
    logger.info("LoRA GGUF -> %s (%d tensors, alpha %g)", path, len(plan), alpha)
    return ExportResult(path, modelfile, quant, len(plan))


def _adapter_alpha(info: dict[str, Any], adapter_dir: Path) -> float:
    """The alpha that makes llama.cpp's alpha / r equal PEFT's scale for every adapted weight."""
    where = f"{adapter_dir}/adapter_config.json"
    if info.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{where}: peft_type {info.get('peft_type')} cannot be exported; supported: LORA")
    if info.get("use_dora"):
        raise ExportError(f"{where}: use_dora=true (DoRA) has no llama.cpp adapter form; export the merged model")
    if info.get("alpha_pattern"):
        raise ExportError(f"{where}: alpha_pattern gives modules their own alpha, but a llama.cpp adapter has one; "
                          "export the merged model")
    if info.get("bias", "none") != "none":
        raise ExportError(f"{where}: bias={info['bias']} trains biases, which llama.cpp's LoRA format cannot "
                          "carry; export the merged model")
    alpha = float(info["lora_alpha"])
    if info.get("use_rslora"):
        if info.get("rank_pattern"):
            raise ExportError(f"{where}: use_rslora with rank_pattern needs one alpha per rank; export the merged model")
        alpha *= math.sqrt(info["r"])  # rsLoRA scales by alpha / sqrt(r) = (alpha * sqrt(r)) / r
    return alpha


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def _write_gguf(path: Path, arch: str, metadata, plan: list[_Tensor], *, progress: bool) -> None:
    """Header and metadata, then the tensors one at a time, into a temp file renamed over `path`
    when complete (kitcore.io): a failure leaves no partial file and any earlier export intact."""
    import gguf

    from kitcore.io import atomic_write_via

    def write(tmp: Path) -> None:
        from tqdm.auto import tqdm

        w = gguf.GGUFWriter(tmp, arch)
        try:
            metadata(w)
            for t in plan:
                _add_tensor_info(w, t)
            # The streaming path of GGUFWriter: every tensor's info first, then each tensor's data in
            # the same order (write_tensor_data); nothing is held back for a final write.
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            total = sum(_nbytes(t) for t in plan)
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"gguf {path.name}", disable=not progress) as bar:
                for t in plan:
                    w.write_tensor_data(_convert_tensor(t))
                    bar.update(_nbytes(t))
        finally:
            w.close()

    atomic_write_via(path, write)


def _nbytes(t: _Tensor) -> int:
    import gguf

    return math.prod(gguf.quant_shape_to_byte_shape(t.shape, t.qtype))


def _add_tensor_info(w, t: _Tensor) -> None:
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if t.qtype in (Q.F32, Q.F16):
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32 if t.qtype == Q.F32 else np.float16), _nbytes(t))
    else:  # raw bytes of a block type; the writer derives the element shape from the byte shape
        w.add_tensor_info(t.name, gguf.quant_shape_to_byte_shape(t.shape, t.qtype), np.dtype(np.uint8),
                          _nbytes(t), raw_dtype=t.qtype)


def _load(t: _Tensor):
    """The source tensor, read from its file on its own (the file is mapped only while it is read,
    so the pages of tensors already written do not stay resident)."""
    import torch
    from safetensors import safe_open

    if t.data is not None:
        return torch.from_numpy(t.data)
    with safe_open(str(t.file), framework="pt") as st:
        x = st.get_tensor(t.key)
    if t.transpose:
        x = x.T
    if t.permute_heads:
        # HF rotates the two halves of each head; llama.cpp's llama rotates adjacent pairs, so
        # each head's rows are interleaved (as llama.cpp's converter does; Qwen2 needs no change).
        n = t.permute_heads
        x = x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
    return x


def _convert_tensor(t: _Tensor):
    import gguf
    import numpy as np
    import torch

    Q = gguf.GGMLQuantizationType
    x = _load(t)
    if t.qtype == Q.F32:
        return x.to(torch.float32).contiguous().numpy()
    if t.qtype == Q.F16:
        return x.to(torch.float16).contiguous().numpy()
    if t.qtype == Q.BF16:
        return x.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    # Block quantization (numpy, float32 input), a slab of rows at a time into the output bytes.
    out = np.empty(gguf.quant_shape_to_byte_shape(t.shape, t.qtype), dtype=np.uint8)
    rows = x.reshape(-1, t.shape[-1])
    out_rows = out.reshape(-1, out.shape[-1])
    step = max(1, _CHUNK_ELEMENTS // t.shape[-1])
    for r0 in range(0, rows.shape[0], step):
        chunk = rows[r0 : r0 + step].to(torch.float32).numpy()
        out_rows[r0 : r0 + step] = gguf.quants.quantize(chunk, t.qtype)
    return out


def export_command(args) -> int:
    res = export_gguf(args.output, adapter=args.adapter, model=args.model, quant=args.quant,
                      adapter_only=args.adapter_only, dtype=args.dtype, base_gguf=args.base_gguf)
    print(f"{res.gguf} ({res.tensors} tensors, {res.quant}, {res.gguf.stat().st_size / 2**20:.1f} MiB)")
    print(f"{res.modelfile}: ollama create NAME -f {res.modelfile}")
    return 0
