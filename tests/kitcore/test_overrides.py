"""One `key=value` grammar: `finetune train` and `data-prep run` read every value the same way."""

from __future__ import annotations

import pytest

from data_prep.recipe import RecipeError, apply_overrides
from finetune.config import ConfigError, parse_overrides

CASES = [
    ("1e-4", 1e-4),
    ("10", 10),
    ("true", True),
    ("null", None),
    ("[a, b]", ["a", "b"]),
    ("abc", "abc"),
    ("", None),
    ("0.9", 0.9),
]


@pytest.mark.parametrize("raw,expected", CASES, ids=[c[0] or "empty" for c in CASES])
def test_both_loaders_parse_a_value_the_same(raw, expected):
    train_value = parse_overrides([f"training.x={raw}"])["training"]["x"]
    recipe_value = apply_overrides({}, [f"dedup.x={raw}"])["dedup"]["x"]
    assert train_value == recipe_value == expected
    assert type(train_value) is type(recipe_value) is type(expected)


def test_both_loaders_report_every_bad_item_by_key():
    items = ["lora.r", "a.b=[x, y", "seed=1"]
    with pytest.raises(ConfigError) as train_err:
        parse_overrides(items)
    with pytest.raises(RecipeError) as recipe_err:
        apply_overrides({}, items)
    assert [k for k, _ in train_err.value.problems] == ["lora.r", "a.b"]
    assert [p.split(":")[0] for p in recipe_err.value.problems] == ["lora.r", "a.b"]
    assert "key=value" in train_err.value.problems[0][1] and "quote it" in train_err.value.problems[1][1]


def test_recipe_list_items_are_set_by_index_and_a_missing_index_is_named():
    data = {"sources": [{"path": "a.csv", "format": "auto"}], "split": {"seed": 0}}
    got = apply_overrides(data, ["sources.0.format=csv", "split.seed=3"])
    assert got == {"sources": [{"path": "a.csv", "format": "csv"}], "split": {"seed": 3}}
    with pytest.raises(RecipeError, match=r"sources\.2: no item 2: the list has 1 item"):
        apply_overrides(data, ["sources.2.format=csv"])
