"""Checksums (kitcore.integrity): a flipped block, a truncated copy or a deleted file is found and named."""

from __future__ import annotations

import json
import logging
import os

import pytest

from kitcore.integrity import (
    MANIFEST,
    IntegrityError,
    require_intact,
    require_listed_intact,
    update_manifest,
    verify,
    verify_tree,
    write_manifest,
)


def flip_middle(path, n=64):
    """Overwrite n bytes in the middle of a file with their complement: same size, other content."""
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.seek(max(0, size // 2 - n // 2))
        block = fh.read(n)
        fh.seek(max(0, size // 2 - n // 2))
        fh.write(bytes(255 - b for b in block))


def _artifact(d):
    d.mkdir()
    (d / "weights.bin").write_bytes(os.urandom(1 << 20))
    (d / "config.json").write_text('{"a": 1}')
    (d / "sub").mkdir()
    (d / "sub" / "part.bin").write_bytes(os.urandom(5000))
    write_manifest(d)
    return d


def test_a_clean_artifact_passes_and_each_kind_of_damage_is_named(tmp_path):
    d = _artifact(tmp_path / "a")
    rep = verify(d)
    assert rep.ok and sorted(rep.intact) == ["config.json", "sub/part.bin", "weights.bin"]
    assert json.loads((d / MANIFEST).read_text())["algorithm"] == "xxh3_128"

    flip_middle(d / "weights.bin")  # same size
    rep = verify(d)
    assert not rep.ok and [f for f, _ in rep.damaged] == ["weights.bin"]
    assert "content differs" in rep.damaged[0][1]
    with pytest.raises(IntegrityError, match=r"a/weights\.bin: content differs"):
        require_intact(d, "adapter")

    flip_middle(d / "weights.bin")  # flipped back: intact again
    assert verify(d).ok
    with open(d / "sub" / "part.bin", "r+b") as fh:
        fh.truncate(100)
    (d / "config.json").unlink()
    rep = verify(d)
    assert rep.missing == ["config.json"] and rep.damaged[0][0] == "sub/part.bin"
    assert "size 100 bytes, 5000 were written" in rep.damaged[0][1]
    with pytest.raises(IntegrityError) as err:
        require_intact(d, "checkpoint")
    assert "config.json: missing" in str(err.value) and "part.bin: size 100" in str(err.value)


def test_an_old_artifact_without_checksums_loads_with_a_note_and_verification_can_be_skipped(
        tmp_path, caplog, monkeypatch):
    old = tmp_path / "old"
    old.mkdir()
    (old / "w.bin").write_bytes(b"x" * 10)
    with caplog.at_level(logging.WARNING, logger="kitcore.integrity"):
        rep = require_intact(old, "adapter")
    assert not rep.has_manifest and "has no checksums.json" in caplog.text
    d = _artifact(tmp_path / "a")
    flip_middle(d / "weights.bin")
    monkeypatch.setenv("FINETUNE_VERIFY", "0")
    assert require_intact(d, "adapter") is None  # a trusted disk: not read twice
    monkeypatch.setenv("FINETUNE_VERIFY", "1")
    with pytest.raises(IntegrityError):
        require_intact(d, "adapter")


def test_an_unreadable_manifest_is_damage_not_a_crash(tmp_path):
    d = _artifact(tmp_path / "a")
    (d / MANIFEST).write_text('{"files": ')
    with pytest.raises(IntegrityError, match="checksum manifest is unreadable"):
        require_intact(d, "model")
    found = verify_tree(d)
    assert len(found) == 1 and not found[0][1].ok


def test_a_listed_file_and_a_collecting_directory(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "train.jsonl").write_text('{"a": 1}\n' * 1000)
    (d / "notes.txt").write_text("not listed")
    update_manifest(d, ["train.jsonl"])
    require_listed_intact(d / "train.jsonl")
    require_listed_intact(d / "notes.txt")  # not in the manifest: nothing to check
    (d / "model.gguf").write_bytes(os.urandom(3000))
    update_manifest(d, ["model.gguf"])  # the earlier entry stays
    assert set(json.loads((d / MANIFEST).read_text())["files"]) == {"train.jsonl", "model.gguf"}
    flip_middle(d / "train.jsonl", 8)
    with pytest.raises(IntegrityError, match=r"train\.jsonl: content differs"):
        require_listed_intact(d / "train.jsonl")
    [(kind, rep)] = verify_tree(d / "model.gguf")  # one file, against its directory's manifest
    assert rep.ok and rep.intact == ["model.gguf"]
    [(kind, rep)] = verify_tree(d)
    assert not rep.ok and rep.unlisted == ["notes.txt"]


def test_sha256_entries_of_data_prep_shard_manifests_are_checked(tmp_path):
    from data_prep.writers import shard_name, write_shard
    from data_prep.writers import write_manifest as write_shard_manifest

    root = tmp_path / "train"
    root.mkdir()
    entries = [write_shard(str(root / shard_name(i)), [json.dumps({"i": j}) for j in range(50)]) for i in range(2)]
    write_shard_manifest(str(root), "train", entries)
    [(kind, rep)] = verify_tree(root)
    assert kind == "data-prep shards" and rep.ok and len(rep.intact) == 2
    flip_middle(root / shard_name(1), 4)
    [(kind, rep)] = verify_tree(tmp_path)
    assert [f for f, _ in rep.damaged] == [shard_name(1)] and "sha256" in rep.damaged[0][1]
