"""`finetune generate`: a model's answers to a file of prompts, written as chat JSONL that trains.

    finetune generate --model TEACHER [--adapter RUN/adapter] --input prompts.jsonl --output answers.jsonl

Sequence-level distillation is this followed by `finetune train` on the output (method sft): the
student learns the teacher's answers instead of the original ones.

Input, one JSON value per line:
  - chat JSONL `{"messages": [...]}`: the conversation is answered up to its LAST assistant turn,
    which is replaced (dropped, and answered anew by the model); one that ends with a user or tool
    turn is answered as it is. Earlier assistant turns stay as context and stay in the output: to
    train only on the model's answers, use `data.loss_on: last_assistant`;
  - `{"prompt": "text"}` (one user turn) or `{"prompt": [messages]}` (TRL's conversational prompt;
    its `completion`, if any, is replaced the same way), or a bare JSON string (one user turn).
Other keys of a record are kept. Each answered record is written as `{"messages": [...prompt...,
{"role": "assistant", "content": ANSWER}], ...other keys}`, in input order. A record that declares
`tools` (OpenAI's format; legacy `functions` are read as tools) is rendered with them, keeps its
earlier tool calls and tool results, and the calls in its answer are parsed into `tool_calls`
(`{"role": "assistant", "content": null, "tool_calls": [...]}`), checked like training data.

A record that cannot be answered goes to the rejects file (default `<output>.rejects.jsonl`) with
its line number and reason, in data-prep's rejects layout: a line that is not JSON or not a chat or
prompt record, a message without a role or string content, a conversation the chat template cannot
render, an empty answer, a tool call that is not valid JSON or calls an undeclared function, an
answer that reaches --max-new-tokens without ending its turn (kept with
--keep-unfinished), a generation error (the batch is retried one record at a time, so one bad
record does not take its batch with it).

Streaming and resuming: the input is read a line at a time and only one batch is held; after every
batch the output and rejects are flushed to disk and `<output>.progress.json` records how far the
input was read and how many bytes of each file are complete. A rerun of the same command continues
after the last complete batch (whatever was written after it is cut off), and refuses to continue
a file written with other settings (model, adapter, sampling, max tokens); --overwrite starts again.

Engines: vLLM when it is importable and a CUDA GPU is present (`--engine auto`, the default), else
transformers' `generate` through finetune.inference.load (the loading and the generation `finetune eval`
and `finetune chat` use). Both see the same tokens: the prompt is rendered by the kit's chat
template (finetune.data.chat_template.render_prompt) and handed to vLLM as token ids.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.console import atomic_write_text
from finetune.data.chat_template import render_prompt
from finetune.errors import GenerateError

logger = logging.getLogger(__name__)

__all__ = ["generate_file", "prompt_messages", "add_generate_arguments", "generate_command"]

DEFAULT_BATCH = {"transformers": 8, "vllm": 512}
SNIPPET_CHARS = 500


# ----------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------
def prompt_messages(obj: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(the conversation to answer, the record's other keys) of one parsed input line; raises
    ValueError with the reason when it cannot be answered. See the module docstring for the formats."""
    from kitcore.schema import normalize_record, record_problems, training_example

    if isinstance(obj, str):
        return [{"role": "user", "content": obj}], {}
    if not isinstance(obj, dict):
        raise ValueError(f"a {type(obj).__name__}, not a chat or prompt record (expected {{\"messages\": [...]}}, "
                         "{\"prompt\": ...} or a string)")
    obj = normalize_record(obj)  # legacy `functions` / `function_call` as tools and tool calls
    if "messages" in obj:
        msgs, rest = obj["messages"], {k: v for k, v in obj.items() if k != "messages"}
    elif isinstance(obj.get("prompt"), str):
        msgs = [{"role": "user", "content": obj["prompt"]}]
        rest = {k: v for k, v in obj.items() if k not in ("prompt", "completion")}
    elif isinstance(obj.get("prompt"), list):
        msgs, rest = obj["prompt"], {k: v for k, v in obj.items() if k not in ("prompt", "completion")}
    else:
        raise ValueError("not a chat or prompt record: expected a `messages` list, a `prompt` (text or messages) or "
                         "a string")
    tools = {"tools": rest["tools"]} if rest.get("tools") else {}
    problems = record_problems({"messages": msgs, **tools}, require_assistant=False)
    if problems:
        p = problems[0]
        raise ValueError(f"{p.kind}: {p.detail}" + (f" ({p.fix})" if p.fix else ""))
    if msgs and msgs[-1].get("role") == "assistant":
        msgs = msgs[:-1]  # the turn to answer anew
    if not msgs:
        raise ValueError("nothing to answer: no message before the assistant turn")
    # the schema's keys of each message: earlier tool calls and the results that answer them stay
    return training_example({"messages": msgs})["messages"], rest


@dataclass
class _Item:
    line: int
    raw: str
    obj: Any = None
    messages: list[dict[str, Any]] | None = None
    rest: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    reject: str | None = None
    answer: dict[str, Any] | None = None  # the assistant message written after `messages`


# ----------------------------------------------------------------------------------------------
# engines
# ----------------------------------------------------------------------------------------------
class _TransformersEngine:
    name = "transformers"

    def __init__(self, model: str | None, adapter: str | None, quantize: str | None, *, temperature: float,
                 top_p: float, seed: int):
        from finetune.inference.load import load_for_inference, load_model_for_inference

        if adapter:
            self.model, self.tokenizer = load_for_inference(adapter, base_model=model, quantize=quantize)
        else:
            self.model, self.tokenizer = load_model_for_inference(model, quantize=None if quantize == "auto" else quantize)
        self.sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
        self.seed = seed

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[tuple[str, bool]]:
        from transformers import set_seed

        from finetune.inference.load import generate_batch

        if self.sampling:
            set_seed(self.seed)  # per batch: a resumed run draws the same answers for the same batch
        return generate_batch(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens, **self.sampling)


class _VLLMEngine:
    """vLLM's offline engine on this node's GPU(s); LoRA adapters through its LoRA support."""

    name = "vllm"

    def __init__(self, model: str | None, adapter: str | None, quantize: str | None, *, temperature: float,
                 top_p: float, seed: int):
        from vllm import LLM, SamplingParams

        from finetune.inference.load import adapter_quantization, load_adapter_tokenizer, read_adapter_info
        from finetune.models.loading import load_tokenizer, model_ref

        info = read_adapter_info(adapter) if adapter else {}
        base = model or info.get("base_model_name_or_path")
        if adapter:
            if info.get("modules_to_save"):
                raise GenerateError(f"vLLM cannot serve the adapter in {adapter}: it trains {info['modules_to_save']} "
                                    "in full (modules_to_save); use --engine transformers, or merge it first "
                                    "(`finetune merge`) and pass the merged model as --model")
            self.tokenizer, _ = load_adapter_tokenizer(adapter, base)
            if quantize == "auto":
                quantize = adapter_quantization(info)[0]
        else:
            self.tokenizer = load_tokenizer(base)
            quantize = None if quantize == "auto" else quantize
        if quantize == "8bit":
            raise GenerateError("vLLM has no in-flight 8-bit quantization; use --quantize 4bit, none, or --engine "
                                "transformers")
        kwargs: dict[str, Any] = {"model": model_ref(base), "seed": seed}
        if quantize == "4bit":
            kwargs["quantization"] = "bitsandbytes"  # in-flight NF4, as TRL's vLLM generation asks for it
        if adapter:
            # vLLM takes LoRA ranks from a fixed set; the adapter's tokenizer (with its chat template) decodes.
            r = int(info.get("r") or 16)
            kwargs.update(enable_lora=True, max_lora_rank=next((x for x in (8, 16, 32, 64, 128, 256, 320, 512)
                                                                if x >= r), r))
            if any((Path(adapter) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
                kwargs["tokenizer"] = str(Path(adapter).resolve())
        self.llm = LLM(**kwargs)
        from finetune.inference.load import stop_token_ids

        self.params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed, stop_token_ids=stop_token_ids(self.tokenizer),
                                     skip_special_tokens=True)
        self.lora = None
        if adapter:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, str(Path(adapter).resolve()))
        self.max_new_tokens = None

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[tuple[str, bool]]:
        if self.max_new_tokens != max_new_tokens:
            self.params.max_tokens, self.max_new_tokens = max_new_tokens, max_new_tokens
        # Token ids, not text: the kit's template already holds any BOS, and vLLM would add another.
        inputs = [{"prompt_token_ids": self.tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts]
        outs = self.llm.generate(inputs, sampling_params=self.params, lora_request=self.lora, use_tqdm=False)
        return [(o.outputs[0].text.strip(), o.outputs[0].finish_reason == "stop") for o in outs]


def _vllm_usable() -> str | None:
    """None when vLLM can run here, else why not."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def _engine(kind: str, model, adapter, quantize, **sampling):
    if kind == "auto":
        why = _vllm_usable()
        if why is None:
            try:
                return _VLLMEngine(model, adapter, quantize, **sampling)
            except GenerateError as exc:
                logger.warning("%s; generating with transformers instead", exc)
        else:
            logger.info("generating with transformers (%s)", why)
        return _TransformersEngine(model, adapter, quantize, **sampling)
    if kind == "vllm":
        why = _vllm_usable()
        if why is not None:
            raise GenerateError(f"--engine vllm: {why}; install vllm on a GPU machine, or use --engine transformers")
        return _VLLMEngine(model, adapter, quantize, **sampling)
    return _TransformersEngine(model, adapter, quantize, **sampling)


# ----------------------------------------------------------------------------------------------
# the file loop
# ----------------------------------------------------------------------------------------------
def _progress_path(output: Path) -> Path:
    return output.with_name(output.name + ".progress.json")


def _start(output: Path, rejects: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Where to continue: the progress of an earlier run of the same command (its files cut back to
    their last complete batch), or a fresh start."""
    progress_file = _progress_path(output)
    fresh = {"line": 0, "input_offset": 0, "output_bytes": 0, "rejects_bytes": 0, "written": 0, "rejected": 0,
             "complete": False, "settings": settings}
    if overwrite:
        for f in (output, rejects, progress_file):
            f.unlink(missing_ok=True)
        return fresh
    if not progress_file.is_file():
        if output.exists() and output.stat().st_size:
            raise GenerateError(f"{output} exists and has no {progress_file.name}: it was not written by an "
                                "interrupted `finetune generate`; pass --overwrite to replace it, or another --output")
        return fresh
    progress = json.loads(progress_file.read_text())
    before = progress.get("settings", {})
    differ = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
    if differ:
        shown = "; ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in differ)
        raise GenerateError(f"{output} was written with other settings ({shown}); rerun with the same ones to "
                            "continue it, or pass --overwrite to start again")
    for f, size in ((output, progress["output_bytes"]), (rejects, progress["rejects_bytes"])):
        if f.exists() and f.stat().st_size > size:
            os.truncate(f, size)  # lines written after the last complete batch
        elif size and (not f.exists() or f.stat().st_size < size):
            raise GenerateError(f"{f} is shorter than {progress_file.name} records ({size} bytes); it was changed "
                                "since; pass --overwrite to start again")
    return progress


def generate_file(*, input: str | Path, output: str | Path, model: str | None = None, adapter: str | None = None,
                  rejects: str | Path | None = None, max_new_tokens: int = 256, batch_size: int | None = None,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, quantize: str | None = "auto",
                  engine: str = "auto", keep_unfinished: bool = False, overwrite: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Answer every record of `input` into `output` (see the module docstring); returns the counts
    ({"written", "rejected", "lines", "engine", "rejects_file", ...})."""
    from tqdm.auto import tqdm

    if model is None and adapter is None:
        raise GenerateError("give --model, --adapter, or both")
    if max_new_tokens < 1 or (batch_size is not None and batch_size < 1) or temperature < 0 or not 0 < top_p <= 1:
        raise GenerateError("--max-new-tokens and --batch-size must be >= 1, --temperature >= 0, 0 < --top-p <= 1")
    input, output = Path(input), Path(output)
    rejects = Path(rejects) if rejects else output.with_name(output.name.removesuffix(".jsonl") + ".rejects.jsonl")
    if not input.is_file():
        raise GenerateError(f"input file not found: {input}")
    if input.resolve() in (output.resolve(), rejects.resolve()):
        raise GenerateError(f"--output and the rejects file must differ from --input ({input})")
    from finetune.models.loading import model_ref

    settings = {"input": str(input.resolve()), "model": model_ref(model) if model else None,
                "adapter": str(Path(adapter).resolve()) if adapter else None, "max_new_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p, "seed": seed, "quantize": quantize,
                "keep_unfinished": keep_unfinished}
    output.parent.mkdir(parents=True, exist_ok=True)
    rejects.parent.mkdir(parents=True, exist_ok=True)
    state = _start(output, rejects, settings, overwrite)
    size = input.stat().st_size
    if state["input_offset"] > size:
        raise GenerateError(f"{input} is shorter than when {output} was started; pass --overwrite to start again")
    if state["input_offset"] == size and state["complete"]:
        logger.info("%s: every line of %s is done (%d written, %d rejected)", output, input, state["written"],
                    state["rejected"])
        return {**state, "lines": state["line"], "engine": None, "rejects_file": str(rejects)}
    state["complete"] = False
    eng = _engine(engine, model, adapter, quantize, temperature=temperature, top_p=top_p, seed=seed)
    batch_size = batch_size or DEFAULT_BATCH[eng.name]
    tok = eng.tokenizer
    bar = tqdm(total=size, initial=state["input_offset"], unit="B", unit_scale=True, desc=f"generate {input.name}",
               disable=not progress)
    with input.open("rb") as src, output.open("ab") as out, rejects.open("ab") as rej:
        src.seek(state["input_offset"])
        lineno = state["line"]
        window: list[_Item] = []

        def flush() -> None:
            todo = [it for it in window if it.reject is None]
            if todo:
                _answer(eng, todo, max_new_tokens, keep_unfinished)
            for it in window:
                if it.reject is not None:
                    rec = {"source": str(input), "locator": f"line {it.line}", "line": it.line, "step": "generate",
                           "reason": it.reject}
                    if it.obj is not None:
                        rec["record"] = it.obj
                    else:
                        rec["text"] = it.raw[:SNIPPET_CHARS]
                    rej.write((json.dumps(rec, ensure_ascii=False) + "\n").encode())
                    state["rejected"] += 1
                else:
                    msgs = [*it.messages, it.answer]
                    out.write((json.dumps({"messages": msgs, **it.rest}, ensure_ascii=False) + "\n").encode())
                    state["written"] += 1
            for fh in (out, rej):
                fh.flush()
                os.fsync(fh.fileno())
            state.update(line=lineno, input_offset=src.tell(), output_bytes=out.tell(), rejects_bytes=rej.tell())
            atomic_write_text(_progress_path(output), json.dumps(state, indent=1))
            bar.update(src.tell() - bar.n)
            window.clear()

        for raw in iter(src.readline, b""):
            lineno += 1
            text = raw.decode("utf-8", errors="replace")
            if not text.strip():
                continue
            window.append(_read(lineno, text, tok))
            # Rejected lines are held too (to be written in input order), but only a few batches' worth.
            if sum(i.reject is None for i in window) >= batch_size or len(window) >= 4 * batch_size:
                flush()
        flush()
    bar.close()
    state["complete"] = True
    atomic_write_text(_progress_path(output), json.dumps(state, indent=1))
    logger.info("%d answers -> %s, %d rejected -> %s (%s)", state["written"], output, state["rejected"], rejects,
                eng.name)
    return {**state, "lines": lineno, "engine": eng.name, "rejects_file": str(rejects)}


def _read(lineno: int, text: str, tokenizer) -> _Item:
    """One input line as a prompt to answer, or with the reason it cannot be."""
    it = _Item(line=lineno, raw=text)
    try:
        it.obj = json.loads(text)
    except json.JSONDecodeError as exc:
        it.reject = f"malformed JSON ({exc.msg} at column {exc.colno})"
        return it
    try:
        it.messages, it.rest = prompt_messages(it.obj)
    except ValueError as exc:
        it.reject = str(exc)
        return it
    try:
        it.prompt = render_prompt(tokenizer, it.messages, it.rest.get("tools"))  # OpenAI records declare them
    except Exception as exc:  # jinja raises its own errors; a record the template cannot render is its own problem
        it.reject = f"the chat template cannot render it: {type(exc).__name__}: {exc}"
    return it


def _answer(eng, items: list[_Item], max_new_tokens: int, keep_unfinished: bool) -> None:
    """Generate for `items` in one call; on an error, one at a time, so that only the records that
    fail on their own are rejected."""
    try:
        results = eng.generate([it.prompt for it in items], max_new_tokens)
    except Exception as exc:
        if len(items) == 1:
            items[0].reject = f"generation failed: {type(exc).__name__}: {exc}"
            return
        logger.warning("a batch of %d failed (%s: %s); retrying its records one at a time", len(items),
                       type(exc).__name__, exc)
        for it in items:
            _answer(eng, [it], max_new_tokens, keep_unfinished)
        return
    for it, (text, finished) in zip(items, results):
        if not text:
            it.reject = "empty answer"
        elif not finished and not keep_unfinished:
            it.reject = (f"no end of turn within {max_new_tokens} new tokens (the answer would be cut off; raise "
                         "--max-new-tokens, or keep such answers with --keep-unfinished)")
        else:
            it.answer, it.reject = _answer_message(it, text)


def _answer_message(it: _Item, text: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the assistant message of a generated answer, None) or (None, why it cannot be written). For a
    record that declares tools, the calls in the answer are parsed (chat_template.parse_tool_calls)
    into `tool_calls`, and the answered record must pass the schema check training applies."""
    from finetune.data.chat_template import parse_tool_calls
    from kitcore.schema import record_problems

    tools = it.rest.get("tools")
    if not tools:
        return {"role": "assistant", "content": text}, None
    parsed = parse_tool_calls(text, first_id=sum(len(m.get("tool_calls") or []) for m in it.messages))
    if parsed.invalid:
        return None, f"a tool call in the answer is not a JSON call: {parsed.invalid[0][:200]!r}"
    message = ({"role": "assistant", "content": parsed.content or None, "tool_calls": parsed.tool_calls}
               if parsed.tool_calls else {"role": "assistant", "content": text})
    problems = record_problems({"messages": [*it.messages, message], "tools": tools})
    if problems:
        p = problems[0]
        return None, f"the answer cannot train: {p.kind}: {p.detail}"
    return message, None


# ----------------------------------------------------------------------------------------------
# command
# ----------------------------------------------------------------------------------------------
def add_generate_arguments(p) -> None:
    p.add_argument("--model", help="the model that answers (a teacher), directory or hub id; with --adapter, "
                   "overrides the base model the adapter names")
    p.add_argument("--adapter", help="a LoRA adapter directory (a run's adapter/) applied to the model")
    p.add_argument("--input", required=True, help="JSONL of chats {messages: [...]} (the last assistant turn is "
                   "replaced), prompts {prompt: text or messages}, or strings")
    p.add_argument("--output", required=True, help="chat JSONL of the answers (appended to when resuming)")
    p.add_argument("--rejects", help="where records that cannot be answered go (default: OUTPUT.rejects.jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, help="prompts per generate call (default 8 with transformers, "
                   "512 with vLLM, which batches them itself)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--quantize", choices=["auto", "none", "4bit", "8bit"], default="auto",
                   help="how to load the model: auto = as an adapter was trained (4-bit for QLoRA), else full "
                   "precision (default: auto)")
    p.add_argument("--engine", choices=["auto", "vllm", "transformers"], default="auto",
                   help="auto = vLLM when installed and a GPU is present, else transformers")
    p.add_argument("--keep-unfinished", action="store_true",
                   help="keep answers that reach --max-new-tokens without ending their turn (rejected by default)")
    p.add_argument("--overwrite", action="store_true", help="start again instead of continuing an earlier run")


def generate_command(args) -> int:
    res = generate_file(input=args.input, output=args.output, model=args.model, adapter=args.adapter,
                        rejects=args.rejects, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                        quantize=None if args.quantize == "none" else args.quantize, engine=args.engine,
                        keep_unfinished=args.keep_unfinished, overwrite=args.overwrite)
    print(f"{res['written']} answers -> {args.output}; {res['rejected']} rejected"
          + (f" -> {res['rejects_file']}" if res.get("rejects_file") and res["rejected"] else ""))
    return 0
