"""The `key=value` override grammar of `finetune train/plan/...` and `data-prep run`.

`a.b.c=value` sets key `c` of section `a.b`; a numeric part indexes a list that is already there
(`sources.0.path=...`). The value is read as YAML (`10`, `true`, `null`, `[a, b]`, `{k: v}`), with
one exception: YAML 1.1 reads `1e-4` as a string, and a number is what anyone typing it means.
An empty value (`key=`) is null.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

__all__ = ["OverrideError", "merge", "parse_overrides", "parse_value"]


class OverrideError(ValueError):
    """Bad overrides; `problems` lists every (key or item as typed, what is wrong)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{key}: {msg}" for key, msg in problems))


def parse_value(raw: str) -> Any:
    """The value of one override; raises ValueError when it is not valid YAML."""
    if raw.strip() == "":
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ValueError(f"not a valid YAML value ({getattr(exc, 'problem', None) or exc})") from None
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return value


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`["lora.r=16", "training.learning_rate=1e-4"]` -> `{"lora": {"r": 16}, "training": {...}}`.

    Raises OverrideError naming every bad item at once.
    """
    out: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for item in items:
        if "=" not in item:
            problems.append((item, "an override must look like key=value"))
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            problems.append((item, "an override must look like key=value, with a dotted key such as lora.r"))
            continue
        try:
            value = parse_value(raw)
        except ValueError as exc:
            # The shell keeps the inner quotes of '...="..."', which make the value a YAML string.
            problems.append((key, f"{exc}; to pass it as text, quote it: '{key}=\"{raw}\"'"))
            continue
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                break
        if not isinstance(node, dict):
            problems.append((key, "conflicts with another override"))
            continue
        node[parts[-1]] = value
    if problems:
        raise OverrideError(problems)
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` laid over it, section by section (neither is modified).

    A section of `extra` replaces anything but a section or a list; over a list, its numeric keys
    set items (`sources.0.path`). Raises OverrideError for an index past the end of a list.
    """
    problems: list[tuple[str, str]] = []
    merged = _merge(base, extra, "", problems)
    if problems:
        raise OverrideError(problems)
    return merged


def _merge(base: dict[str, Any], extra: dict[str, Any], prefix: str, problems: list[tuple[str, str]]) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        here, old = f"{prefix}{k}", merged.get(k)
        if isinstance(v, dict) and isinstance(old, dict):
            merged[k] = _merge(old, v, f"{here}.", problems)
        elif isinstance(v, dict) and isinstance(old, list) and v and all(str(i).isdigit() for i in v):
            items = list(old)
            for i, item in v.items():
                n = int(i)
                if n >= len(items):
                    problems.append((f"{here}.{i}", f"no item {n}: the list has {len(items)} item(s)"))
                    continue
                if isinstance(item, dict) and isinstance(items[n], dict):
                    item = _merge(items[n], item, f"{here}.{i}.", problems)
                items[n] = item
            merged[k] = items
        else:
            merged[k] = v
    return merged
