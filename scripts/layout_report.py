"""How the `finetune` package is laid out: import cycles between its modules, private names
imported from another module, and training-method names outside finetune/methods/.

    python scripts/layout_report.py          # the figures, and what each one counts
    python scripts/layout_report.py --json

Every import counts, at module level or inside a function (a lazy import is still a dependency).
tests/finetune/test_layout.py holds the package to zero on each count.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "finetune"
METHOD_NAMES = ("sft", "dpo", "orpo", "simpo", "kto", "distill", "grpo")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that `name` (a dotted import target) is or lies in."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(known: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the finetune modules it imports; and every private cross-module import."""
    graph: dict[str, set[str]] = {m: set() for m in known}
    private = []
    for mod, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # `if TYPE_CHECKING:` imports are for annotations, never run
                continue
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("finetune"):
                        target = _resolve(a.name, known)
                        if target and target != mod:
                            graph[mod].add(target)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if not base.startswith("finetune"):
                    continue
                for a in node.names:
                    full = f"{base}.{a.name}"
                    if full in known:  # `from finetune.x import module`
                        if full != mod:
                            graph[mod].add(full)
                        continue
                    target = _resolve(base, known)
                    if target and target != mod:
                        graph[mod].add(target)
                        if a.name.startswith("_") and not a.name.startswith("__"):
                            private.append(f"{mod}: {a.name} from {target}")
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


MARKER = "# layout: not a method"


def method_branches(known: dict[str, Path]) -> list[str]:
    """Lines outside finetune/methods/ that name a training method in a string literal (docstrings
    aside). A line that holds such a string for another reason (a file-format key that happens to
    equal a method's name) says so with the comment MARKER."""
    hits = []
    for mod, path in known.items():
        if mod.startswith("finetune.methods"):
            continue
        text = path.read_text()
        marked = {i for i, line in enumerate(text.splitlines(), 1) if MARKER in line}
        tree = ast.parse(text, str(path))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                    and node.value in METHOD_NAMES and node.lineno not in marked):
                hits.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}")
    return hits


def report() -> dict:
    known = modules()
    graph, private = imports(known)
    lengths = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines()) for p in known.values()}
    largest = max(lengths, key=lengths.get)
    return {
        "modules": len(known),
        "import_cycles": cycles(graph),
        "private_cross_module_imports": sorted(private),
        "method_names_outside_methods": method_branches(known),
        "largest_module": {largest: lengths[largest]},
        "training_recipe_lines": lengths.get("finetune/training/recipe.py"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = report()
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"modules                          {r['modules']}")
    print(f"import cycles                    {len(r['import_cycles'])}")
    for c in r["import_cycles"]:
        print("    " + " <-> ".join(c))
    print(f"private cross-module imports     {len(r['private_cross_module_imports'])}")
    for line in r["private_cross_module_imports"]:
        print("    " + line)
    print(f"method names outside methods/    {len(r['method_names_outside_methods'])}")
    for line in r["method_names_outside_methods"]:
        print("    " + line)
    (name, n), = r["largest_module"].items()
    print(f"largest module                   {name} ({n} lines)")
    print(f"training recipe                  {r['training_recipe_lines']} lines")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
