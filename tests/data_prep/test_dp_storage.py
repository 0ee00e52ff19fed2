"""Sources as fsspec URLs (memory:// here, in one process): the same build as from local paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dp_fixtures import read_jsonl, write_mixed

from data_prep import storage
from data_prep.build import build

fsspec = pytest.importorskip("fsspec")


def _upload(local_root: Path, url_root: str) -> None:
    fs, base = storage.url_fs(url_root)
    for p in sorted(local_root.rglob("*")):
        if p.is_file():
            fs.pipe_file(f"{base}/{p.relative_to(local_root).as_posix()}", p.read_bytes())


def test_memory_urls_build_as_local_paths_do(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    sources = write_mixed(root)
    (root / "shop" / "pages" / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: skipped, counted
    (root / "shop" / "pages" / ".git").mkdir()
    (root / "shop" / "pages" / ".git" / "x.html").write_text("<html></html>")  # hidden dir: not walked
    url = "memory://h20-corpus"
    _upload(root, url)
    urls = [url + "/" + s.relative_to(root).as_posix() for s in sources]
    args = dict(test_fraction=0.2, val_fraction=0.1, seed=3)
    local_report = build(sources, tmp_path / "local", **args)
    url_report = build(urls, tmp_path / "url", **args)

    def unsourced(text: str) -> str:  # the two builds differ only in how sources are spelled
        return text.replace(url, "ROOT").replace(str(root), "ROOT")

    def kept(out: Path) -> list[str]:  # the split depends on group names, which hold the paths
        return sorted(unsourced(line) for s in ("train", "val", "test") for line in (out / f"{s}.jsonl").open())

    assert kept(tmp_path / "local") == kept(tmp_path / "url")
    rejects = [unsourced((tmp_path / d / "rejects.jsonl").read_text()) for d in ("local", "url")]
    assert rejects[0] == rejects[1] and rejects[0].count("\n") == local_report["counts"]["rejects"] > 5
    for key in ("dedup", "rejects_by_reason", "pii", "accounting"):
        assert local_report[key] == url_report[key], key
    assert url_report["inputs"]["hidden_files_skipped"] == local_report["inputs"]["hidden_files_skipped"] == 1
    assert url_report["inputs"]["context_pages"] == 24  # rows joined pages through their memory:// paths
    joined = [ex for ex in read_jsonl(tmp_path / "url" / "train.jsonl") if ex["meta"]["source"].endswith(".csv")]
    assert joined and all(ex["meta"]["source"].startswith(url) for ex in joined)


def test_glob_url_and_missing_url(tmp_path: Path) -> None:
    from data_prep.recipe import RecipeError

    root = tmp_path / "corpus"
    write_mixed(root)
    url = "memory://h20-glob"
    _upload(root, url)
    report = build([f"{url}/shop/pages/shop-00*.html", f"{url}/shop/questions.csv"], tmp_path / "out")
    assert report["inputs"]["context_pages"] == 9  # shop-001..009, as the local glob test finds
    with pytest.raises(RecipeError, match="no such file, directory or glob match: memory://h20-glob/nope"):
        build([f"{url}/nope"], tmp_path / "out2")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["accounting"]["balanced"]
