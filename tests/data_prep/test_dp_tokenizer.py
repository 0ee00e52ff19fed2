"""A local tokenizer (trained here, nothing downloaded): context budget and lengths in tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from dp_fixtures import read_jsonl, shop_page
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from data_prep.build import build
from data_prep.readers.html import parse_page
from data_prep.tokens import Lengths
from data_prep.validate import validate_file


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["[UNK]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([shop_page(i) for i in range(20)], trainer)
    tok.save(str(d / "tokenizer.json"))
    return d


def test_context_trimmed_to_token_budget(tmp_path: Path, tok_dir: Path) -> None:
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "shop-001.html").write_text(shop_page(1))
    (tmp_path / "q.csv").write_text("page,question,answer\nshop-001.html,What is sold here?,Lamps.\n")
    out = tmp_path / "out"
    report = build(
        [pages, tmp_path / "q.csv"],
        out,
        tokenizer=tok_dir,
        context={"budget": 30},
        test_fraction=0,
        val_fraction=0,
    )
    user = read_jsonl(out / "train.jsonl")[0]["messages"][0]["content"]
    context, question = user.rsplit("\n\n", 1)
    assert question == "What is sold here?"
    lengths = Lengths(tok_dir)
    assert 25 <= lengths.count(context) <= 30
    assert parse_page(str(pages / "shop-001.html")).text.startswith(context)
    assert report["lengths"]["unit"] == "tokens" and report["lengths"]["train"]["n"] == 1


def test_word_budget_by_default() -> None:
    assert Lengths().trim("one two  three four", 3) == "one two  three"
    assert Lengths().trim("one two", 3) == "one two"


def test_validate_counts_tokens(tmp_path: Path, tok_dir: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "The lamp costs $20."}, {"role": "assistant", "content": "Yes."}]}\n'
    )
    res = validate_file(str(path), tokenizer=str(tok_dir), max_tokens=3)
    assert res.ok and res.lengths["unit"] == "tokens"
    assert [w.kind for w in res.warnings] == ["no_system_message", "over_token_limit"]
