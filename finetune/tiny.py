"""`finetune tiny-model`: a small Llama-architecture causal LM and a locally trained tokenizer.

Tests and the quickstart use it because nothing can be downloaded at run time. It is saved in the
standard Hugging Face layout, so every loader goes through `from_pretrained(dir)`, the same code path
as a real model on a cluster.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from finetune.data.chat_template import CHATML_TOOLS_TEMPLATE, render_chat
from kitcore.schema import training_example, training_problem, uses_tools

logger = logging.getLogger(__name__)

__all__ = ["build_tiny_model", "build_random_adapter", "corpus_texts"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Fallback corpus when no --corpus is given: enough text for the byte-level merges of common
# English words; the quickstart passes its own training data instead.
_DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the price of the kettle? The kettle costs $34.",
    "user assistant system question answer context page product price color weight",
    "Hello! How can I help you today? Thank you for your question.",
]


def corpus_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Texts from chat JSONL (message contents), other JSONL/JSON lines, or plain text files."""
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            raw = f.read_text(encoding="utf-8", errors="replace")
            if f.suffix == ".jsonl":
                for line in raw.splitlines():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                        for m in obj["messages"]:
                            if isinstance(m, dict) and isinstance(m.get("content"), str):
                                yield m["content"]
                    elif isinstance(obj, dict):
                        yield " ".join(str(v) for v in obj.values() if isinstance(v, str))
            else:
                yield raw


def tool_chats(paths: Iterable[str | Path]) -> Iterator[tuple[list[dict], list | None]]:
    """(messages, tools) of the chat JSONL records that use tool calling and would train."""
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if f.suffix != ".jsonl":
                continue
            for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if training_problem(obj) is None:
                    ex = training_example(obj)
                    if uses_tools(ex["messages"], ex.get("tools")):
                        yield ex["messages"], ex.get("tools")


def tools_block_lines(tokenizer, chats: list[tuple[list[dict], list | None]], *, share: float = 0.5) -> list[str]:
    """The lines of the tools block the template renders (its instructions and one JSON line per
    declared tool) that at least `share` of the tool chats repeat: the lines a chat's rendering
    has with its `tools` and lacks without them, split at newlines and special tokens. Lines of
    the messages themselves (requests, calls, results) are never among them."""
    cut = re.compile("\n|" + "|".join(re.escape(t) for t in tokenizer.all_special_tokens))
    probe = [{"role": "system", "content": "probe"}, {"role": "user", "content": "probe"}]
    blocks: dict[str, set[str]] = {}  # one render per distinct tools list
    counts: Counter = Counter()
    for _, tools in chats:
        if not tools:
            continue
        key = json.dumps(tools, sort_keys=True)
        if key not in blocks:
            plain = set(cut.split(render_chat(tokenizer, probe)))
            blocks[key] = {p for p in cut.split(render_chat(tokenizer, probe, tools)) if len(p) > 1} - plain
        counts.update(blocks[key])
    return sorted(p for p, n in counts.items() if n >= share * len(chats))


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets exact, which the loss masks rely on.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    # ChatML that also renders tools (identical to plain ChatML without them), so that tests and
    # demos can train tool calling on the tiny model.
    fast.chat_template = CHATML_TOOLS_TEMPLATE
    fast.padding_side = "right"
    return fast


def build_tiny_model(
    output: str | Path,
    corpus: list[str | Path] | None = None,
    *,
    vocab_size: int = 512,
    hidden_size: int = 256,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 1024,
    seed: int = 0,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """Train a tokenizer on `corpus`, build a random-init Llama, save both to `output`.
    `tokenizer_from`: reuse that directory's tokenizer instead (e.g. a student of the same family as
    a teacher, for distillation: both must share one tokenizer)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    output = Path(output)
    if tokenizer_from is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    else:
        texts = list(corpus_texts(corpus)) if corpus else list(_DEFAULT_CORPUS)
        if not texts:
            raise ValueError(f"the corpus {corpus} holds no text")
        tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
        chats = list(tool_chats(corpus or []))
        if chats:
            # A tokenizer that never saw the template's tool markup spends a token per character or two
            # on it (about 680 tokens for the demo's 1,090-character chats): train it on the rendered
            # tool chats too (about 320).
            tokenizer = build_tokenizer(texts + [render_chat(tokenizer, m, t) for m, t in chats], vocab_size=vocab_size)
            # The tools block (Qwen2.5's instructions and one JSON line per declared tool) opens every
            # tool chat: about 215 of a 320-token chat for the three small tools of
            # scripts/tool_calling_demo.py. Each line of it that most chats repeat becomes one token (as
            # `<tool_call>` is one in Qwen's vocabulary), which brings those chats to about 100 tokens:
            # a third of the CPU time per training example. Requests, calls and results are tokenized
            # as before.
            tokenizer.add_tokens(tools_block_lines(tokenizer, chats))
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 8 // 3 // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, do_sample=False
    )
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    n = sum(p.numel() for p in model.parameters())
    logger.info("tiny model: %.2fM parameters, vocab %d -> %s", n / 1e6, len(tokenizer), output)
    return output


def build_random_adapter(
    base: str | Path,
    output: str | Path,
    *,
    r: int = 8,
    alpha: float = 16,
    target_modules: str | list[str] = "all-linear",
    std: float = 0.05,
    seed: int = 0,
) -> Path:
    """A LoRA adapter of `base` with random non-zero B (PEFT starts B at zero, which would make the
    adapter a no-op), saved with the base's tokenizer and pointing at `base`: an adapter whose effect
    shows, without training one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = Path(output)
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, std)
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(base).save_pretrained(output)
    cfg_file = output / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = str(Path(base).resolve())
    cfg_file.write_text(json.dumps(cfg, indent=2))
    return output
