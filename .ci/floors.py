"""Print a pip constraints file that pins every direct dependency of the kit (pyproject.toml's
[project].dependencies) at exactly its declared lower bound: the floors CI leg installs with it, so
the low end of every supported range is tested, not just declared. Generated, never hand-kept.

    python .ci/floors.py [--torch VERSION] > floors.txt

--torch: the torch build to test instead of torch's own floor (CI machines have one CPU build)."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ModuleNotFoundError:  # a bare interpreter: pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement


def floors(pyproject: Path, torch: str | None = None) -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out, missing = [], []
    for line in deps:
        req = Requirement(line)
        lower = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
        if req.name == "torch" and torch:
            out.append(f"torch=={torch}")
        elif lower:
            out.append(f"{req.name}=={lower[0]}")
        else:
            missing.append(req.name)
    if missing:
        sys.exit(f"{pyproject}: no lower bound (>=) for {', '.join(missing)}: a range must have a tested low end")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    ap.add_argument("--torch", help="torch version to pin instead of its declared floor")
    a = ap.parse_args()
    print("\n".join(floors(a.pyproject, a.torch)))
