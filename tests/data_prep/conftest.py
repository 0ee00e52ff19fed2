from __future__ import annotations

import sys
from pathlib import Path

import pytest

# helpers live next to the tests; tests/ is not a package (tests/finetune is another team's)
sys.path.insert(0, str(Path(__file__).parent))

from dp_fixtures import write_shop  # noqa: E402


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    return write_shop(tmp_path / "shop")
