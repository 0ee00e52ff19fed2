"""Nothing read back damaged: the data cache, checkpoints, adapters, merged models, GGUF exports and
data-prep's outputs carry checksums, and a flipped block (same size) is found, named and refused or
rebuilt before anything uses it. `finetune verify` reports the same from the command line."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import pytest

from finetune.config import load_config
from kitcore.integrity import MANIFEST, IntegrityError
from tests.conftest import make_chat_examples, write_jsonl
from tests.kitcore.test_integrity import flip_middle


def _verify(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", "verify", str(path)], capture_output=True, text=True,
                          timeout=120)


# ----------------------------------------------------------------------------------------------
# the data cache
# ----------------------------------------------------------------------------------------------
def test_a_cache_shard_with_flipped_bytes_is_named_and_rebuilt_and_no_rank_reads_it(
        tiny_model, tmp_path, caplog, monkeypatch):
    import threading
    import time

    from finetune.data.cache import prepared_split
    from finetune.models.loading import load_tokenizer
    from kitcore.runtime import Runtime

    data = write_jsonl(tmp_path / "d" / "train.jsonl", make_chat_examples(60, seed=3))
    cfg = load_config(None, [f"model={tiny_model}", f"data.train={data}", f"output_dir={tmp_path / 'run'}",
                             "training.report_to=[none]", "max_length=128", "data.cache_wait_s=60"])
    tok = load_tokenizer(str(tiny_model))
    ds, _, final = prepared_split(cfg, tok, str(data))
    good = [list(r["input_ids"]) for r in ds]
    del ds
    meta = json.loads((final / "meta.json").read_text())
    assert all(len(sh["xxh3_128"]) == 32 for sh in meta["shards"])
    assert _verify(final.parent).returncode == 0
    shard = final / meta["shards"][0]["file"]
    flip_middle(shard)  # what the issue found trained on silently: same size, other bytes
    res = _verify(final.parent)
    assert res.returncode == 1 and f"damaged: {shard}: content differs" in res.stdout, res.stdout

    # Two ranks of one job: the waiting rank opens the cache only after the builder verified (and
    # here rebuilt) it; it never memory-maps the damaged shard.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-integrity")
    waiter, builder = Runtime(1, 1, 2, 2, "cpu", "gloo"), Runtime(0, 0, 2, 2, "cpu", "gloo")
    got = {}
    t = threading.Thread(target=lambda: got.update(r=prepared_split(cfg, tok, str(data), waiter)))
    t.start()
    time.sleep(1.5)
    assert t.is_alive()  # the sizes match, but it waits for the builder's verdict
    with caplog.at_level(logging.WARNING, logger="finetune.data.cache"):
        ds, _, _ = prepared_split(cfg, tok, str(data), builder)
    t.join(30)
    assert f"{shard.name}: content differs" in caplog.text and "rebuilding it" in caplog.text
    assert [list(r["input_ids"]) for r in ds] == good
    assert not t.is_alive() and [list(r["input_ids"]) for r in got["r"][0]] == good
    assert len((final.parent / "builds.log").read_text().splitlines()) == 2
    assert _verify(final).returncode == 0


# ----------------------------------------------------------------------------------------------
# checkpoints and resume
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_damaged_checkpoint_is_refused_on_resume_naming_the_file_and_the_newest_intact_one(
        tiny_model, chat_data, tmp_path):
    from finetune.errors import RunDirError
    from finetune.training.recipe import train

    out = tmp_path / "run"
    base = [f"model={tiny_model}", f"data.train={chat_data['train']}", f"output_dir={out}", "seed=0",
            "training.batch_size=4", "training.save_steps=3", "training.save_total_limit=3", "lora.r=4",
            "training.report_to=[none]", "max_length=128", "training.logging_steps=1"]
    train(load_config(None, [*base, "training.max_steps=6"]))
    ckpts = out / "checkpoints"
    for n in (3, 6):
        doc = json.loads((ckpts / f"checkpoint-{n}" / MANIFEST).read_text())
        assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(doc["files"])
    weights = ckpts / "checkpoint-6" / "adapter_model.safetensors"
    flip_middle(weights)
    more = [*base, "training.max_steps=9"]
    with pytest.raises(RunDirError) as err:
        train(load_config(None, [*more, "resume=true"]))
    msg = str(err.value)
    assert f"{weights}: content differs" in msg and "checkpoint-3" in msg and "resume=latest_intact" in msg, msg
    res = _verify(out)
    assert res.returncode == 1 and f"damaged: {weights}" in res.stdout and "intact   checkpoint" in res.stdout, res.stdout

    train(load_config(None, [*more, "resume=latest_intact"]))  # falls back to checkpoint-3 and trains on
    state = json.loads((ckpts / "checkpoint-9" / "trainer_state.json").read_text())
    assert state["global_step"] == 9
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert steps[-6:] == [4, 5, 6, 7, 8, 9]  # steps 4-6 trained again after checkpoint-3

    # Nothing intact is left (one flipped, one truncated, one with a file deleted): the error says so.
    left = sorted(int(p.name.split("-")[1]) for p in ckpts.glob("checkpoint-*"))
    assert left == [3, 6, 9], left
    flip_middle(ckpts / "checkpoint-9" / "optimizer.pt")
    with (ckpts / "checkpoint-6" / "adapter_model.safetensors").open("r+b") as fh:
        fh.truncate(100)
    (ckpts / "checkpoint-3" / "trainer_state.json").unlink()
    with pytest.raises(RunDirError) as err:
        train(load_config(None, [*base, "training.max_steps=12", "resume=latest_intact"]))
    msg = str(err.value)
    assert "optimizer.pt: content differs" in msg and "No older checkpoint" in msg and "intact either" in msg, msg
    res = _verify(ckpts)
    assert res.returncode == 1 and "trainer_state.json" in res.stdout and "size 100 bytes" in res.stdout, res.stdout


# ----------------------------------------------------------------------------------------------
# adapters, merged models, GGUF
# ----------------------------------------------------------------------------------------------
def test_a_damaged_adapter_is_refused_by_inference_eval_merge_and_export(trained_run, chat_data, tmp_path, caplog):
    from finetune import load_for_inference
    from finetune.export.gguf import export_gguf
    from finetune.inference.load import merge_adapter

    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run / "adapter", adapter)
    files = json.loads((adapter / MANIFEST).read_text())["files"]
    assert {"adapter_model.safetensors", "adapter_config.json", "finetune.json", "tokenizer.json"} <= set(files)
    load_for_inference(adapter, device="cpu")  # intact

    flip_middle(adapter / "adapter_model.safetensors")
    for use in (lambda: load_for_inference(adapter, device="cpu"),
                lambda: merge_adapter(adapter, tmp_path / "merged-bad"),
                lambda: export_gguf(tmp_path / "gguf-bad", adapter=adapter, adapter_only=True, progress=False)):
        with pytest.raises(IntegrityError, match=r"adapter_model\.safetensors: content differs"):
            use()
    res = subprocess.run([sys.executable, "-m", "finetune", "eval", "--adapter", str(adapter), "--data",
                          str(chat_data["eval"]), "--output", str(tmp_path / "ev")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "content differs" in res.stderr, res.stderr[-2000:]
    flip_middle(adapter / "adapter_model.safetensors")  # repaired

    (adapter / "tokenizer_config.json").unlink()
    with pytest.raises(IntegrityError, match=r"tokenizer_config\.json: missing"):
        load_for_inference(adapter, device="cpu")

    # A merged model carries checksums too; GGUF exports are added to their directory's manifest.
    merged = merge_adapter(trained_run / "adapter", tmp_path / "merged")
    assert "model.safetensors" in json.loads((merged / MANIFEST).read_text())["files"]
    out = tmp_path / "gguf"
    res = export_gguf(out, model=merged, quant="f16", progress=False)
    assert _verify(res.gguf).returncode == 0
    flip_middle(res.gguf)
    r = _verify(res.gguf)
    assert r.returncode == 1 and f"damaged: {res.gguf}" in r.stdout, r.stdout
    flip_middle(merged / "model.safetensors")
    with pytest.raises(IntegrityError, match=r"model\.safetensors: content differs"):
        export_gguf(tmp_path / "gguf2", model=merged, quant="f16", progress=False)
    from finetune.models.loading import load_base_model

    with pytest.raises(IntegrityError, match="the model .* is damaged"):
        load_base_model(str(merged))

    # An adapter from before checksums existed still loads, with a one-line note.
    old = tmp_path / "old-adapter"
    shutil.copytree(trained_run / "adapter", old)
    (old / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="kitcore.integrity"):
        load_for_inference(old, device="cpu")
    assert "has no checksums.json (written before checksums existed)" in caplog.text


def test_finetune_verify_on_a_run_and_on_nothing(trained_run, tmp_path):
    res = _verify(trained_run)
    assert res.returncode == 0 and "intact   adapter" in res.stdout and "0 damaged" in res.stdout, res.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _verify(empty)
    assert res.returncode == 2 and "nothing with checksums here" in res.stdout
    res = subprocess.run([sys.executable, "-m", "finetune", "verify", "--json", str(trained_run)],
                         capture_output=True, text=True, timeout=120)
    out = json.loads(res.stdout)
    assert out["ok"] and {a["kind"] for a in out["artifacts"]} >= {"adapter"}


# ----------------------------------------------------------------------------------------------
# data-prep's outputs
# ----------------------------------------------------------------------------------------------
def test_data_prep_outputs_carry_checksums_that_finetune_checks_before_reading(tiny_model, tmp_path):
    from data_prep.build import build
    from finetune.data.cache import prepared_split
    from finetune.data.files import read_chat_jsonl
    from finetune.models.loading import load_tokenizer

    src = write_jsonl(tmp_path / "in" / "chats.jsonl", make_chat_examples(80, seed=5))
    out = tmp_path / "out"
    build([src], out, seed=0, test_fraction=0.1, val_fraction=0.1)
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert set(files) == {"train.jsonl", "val.jsonl", "test.jsonl", "rejects.jsonl", "report.json"}
    assert _verify(out).returncode == 0
    read_chat_jsonl(out / "train.jsonl")
    flip_middle(out / "train.jsonl", 8)
    with pytest.raises(IntegrityError, match=r"train\.jsonl: content differs"):
        read_chat_jsonl(out / "train.jsonl")
    cfg = load_config(None, [f"model={tiny_model}", f"data.train={out / 'train.jsonl'}", "max_length=128",
                             f"output_dir={tmp_path / 'run'}", "training.report_to=[none]"])
    with pytest.raises(IntegrityError, match=r"train\.jsonl: content differs"):
        prepared_split(cfg, load_tokenizer(str(tiny_model)), str(out / "train.jsonl"))
    res = _verify(out / "train.jsonl")
    assert res.returncode == 1 and "train.jsonl" in res.stdout
    from finetune.eval.evaluation import read_eval_records

    read_eval_records(out / "test.jsonl")
    flip_middle(out / "test.jsonl", 8)  # the held-out split, as `finetune eval` reads it
    with pytest.raises(IntegrityError, match=r"test\.jsonl: content differs"):
        read_eval_records(out / "test.jsonl")
    # --overwrite removes the old manifest with the old outputs, and writes a new one last.
    build([src], out, seed=0, test_fraction=0.1, val_fraction=0.1, overwrite=True)
    assert _verify(out).returncode == 0
