"""Using a trained adapter: load it in one call, generate, chat, merge.

    from finetune import load_for_inference, chat
    model, tokenizer = load_for_inference("runs/x/adapter")
    print(chat(model, tokenizer, [{"role": "user", "content": "Hi"}]))
    reply = chat(model, tokenizer, messages, tools=[...])   # reply.tool_calls: the parsed calls

The tokenizer and chat template come from the adapter directory (saved there by `finetune train`),
so inference formats prompts exactly as training did. Evaluation generates through
`generate_replies` too, so what `finetune eval` scored is what this module returns.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from finetune.data.chat_template import end_of_turn_token, parse_tool_calls, render_prompt
from finetune.errors import AdapterError
from finetune.models.loading import load_base_model, load_tokenizer, model_ref, resolve_dtype
from kitcore.integrity import require_intact, write_manifest

logger = logging.getLogger(__name__)

__all__ = ["ChatReply", "load_for_inference", "load_model_for_inference", "chat", "generate_replies", "generate_batch",
           "merge_adapter", "read_adapter_info"]


def read_adapter_info(adapter_dir: str | Path) -> dict[str, Any]:
    """What the adapter directory says about itself; a clear error when it is not an adapter."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise AdapterError(f"adapter directory not found: {d}")
    cfg_file = d / "adapter_config.json"
    if not cfg_file.is_file():
        if (d / "config.json").is_file():
            raise AdapterError(
                f"{d} is a full model directory, not an adapter: pass it as --model (or `model=`) instead"
            )
        raise AdapterError(f"{d} is not an adapter: expected adapter_config.json (PEFT layout) in it")
    # Checked before anything reads it: eval, merge, export and load_for_inference all come here.
    # A plain PEFT adapter (the Hub's) never had checksums: only the kit's own are noted when they lack them.
    require_intact(d, "adapter", note=logging.WARNING if (d / "finetune.json").is_file() else logging.DEBUG)
    info = json.loads(cfg_file.read_text())
    meta = d / "finetune.json"
    if meta.is_file():
        info["finetune"] = json.loads(meta.read_text())
    return info


def stop_token_ids(tokenizer) -> list[int]:
    ids = []
    eot = end_of_turn_token(tokenizer)
    for tok in (eot, tokenizer.eos_token):
        if tok is not None:
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is not None and i not in ids:
                ids.append(i)
    return ids


_EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "embed_out", "word_embeddings")


def _adapter_shape_problems(adapter_dir: Path, model) -> tuple[list[str], set[int], bool]:
    """Each adapter tensor whose shape the base model cannot take, said in the base's terms; the
    vocabulary sizes of the adapter's mismatched embedding/output weights; whether layer sizes differ.

    Read from the safetensors header (no weights loaded), so the check costs nothing; PEFT's own
    "size mismatch" error names neither the vocabulary nor the hidden size a user can act on.
    """
    from safetensors import safe_open

    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        return [], set(), False
    modules = dict(model.named_modules())
    problems, vocab_rows, layers_differ = [], set(), False
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            name = key.removeprefix("base_model.model.")
            for part in (".modules_to_save", ".original_module"):
                name = name.replace(part, "")
            mod_name, _, leaf = name.rpartition(".")
            kind = None
            for lora in (".lora_A", ".lora_B"):
                if mod_name.endswith(lora):
                    mod_name, kind = mod_name.removesuffix(lora), lora[1:]
            module = modules.get(mod_name)
            if module is None or leaf != "weight":
                continue
            if kind == "lora_A" and hasattr(module, "in_features") and len(shape) == 2:
                if shape[1] != module.in_features:
                    layers_differ = True
                    problems.append(f"{mod_name}: the adapter's LoRA A takes {shape[1]} input features, "
                                    f"the base layer has {module.in_features}")
            elif kind == "lora_B" and hasattr(module, "out_features") and len(shape) == 2:
                if shape[0] != module.out_features:
                    layers_differ = True
                    problems.append(f"{mod_name}: the adapter's LoRA B gives {shape[0]} output features, "
                                    f"the base layer has {module.out_features}")
            elif kind is None and type(module).__name__ in ("Embedding", "Linear"):
                expected = tuple(module.weight.shape)
                if shape != expected:
                    is_vocab = mod_name.rpartition(".")[2] in _EMBEDDING_NAMES
                    if is_vocab and shape[0] != expected[0]:
                        vocab_rows.add(shape[0])
                    layers_differ |= not is_vocab or shape[1:] != expected[1:]
                    problems.append(f"{mod_name}.weight: the adapter holds {shape[0]} x {shape[1]}, "
                                    f"the base has {expected[0]} x {expected[1]}")
    return list(dict.fromkeys(problems)), vocab_rows, layers_differ


def _attach_adapter(model, adapter_dir: str | Path, tokenizer, base: str):
    """Resize the base to the adapter's tokenizer when it added tokens, check shapes, load the adapter."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    n_embed = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_embed:
        model.resize_token_embeddings(len(tokenizer))
    problems, vocab_rows, layers_differ = _adapter_shape_problems(adapter_dir, model)
    if problems:
        why = []
        if vocab_rows:
            why.append(f"vocabulary mismatch: the adapter's embeddings have {'/'.join(map(str, sorted(vocab_rows)))} "
                       f"rows, expected {model.get_input_embeddings().weight.shape[0]} (the tokenizer saved with "
                       f"the adapter has {len(tokenizer)} tokens, the base model {n_embed}); save the tokenizer "
                       "the adapter was trained with into the adapter directory")
        if layers_differ:
            why.append("shape mismatch: the adapter was trained on a base model with other layer sizes")
        why = "; ".join(why)
        shown = "\n  - ".join(problems[:6]) + (f"\n  - ... {len(problems) - 6} more" if len(problems) > 6 else "")
        raise AdapterError(
            f"the adapter in {adapter_dir} does not fit base model {base}: {why}.\n  - {shown}\n"
            "Pass the base model it was trained on (--model / base_model=)."
        )
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except RuntimeError as exc:
        if "size mismatch" in str(exc):
            first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), "")
            raise AdapterError(
                f"the adapter in {adapter_dir} does not fit base model {base} (tokenizer {len(tokenizer)} "
                f"tokens, base embeddings {n_embed}): {first}. Was it trained on another base model?"
            ) from None
        raise


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_adapter_tokenizer(adapter_dir: str | Path, base: str, *, trust_remote_code: bool = False):
    """The tokenizer and chat template an adapter is used with, and where they came from.

    `finetune train` saves both into the adapter directory. An adapter saved by plain PEFT
    (`save_pretrained`, as most adapters on the Hub are) holds only adapter_config.json and the
    weights: then the base model's tokenizer and chat template are used, and the log says so.
    """
    adapter_dir = Path(adapter_dir)
    if any((adapter_dir / f).is_file() for f in _TOKENIZER_FILES):
        return load_tokenizer(str(adapter_dir), trust_remote_code=trust_remote_code), f"adapter directory {adapter_dir}"
    from transformers import AutoTokenizer

    had_template = bool(getattr(AutoTokenizer.from_pretrained(model_ref(base), trust_remote_code=trust_remote_code),
                                "chat_template", None))
    tok = load_tokenizer(base, trust_remote_code=trust_remote_code)
    source = (f"base model {base} (the adapter directory has no tokenizer files)" if had_template else
              f"base model {base}'s tokenizer with the kit's ChatML template (neither the adapter nor the base "
              "has a chat template)")
    logger.warning("tokenizer and chat template: %s", source)
    return tok, source


def adapter_quantization(info: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """How the adapter's base was quantized in training ("4bit" | "8bit" | None, bitsandbytes
    settings), from the finetune.json that `finetune train` saves next to the adapter."""
    meta = info.get("finetune") or {}
    if meta.get("adapter") != "qlora":
        return None, {}
    q = meta.get("quantization") or {}
    if int(q.get("bits", 4)) == 8:
        return "8bit", {}
    qkw: dict[str, Any] = {"quant_type": q.get("quant_type", "nf4"), "double_quant": q.get("double_quant", True)}
    compute = q.get("compute_dtype", "auto")
    if compute == "auto":
        compute = meta.get("dtype", "auto")
    qkw["compute_dtype"] = resolve_dtype(compute)
    return "4bit", qkw


def device_map_for(device: str | None, quantize: str | None):
    """Where an inference model's weights go: `device` when given, else this process's place from
    kitcore.runtime (its GPU in a distributed job, "auto" over the visible GPUs in one process)."""
    from kitcore.runtime import current, inference_device_map

    if device is not None:
        return {"": device}
    dm = inference_device_map(current())
    if dm is None and quantize:
        return {"": "cpu"}  # bitsandbytes quantizes as it places: it needs a device either way
    return dm


def load_for_inference(
    adapter_dir: str | Path,
    *,
    base_model: str | None = None,
    quantize: str | None = "auto",
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
):
    """Return ``(model, tokenizer)`` ready for ``generate``: base + adapter, eval mode.

    The base model is read from the adapter's config unless ``base_model`` is given; the tokenizer
    and chat template are the ones saved with the adapter (the base model's when the adapter
    directory has none). ``quantize``: "auto" (default: as the adapter was trained, i.e. 4-bit
    with the run's NF4/double-quant settings for a QLoRA adapter, which is what evaluation scored),
    None or "none" (full precision), "4bit", "8bit".
    ``device``: None puts the model on the accelerator when there is one (this rank's GPU under a
    distributed launch), else the CPU; or name one ("cuda:1", "cpu").
    """
    info = read_adapter_info(adapter_dir)
    base = base_model or info.get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{adapter_dir}/adapter_config.json names no base model; pass base_model=")
    if base.startswith(("/", ".", "~")) and not Path(base).expanduser().is_dir():
        raise AdapterError(
            f"the adapter's base model {base} is not on this machine; pass base_model= (or --model) "
            "with its directory or hub id"
        )
    qkw: dict[str, Any] = {}
    if quantize == "none":
        quantize = None
    if quantize == "auto":
        quantize, qkw = adapter_quantization(info)
    if dtype == "auto":
        dtype = (info.get("finetune") or {}).get("dtype", "auto")
    tokenizer, _ = load_adapter_tokenizer(adapter_dir, base, trust_remote_code=trust_remote_code)
    model = load_base_model(base, dtype=dtype, quantize=quantize, quant_kwargs=qkw or None,
                            trust_remote_code=trust_remote_code, device_map=device_map_for(device, quantize))
    model = _attach_adapter(model, adapter_dir, tokenizer, base)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_model_for_inference(name: str, *, quantize: str | None = None, device: str | None = None,
                             dtype: str = "auto", trust_remote_code: bool = False):
    """``(model, tokenizer)`` of a model without an adapter (a teacher, a merged model), ready for
    ``generate``: its own tokenizer and chat template (ChatML when it has none), eval mode, placed
    as load_for_inference places models. ``quantize``: None, "4bit" or "8bit"."""
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    model = load_base_model(name, dtype=dtype, quantize=quantize, trust_remote_code=trust_remote_code,
                            device_map=device_map_for(device, quantize))
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))  # the ChatML fallback added its tokens
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def generate_replies(
    model,
    tokenizer,
    conversations: list[list[dict[str, Any]]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = False,
    tools: list[list | None] | None = None,
    **gen_kwargs: Any,
) -> list[str]:
    """Greedy (by default) replies to each conversation, batched, stopping at the end-of-turn token.
    `tools`: the tools each conversation declares (None: none do), rendered by the chat template."""
    from tqdm.auto import tqdm

    prompts = [render_prompt(tokenizer, c, tools[i] if tools else None) for i, c in enumerate(conversations)]
    replies: list[str] = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="generate", disable=not progress, unit="batch"):
        replies += [text for text, _ in generate_batch(model, tokenizer, prompts[start:start + batch_size],
                                                       max_new_tokens=max_new_tokens, **gen_kwargs)]
    return replies


def generate_batch(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 256,
                   **gen_kwargs: Any) -> list[tuple[str, bool]]:
    """(reply, finished) for each rendered prompt (render_prompt's text) in one `generate` call:
    the reply decoded up to the end-of-turn token, and whether it reached one within
    `max_new_tokens` (False: the reply was cut off). Greedy unless `do_sample=True` is passed."""
    import torch

    stop = stop_token_ids(tokenizer)
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    gen_kwargs = {"do_sample": False, **gen_kwargs}
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id, **gen_kwargs)
    finally:
        tokenizer.padding_side = old_side
    results = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        end = next((i for i, t in enumerate(row) if t in stop), None)
        text = tokenizer.decode(row if end is None else row[:end], skip_special_tokens=True)
        results.append((text.strip(), end is not None))
    return results


class ChatReply(str):
    """What `chat` returns: the generated text itself (a `str`, so callers that print or compare
    the reply see what they always did), with the parts a tool-calling caller needs:

    - `content`: the text outside tool calls ("" when the turn only calls tools);
    - `tool_calls`: the calls parsed out of it, in OpenAI's format
      (`[{"id": "call_0", "type": "function", "function": {"name": ..., "arguments": "<JSON>"}}]`),
      empty unless `chat` was given `tools`;
    - `message()`: the assistant message to append to the conversation.
    """

    content: str
    tool_calls: list[dict]

    def __new__(cls, text: str, content: str | None = None, tool_calls: list[dict] | None = None):
        reply = super().__new__(cls, text)
        reply.content = text if content is None else content
        reply.tool_calls = list(tool_calls or [])
        return reply

    def message(self) -> dict[str, Any]:
        if not self.tool_calls:
            return {"role": "assistant", "content": self.content}
        return {"role": "assistant", "content": self.content or None, "tool_calls": self.tool_calls}


def chat(model, tokenizer, messages: list[dict[str, Any]], tools: list[dict] | None = None,
         **gen_kwargs: Any) -> ChatReply:
    """The assistant's reply to `messages`, formatted with the adapter's own chat template.

    With `tools` (OpenAI's `[{"type": "function", "function": {...}}]`) the template declares them
    to the model, and the reply's `tool_calls` holds the calls it made, parsed in the template's
    format (chat_template.parse_tool_calls)."""
    text = generate_replies(model, tokenizer, [messages], batch_size=1, tools=[tools] if tools else None,
                            **gen_kwargs)[0]
    if not tools:
        return ChatReply(text)
    # Ids go on from the calls already in the conversation, so that each result names one call.
    earlier = sum(len(m.get("tool_calls") or []) for m in messages)
    parsed = parse_tool_calls(text, first_id=earlier)
    return ChatReply(text, parsed.content, parsed.tool_calls)


def merge_adapter(adapter_dir: str | Path, output: str | Path, *, dtype: str = "auto",
                  base_model: str | None = None, dequantize: bool | None = None) -> Path:
    """Fold the adapter into its base weights and save a standalone model directory, on CPU.

    An adapter trained on a quantized base (QLoRA, 4-bit or 8-bit; `dequantize=None` reads that
    from the adapter's finetune.json) is merged into the DEQUANTIZED base: the base is loaded
    quantized exactly as in training, dequantized to `dtype`, and the LoRA update added. The adapter was learned against
    those dequantized weights, so the merged model reproduces 4-bit base + adapter (to float
    rounding), not the original full-precision weights + adapter, which differ by the NF4 error.
    `dequantize=False` merges into the original full-precision base instead.
    """
    info = read_adapter_info(adapter_dir)
    base = base_model or info.get("base_model_name_or_path")
    meta = info.get("finetune", {})
    if dequantize is None:
        dequantize = meta.get("adapter") == "qlora"
    tokenizer, _ = load_adapter_tokenizer(adapter_dir, base)
    if dequantize:
        # The base exactly as training saw it (4-bit NF4/FP4 or 8-bit, with the run's settings),
        # then dequantized: transformers' dequantize() covers both bitsandbytes formats.
        quantize, qkw = adapter_quantization(info)
        qkw.pop("compute_dtype", None)
        model = load_base_model(base, dtype=dtype, quantize=quantize or "4bit", quant_kwargs=qkw or None,
                                device_map={"": "cpu"})
        model = model.dequantize()
    else:
        model = load_base_model(base, dtype=dtype, device_map={"": "cpu"})
    model = _attach_adapter(model, adapter_dir, tokenizer, base)
    merged = model.merge_and_unload()
    output = Path(output)
    merged.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    write_manifest(output)  # last: what eval, export and training read back is verified against it
    return output


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------
def _read_tools(path: str | None) -> list[dict] | None:
    """`finetune chat --tools FILE`: a JSON list of tools in OpenAI's format."""
    if not path:
        return None
    from finetune.data.files import DataError

    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(tools, dict) and isinstance(tools.get("tools"), list):
        tools = tools["tools"]  # a record-shaped file: {"tools": [...]}
    problem = next(iter(_tool_list_problems(tools)), None)
    if problem:
        raise DataError(f"{path}: {problem}; expected a list of {{\"type\": \"function\", \"function\": "
                        "{\"name\": ..., \"parameters\": {...}}}")
    return tools


def _tool_list_problems(tools: Any) -> list[str]:
    from kitcore.schema import record_problems

    probe = {"tools": tools, "messages": [{"role": "user", "content": "x"}]}
    return [p.detail for p in record_problems(probe, require_assistant=False)]


def chat_command(args) -> int:
    from transformers import TextStreamer

    model, tok = load_for_inference(args.adapter, base_model=args.model, quantize=args.quantize)
    tools = _read_tools(getattr(args, "tools", None))
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, Any]] = list(system)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    print("Chat with the adapter. /reset clears the history, /exit quits."
          + (f" Tools: {', '.join(t['function']['name'] for t in tools)}; you type each call's result."
             if tools else ""), flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = list(system)
            print("(history cleared)", flush=True)
            continue
        history.append({"role": "user", "content": text})
        # A turn that calls tools is answered by the results the user types, then the model
        # continues; a bounded number of rounds, so that a model calling in a loop cannot hang it.
        for _ in range(8):
            sys.stdout.write("assistant> ")
            sys.stdout.flush()
            reply = chat(model, tok, history, tools=tools, max_new_tokens=args.max_new_tokens, streamer=streamer)
            sys.stdout.flush()
            history.append(reply.message())
            if not reply.tool_calls:
                break
            for call in reply.tool_calls:
                fn = call["function"]
                print(f"[tool call] {fn['name']}({fn['arguments']})", flush=True)
                try:
                    result = input(f"tool {fn['name']}> ")
                except EOFError:
                    print()
                    return 0
                history.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    return 0


def merge_command(args) -> int:
    out = merge_adapter(args.adapter, args.output, dtype=args.dtype, base_model=args.model)
    print(f"merged model -> {out}")
    return 0
