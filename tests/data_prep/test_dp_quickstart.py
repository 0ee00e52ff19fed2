"""The quickstart path: scraped shop pages + questions.csv joined into context-grounded chat examples."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from dp_fixtures import product_names, read_jsonl, write_shop

from data_prep.build import build
from data_prep.cli import main
from data_prep.readers.html import parse_page
from data_prep.writers import OutputDirError

ARGS = dict(seed=0, test_fraction=0.1, val_fraction=0.05)


def _all(out: Path) -> list[dict]:
    return [ex for s in ("train", "val", "test") for ex in read_jsonl(out / f"{s}.jsonl")]


def test_joined_example_is_page_text_then_question(shop: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = build([shop / "pages", shop / "questions.csv"], out, **ARGS)
    page_text = parse_page(str(shop / "pages" / "shop-007.html")).text
    assert "cookies" not in page_text and "Privacy policy" not in page_text and "dataLayer" not in page_text
    name = product_names(7)[0]
    assert f"The {name} costs" in page_text
    by_loc = {ex["meta"]["locator"]: ex for ex in _all(out)}
    # row order in questions.csv: 6 rows per page, so page 7 starts at row 37 (file name) / 38 (URL)
    ex = by_loc["row=37"]
    assert ex["messages"] == [
        {"role": "user", "content": page_text + "\n\nHow much does the " + name + " cost?"},
        {"role": "assistant", "content": ex["messages"][1]["content"]},
    ]
    assert ex["messages"][1]["content"].startswith("$")
    # the canonical-URL row joins the same page
    assert by_loc["row=38"]["messages"][0]["content"].startswith(page_text + "\n\n")
    assert ex["meta"]["source"].endswith("questions.csv")
    assert report["inputs"]["context_pages"] == 40
    assert report["counts"]["rejects"] == 0
    assert report["accounting"] == {"records_in": 260, "out": 260, "balanced": True}


def test_inline_context_row_and_system_prompt(shop: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build([shop / "pages", shop / "questions.csv"], out, system="You answer shop questions.", **ARGS)
    ex = next(e for e in _all(out) if e["meta"]["locator"] == "row=241")
    assert ex["messages"][0] == {"role": "system", "content": "You answer shop questions."}
    assert ex["messages"][1]["content"].startswith("Inventory note 0: the ")
    assert "\n\nHow many units of the " in ex["messages"][1]["content"]
    assert ex["messages"][2] == {"role": "assistant", "content": "3"}


def test_rows_of_one_page_share_a_split(shop: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build([shop / "pages", shop / "questions.csv"], out, **ARGS)
    split_of_page: dict[str, set[str]] = {}
    for s in ("train", "val", "test"):
        for ex in read_jsonl(out / f"{s}.jsonl"):
            row = int(ex["meta"]["locator"].split("=")[1])
            if row <= 240:
                split_of_page.setdefault(str((row - 1) // 6), set()).add(s)
    assert len(split_of_page) == 40
    assert all(len(v) == 1 for v in split_of_page.values())
    assert {s for v in split_of_page.values() for s in v} == {"train", "val", "test"}


def test_deterministic_and_seed_dependent(shop: Path, tmp_path: Path) -> None:
    srcs = [shop / "pages", shop / "questions.csv"]
    build(srcs, tmp_path / "a", **ARGS)
    build(srcs, tmp_path / "b", workers=2, **ARGS)
    build(srcs, tmp_path / "c", **{**ARGS, "seed": 1})
    for s in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{s}.jsonl").read_bytes() == (tmp_path / "b" / f"{s}.jsonl").read_bytes()
    assert (tmp_path / "a" / "test.jsonl").read_bytes() != (tmp_path / "c" / "test.jsonl").read_bytes()


def test_unreferenced_page_and_missing_page_are_rejected(shop: Path, tmp_path: Path) -> None:
    (shop / "pages" / "orphan.html").write_text(
        "<html><body><main><p>" + "An orphan page nobody asks about. " * 20 + "</p></main></body></html>"
    )
    with open(shop / "questions.csv", "a", encoding="utf-8") as fh:
        fh.write("shop-999.html,,What is this?,Nothing.\n")
    out = tmp_path / "out"
    report = build([shop / "pages", shop / "questions.csv"], out, **ARGS)
    rejects = read_jsonl(out / "rejects.jsonl")
    orphan = [r for r in rejects if r["source"].endswith("orphan.html")]
    assert orphan and orphan[0]["reason"] == "no_chat_structure" and orphan[0]["step"] == "read"
    missing = [r for r in rejects if r["reason"].startswith("page_not_found")]
    assert missing[0]["reason"] == "page_not_found: shop-999.html" and missing[0]["locator"] == "row=261"
    acc = report["accounting"]
    assert acc["balanced"] and acc["records_in"] == 262


def test_no_provenance_and_cli(shop: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = [
        "build",
        str(shop / "pages"),
        str(shop / "questions.csv"),
        "--output-dir",
        str(out),
        "--seed",
        "0",
    ]
    assert main([*argv, "--test-fraction", "0.1", "--val-fraction", "0.05", "--no-provenance"]) == 0
    assert "records in" in capsys.readouterr().out
    assert all(set(ex) == {"messages"} for ex in read_jsonl(out / "train.jsonl"))
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["train"] + report["counts"]["val"] + report["counts"]["test"] == 260


def test_refuses_non_empty_dir_and_overwrite_keeps_other_files(shop: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="--overwrite"):
        build([shop / "questions.csv"], out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    build([shop / "pages", shop / "questions.csv"], out, overwrite=True, **ARGS)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["notes.txt", "train.jsonl", "val.jsonl", "test.jsonl", "rejects.jsonl", "report.json", "checksums.json"]
    )


def test_three_thousand_rows_is_fast(tmp_path: Path) -> None:
    root = write_shop(tmp_path / "big", rows_per_page=75)
    t0 = time.perf_counter()
    report = build([root / "pages", root / "questions.csv"], tmp_path / "out", **ARGS)
    assert time.perf_counter() - t0 < 10
    assert report["accounting"]["records_in"] == 3020 and report["accounting"]["balanced"]
    assert report["counts"]["rejects"] == 0


def test_glob_source_and_module_entry_point(shop: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "out"
    report = build([str(shop / "pages" / "shop-00*.html"), shop / "questions.csv"], out, **ARGS)
    # shop-001..009 are found by the glob; rows about the other pages cannot be joined
    assert report["inputs"]["context_pages"] == 9
    assert report["rejects_by_reason"] == {"page_not_found": 260 - 20 - 9 * 6}
    res = subprocess.run(
        [sys.executable, "-m", "data_prep", "--help"], capture_output=True, text=True, check=True
    )
    for cmd in ("build", "run", "validate", "stats"):
        assert cmd in res.stdout


QUICKSTART = Path(__file__).resolve().parents[2] / "finetune" / "quickstart_data"


@pytest.mark.skipif(not (QUICKSTART / "questions.csv").exists(), reason="quickstart data not shipped yet")
def test_shipped_quickstart_data(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = build([QUICKSTART / "pages", QUICKSTART / "questions.csv"], out, **ARGS)
    acc = report["accounting"]
    assert acc["balanced"] and report["inputs"]["context_pages"] == 40
    assert report["counts"]["train"] > 10 * report["counts"]["test"] / 2 > 0
    for ex in _all(out):
        user = ex["messages"][0]["content"]
        assert ex["messages"][0]["role"] == "user" and "\n\n" in user
        assert "cookies" not in user and "Privacy" not in user and "dataLayer" not in user


def _bare_page(topic: str) -> str:
    """A scraped page with no canonical link and no og:url: only its place in the tree names it."""
    sentence = f"The {topic} is sold in our shop, it is made to last and ships within three working days. "
    return f"<!DOCTYPE html><html><head><title>{topic}</title></head><body><main><article><h1>{topic}</h1><p>{sentence * 6}</p></article></main></body></html>"


def test_url_rows_join_pages_by_their_path_in_the_scraped_tree(tmp_path: Path) -> None:
    # `wget -m` keeps the host as the top directory; other crawls are rooted at the host itself
    mirror, rooted = tmp_path / "mirror", tmp_path / "rooted"
    pages = {
        mirror / "www.shop.example.com" / "products" / "kettle" / "index.html": "kettle",  # path/ -> index.html
        mirror / "www.shop.example.com" / "products" / "lamp.html": "lamp",  # wget -E suffix
        mirror / "www.shop.example.com" / "products" / "mug": "mug",  # no suffix at all
        mirror / "www.shop.example.com" / "products" / "café-grinder.html": "grinder",  # percent-decoded
        rooted / "outdoor" / "tent" / "index.html": "tent",
    }
    for path, topic in pages.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_bare_page(topic), encoding="utf-8")
    urls = {
        "kettle": "https://shop.example.com/products/kettle/",
        "lamp": "http://www.shop.example.com/products/lamp",
        "mug": "https://SHOP.example.com/products/mug",
        "grinder": "https://shop.example.com/products/caf%C3%A9-grinder",
        "tent": "https://camping.example.org/outdoor/tent",
        "missing": "https://shop.example.com/products/toaster/",
    }
    with open(tmp_path / "rows.csv", "w", encoding="utf-8") as fh:
        fh.write("url,question,answer\n")
        for topic, url in urls.items():
            fh.write(f"{url},How fast does the {topic} ship?,Within three working days.\n")
    out = tmp_path / "out"
    report = build([mirror, rooted, tmp_path / "rows.csv"], out, seed=0, val_fraction=0.0, test_fraction=0.0)
    assert report["inputs"]["context_pages"] == 5
    context_of = {}
    for ex in read_jsonl(out / "train.jsonl"):
        context, question = ex["messages"][0]["content"].rsplit("\n\nHow fast does the ", 1)
        context_of[question.split()[0]] = context
    assert sorted(context_of) == ["grinder", "kettle", "lamp", "mug", "tent"]
    for topic, context in context_of.items():  # each row got its own page, not just some page
        assert context.startswith(f"{topic}\nThe {topic} is sold in our shop"), context[:80]
    rejects = read_jsonl(out / "rejects.jsonl")
    assert [r["reason"] for r in rejects] == [f"page_not_found: {urls['missing']}"]
