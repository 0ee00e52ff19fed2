"""data_prep: scraped and annotated text -> clean, deduplicated, redacted, validated chat JSONL
(or preference pairs split by prompt: `task: preference`, data_prep.preference).

Public API:
    from data_prep.build import build, run_recipe   # build(sources, output_dir, ...) -> report dict
    from data_prep.recipe import load_recipe        # YAML + key=value overrides -> Recipe
    from data_prep.validate import validate_file, stats_file
(`build` is not re-exported here: `data_prep.build` is the module of that name.)
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_recipe", "load_recipe", "validate_file", "stats_file"]

_LAZY = {
    "run_recipe": "data_prep.build",
    "load_recipe": "data_prep.recipe",
    "validate_file": "data_prep.validate",
    "stats_file": "data_prep.validate",
}


def __getattr__(name: str) -> Any:
    # lazy: `import data_prep` must not pay for trafilatura/lxml/datasketch imports
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data_prep' has no attribute {name!r}")
