"""The Ollama Modelfile written beside an exported GGUF: FROM (and ADAPTER), the end-of-turn stop token,
the system prompt when training used a single one, and a TEMPLATE for the kit's ChatML."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from finetune.data.chat_template import end_of_turn_token

logger = logging.getLogger(__name__)

__all__ = ["end_of_turn", "write_modelfile", "single_system_prompt"]


def end_of_turn(tok) -> str | None:
    """The chat template's end-of-turn token (the stop token of the exported model), or None."""
    try:
        return end_of_turn_token(tok)
    except Exception as exc:  # a template that refuses the probe conversation: no stop token to add
        logger.warning("could not find the chat template's end-of-turn token (%s)", exc)
        return None


# The kit's ChatML template (finetune.data.chat_template.CHATML_TEMPLATE) as an Ollama Go template: the
# same text for a conversation that ends on a user turn, which is what Ollama renders.
_CHATML_OLLAMA = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)


def write_modelfile(output: Path, source: str, tokenizer, *, adapter: str | None = None,
                    run_dir: Path | None = None) -> Path:
    """An Ollama Modelfile next to the GGUF: FROM (and ADAPTER), the end-of-turn stop token, the
    system prompt when training used a single one, and a TEMPLATE only for the kit's ChatML (any
    other Jinja template cannot be translated faithfully; Ollama then reads the GGUF's own)."""
    from finetune.data.chat_template import CHATML_TEMPLATE, CHATML_TOOLS_TEMPLATE

    src = source if Path(source).is_absolute() else f"./{source}"
    lines = [f"# ollama create NAME -f {output / 'Modelfile'}", f"FROM {src}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    template = getattr(tokenizer, "chat_template", None)
    eot = end_of_turn(tokenizer) if template else None
    if eot:
        lines.append(f'PARAMETER stop "{eot}"')
    if template == CHATML_TEMPLATE:
        lines.append(f'TEMPLATE """{_CHATML_OLLAMA}"""')
    elif template == CHATML_TOOLS_TEMPLATE:
        # chatml_tools renders a chat without tools exactly as ChatML does; its tools block has no
        # faithful Go-template translation here, so the file says what the TEMPLATE covers.
        lines.append("# TEMPLATE: ChatML for chats without tools; a request with tools is not rendered with them")
        lines.append(f'TEMPLATE """{_CHATML_OLLAMA}"""')
    system = single_system_prompt(run_dir) if run_dir is not None else None
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    path = output / "Modelfile"
    from kitcore.io import atomic_write_text

    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def single_system_prompt(run_dir: Path) -> str | None:
    """The system prompt when every training example opens with the same one; else None (no
    system turn, several, or a data file this machine no longer has)."""
    import yaml

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        return None
    train = ((yaml.safe_load(cfg_file.read_text()) or {}).get("data") or {}).get("train")
    if not train or not Path(train).is_file():
        logger.info("Modelfile: no SYSTEM line (the training data %s is not on this machine)", train)
        return None
    seen: str | None = None
    with open(train, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            msgs = json.loads(line).get("messages") or []
            first = msgs[0] if msgs else {}
            system = first.get("content") if first.get("role") == "system" else None
            if system is None or (seen is not None and system != seen):
                return None
            seen = system
    if seen is not None and '"""' in seen:
        logger.warning("Modelfile: the system prompt holds \"\"\", which a Modelfile cannot quote; no SYSTEM line")
        return None
    return seen
