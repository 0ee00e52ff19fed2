"""Logit-level distillation (`method: distill`): the loss against a hand computation, the config,
the teacher checks, training and the held-out KL that `finetune eval` reports.

The teacher is the session's tiny model; the student a smaller model built here on the teacher's
tokenizer (teacher and student must share one)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.conftest import make_chat_examples, write_jsonl


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, tiny_model) -> Path:
    from finetune.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("student") / "model", tokenizer_from=tiny_model, hidden_size=32,
                            layers=2, heads=4, kv_heads=2, max_positions=512, seed=1)


def _batch(tokenizer, n: int = 8):
    from finetune.data.chat_template import encode_chat
    from finetune.data.files import pad_collate

    rows = [encode_chat(tokenizer, ex["messages"]) for ex in make_chat_examples(n, seed=5)]
    return pad_collate(tokenizer.pad_token_id)([{"input_ids": r.input_ids, "labels": r.labels} for r in rows])


def _peaked(model_dir: Path, scale: float, seed: int):
    """The model with its output layer scaled up: a random-init model's distributions are almost
    uniform, and a divergence between two almost uniform distributions hides a wrong temperature."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


# ----------------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------------
def _by_hand(z_s, z_t, target, *, divergence: str, beta: float, temperature: float, alpha: float):
    """The loss from its definition, in float64, on full logits [N, V] at the trained positions."""
    import torch

    z_s, z_t = z_s.double(), z_t.double()

    def log_softmax(z):
        z = z - z.max(-1, keepdim=True).values
        return z - torch.log(torch.exp(z).sum(-1, keepdim=True))

    ce = -log_softmax(z_s)[torch.arange(len(target)), target].sum()  # the data's tokens, at temperature 1
    ls, lt = log_softmax(z_s / temperature), log_softmax(z_t / temperature)
    ps, pt = ls.exp(), lt.exp()
    if divergence == "forward":
        kd = (pt * (lt - ls)).sum()
    elif divergence == "reverse":
        kd = (ps * (ls - lt)).sum()
    else:
        lm = torch.log((1 - beta) * ps + beta * pt)
        kd = beta * (pt * (lt - lm)).sum() + (1 - beta) * (ps * (ls - lm)).sum()
    return (alpha * ce + (1 - alpha) * kd) / len(target), ce, kd


@pytest.mark.parametrize("divergence, beta, temperature, alpha", [
    ("forward", 0.5, 1.0, 0.5),
    ("forward", 0.5, 2.0, 0.0),
    ("reverse", 0.5, 2.0, 0.3),
    ("reverse", 0.5, 0.7, 1.0),
    ("jsd", 0.5, 1.0, 0.5),
    ("jsd", 0.2, 1.5, 0.25),
])
def test_the_kd_loss_equals_a_hand_computation(tiny_model, tiny_student, divergence, beta, temperature, alpha):
    import torch

    from finetune.config import DistillSection
    from finetune.methods.distill_trainer import install_distill_loss
    from finetune.models.loading import load_tokenizer
    from finetune.models.teacher import install_teacher_hidden

    tok = load_tokenizer(str(tiny_student))
    batch = _batch(tok)
    teacher, student = _peaked(tiny_model, 30.0, 0), _peaked(tiny_student, 20.0, 1)
    install_teacher_hidden(teacher)
    d = DistillSection(teacher=str(tiny_model), divergence=divergence, jsd_beta=beta, temperature=temperature,
                       alpha=alpha)
    install_distill_loss(student, teacher, d)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    h_t = teacher(input_ids=ids, attention_mask=mask, labels=labels)
    out = student(input_ids=ids, attention_mask=mask, labels=labels, teacher_hidden=h_t)
    student.zero_grad()
    out.loss.backward()
    kit_grads = {n: p.grad.clone() for n, p in student.named_parameters()}

    scored = labels[:, 1:] != -100
    n = int(scored.sum())
    assert n > 20 and h_t.shape == (n, 64)
    with torch.no_grad():
        z_t = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1][scored]
    student.zero_grad()
    z_s = student(input_ids=ids, attention_mask=mask).logits[:, :-1][scored]
    want, ce, kd = _by_hand(z_s, z_t, labels[:, 1:][scored], divergence=divergence, beta=beta,
                            temperature=temperature, alpha=alpha)
    assert kd > 0.05 * n  # far from a no-op: the two distributions differ
    assert float(out.loss) == pytest.approx(float(want), rel=1e-5)
    assert float(out.ce_sum) == pytest.approx(float(ce), rel=1e-5)
    assert float(out.kd_sum) == pytest.approx(float(kd), rel=1e-5) and out.tokens == n
    want.backward()
    for name, p in student.named_parameters():
        # fp32, summed in another order (the kernel's tiles vs one log-softmax): an element's error is
        # relative to the tensor's scale, not to that element (measured: 1.8e-6 on an embedding gradient
        # whose largest element is 5.2, i.e. 3e-7 of the scale, where a 1e-3 element fails a 1e-4 rtol).
        scale = float(p.grad.abs().max())
        assert torch.allclose(kit_grads[name], p.grad.float(), rtol=1e-4, atol=1e-6 * scale), name

    # Gradient accumulation: the Trainer passes the trained tokens of the whole accumulated batch.
    out2 = student(input_ids=ids, attention_mask=mask, labels=labels, teacher_hidden=h_t, num_items_in_batch=4 * n)
    assert float(out2.loss) == pytest.approx(float(want) / 4, rel=1e-5)


def test_kd_runs_only_over_trained_positions(tiny_model, tiny_student):
    """The divergence sums over the assistant tokens only: untrained positions can differ at will."""
    import torch

    from finetune.config import DistillSection
    from finetune.methods.distill_trainer import install_distill_loss
    from finetune.models.loading import load_tokenizer
    from finetune.models.teacher import install_teacher_hidden

    tok = load_tokenizer(str(tiny_student))
    batch = _batch(tok, 2)
    teacher, student = _peaked(tiny_model, 30.0, 0), _peaked(tiny_student, 20.0, 1)
    install_teacher_hidden(teacher)
    install_distill_loss(student, teacher, DistillSection(teacher="t/t", alpha=0.0))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        first = student(input_ids=ids, attention_mask=mask, labels=labels,
                        teacher_hidden=teacher(input_ids=ids, attention_mask=mask, labels=labels)).loss
        # Every label switched off but one assistant token: only that position is compared.
        one = torch.full_like(labels, -100)
        r, c = (labels[:, 1:] != -100).nonzero()[0].tolist()
        one[r, c + 1] = labels[r, c + 1]
        single = student(input_ids=ids, attention_mask=mask, labels=one,
                         teacher_hidden=teacher(input_ids=ids, attention_mask=mask, labels=one))
        zs = student(input_ids=ids, attention_mask=mask).logits[r, c]
        zt = teacher(input_ids=ids, attention_mask=mask).logits[r, c]
    want = torch.sum(torch.softmax(zt, -1) * (torch.log_softmax(zt, -1) - torch.log_softmax(zs, -1)))
    assert float(single.loss) == pytest.approx(float(want), rel=1e-5) and single.tokens == 1
    assert float(first) != pytest.approx(float(single.loss), rel=1e-3)


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
def _base(tiny_student, chat_data, tmp_path) -> list[str]:
    return [f"model={tiny_student}", f"data.train={chat_data['train']}", f"output_dir={tmp_path / 'run'}"]


def test_distill_keys_are_checked_before_anything_loads(tiny_student, chat_data, tmp_path):
    from finetune.config import ConfigError, load_config

    base = _base(tiny_student, chat_data, tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(None, [*base, "distill.alpha=0.2"])
    assert e.value.problems == [("distill", "set, but method is 'sft'; set method: distill or remove this section")]
    with pytest.raises(ConfigError) as e:
        load_config(None, [*base, "method=distill"])
    assert [k for k, _ in e.value.problems] == ["distill.teacher"] and "needs a teacher" in str(e.value)
    # every problem at once, each under its own dotted key
    with pytest.raises(ConfigError) as e:
        load_config(None, [*base, "method=distill", f"distill.teacher={tmp_path / 'no-such-teacher'}",
                           f"distill.teacher_adapter={tmp_path}", "distill.jsd_beta=0.3", "distill.alpha=1.5",
                           "distill.temperature=0", "distill.divergence=kl", "training.loss=full"])
    keys = dict(e.value.problems)
    assert set(keys) == {"distill.teacher", "distill.teacher_adapter", "distill.alpha", "distill.temperature",
                         "distill.divergence", "training.loss"}, e.value.problems
    assert "model directory not found" in keys["distill.teacher"]
    assert "no adapter_config.json" in keys["distill.teacher_adapter"]
    assert "chunked" in keys["training.loss"]
    with pytest.raises(ConfigError) as e:
        load_config(None, [*base, "method=distill", "distill.teacher=org/teacher", "distill.jsd_beta=0.3"])
    assert e.value.problems == [("distill.jsd_beta", "set, but distill.divergence is 'forward'; jsd_beta weighs the "
                                                     "mixture of divergence: jsd only")]
    ok = load_config(None, [*base, "method=distill", "distill.teacher=org/teacher", "distill.divergence=jsd",
                            "distill.jsd_beta=0.3", "packing=true"])
    assert ok.distill.jsd_beta == 0.3 and ok.packing


def test_saved_configs_load_again(tiny_model, tiny_student, chat_data, tmp_path):
    """A run's config.yaml holds every key with its default: an SFT run's distill section, a
    distillation run's dpo section."""
    from finetune.config import dump_config, load_config

    base = _base(tiny_student, chat_data, tmp_path)
    for over in ([], ["method=distill", f"distill.teacher={tiny_model}", "distill.alpha=0.1"]):
        saved = tmp_path / "config.yaml"
        cfg = load_config(None, [*base, *over])
        saved.write_text(dump_config(cfg))
        assert load_config(saved) == cfg


def test_relative_teacher_paths_are_read_next_to_the_yaml(tiny_model, chat_data, tmp_path):
    import yaml

    from finetune.config import load_config

    recipes = tmp_path / "recipes"
    shutil.copytree(tiny_model, recipes / "teacher")
    (recipes / "adapter").mkdir()
    (recipes / "adapter" / "adapter_config.json").write_text("{}")
    (recipes / "run.yaml").write_text(yaml.safe_dump({
        "model": str(tiny_model), "data": {"train": str(chat_data["train"])}, "output_dir": str(tmp_path / "run"),
        "method": "distill", "distill": {"teacher": "teacher", "teacher_adapter": "./adapter"}}))
    cfg = load_config(recipes / "run.yaml")
    assert Path(cfg.distill.teacher) == recipes / "teacher" and Path(cfg.distill.teacher_adapter) == recipes / "adapter"


def test_a_teacher_with_another_tokenizer_is_refused_before_weights_load(tiny_student, chat_data, tmp_path):
    from finetune.config import ConfigError, load_config
    from finetune.tiny import build_tiny_model
    from finetune.training.recipe import train

    other = build_tiny_model(tmp_path / "other", [chat_data["train"]], vocab_size=300, hidden_size=32, layers=1)
    (other / "model.safetensors").unlink()  # the check reads tokenizers and config.json only
    cfg = load_config(None, [*_base(tiny_student, chat_data, tmp_path), "method=distill", f"distill.teacher={other}",
                             "training.report_to=[none]", "max_length=128"])
    with pytest.raises(ConfigError) as e:
        train(cfg)
    ((key, msg),) = e.value.problems
    assert key == "distill.teacher" and "tokenizer differs from the student's" in msg and "student id" in msg, msg
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_teacher_with_another_output_size_is_refused(tiny_model, tiny_student, chat_data, tmp_path):
    from finetune.config import ConfigError, load_config
    from finetune.methods.distill_trainer import before_model as check_teacher
    from finetune.models.loading import load_tokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model, teacher)
    cfg_file = teacher / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "vocab_size": 384}))
    cfg = load_config(None, [*_base(tiny_student, chat_data, tmp_path), "method=distill", f"distill.teacher={teacher}"])
    with pytest.raises(ConfigError) as e:
        check_teacher(cfg, load_tokenizer(str(tiny_student)))
    ((key, msg),) = e.value.problems
    assert key == "distill.teacher" and "output layer has 384 rows" in msg, msg
    check_teacher(cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"teacher": str(tiny_model)})}),
                  load_tokenizer(str(tiny_student)))


def test_the_plan_counts_the_teacher():
    from dataclasses import replace

    from finetune.plan.memory import ModelShape, Setup, make_plan, nf4_bytes_per_param, param_counts

    student = ModelShape(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)
    teacher = ModelShape(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256)
    sft = Setup(adapter="lora", micro_batch=2, seq_len=2048, precision="bf16", weight_dtype="bfloat16")
    kd = replace(sft, method="distill", teacher=teacher)
    lines = lambda s: {x.name: x.device for x in make_plan(student, s, alternatives=False).lines}  # noqa: E731
    base, with_teacher = lines(sft), lines(kd)
    P = param_counts(teacher)
    assert with_teacher["teacher weights (frozen)"] == P["total"] * 2  # bf16, whole on the device
    tokens = 2 * 2048
    assert with_teacher["activations: teacher hidden states"] == tokens * 4096 * 2
    assert with_teacher["activations: divergence tiles"] > 0
    assert make_plan(student, kd, alternatives=False).device_total > make_plan(student, sft, alternatives=False).device_total
    for name in ("weights (frozen)", "trainable params (adapters)", "activations: decoder layers"):
        assert with_teacher[name] == base[name], name  # the student's own lines are unchanged
    q = lines(replace(kd, teacher_4bit=True))
    nf4 = P["linear_weights"] * nf4_bytes_per_param(True) + (P["total"] - P["linear_weights"]) * 2
    assert sum(v for k, v in q.items() if k.startswith("teacher weights")) == pytest.approx(nf4)
    z3 = lines(replace(kd, zero_stage=3, gpus_per_node=8))
    assert z3["teacher weights (frozen)"] == P["total"] * 2 / 8  # partitioned like the student
    from trl.kernels import chunked_divergence

    from finetune.plan.memory import KD_TOKEN_TILE, KD_VOCAB_TILE

    assert (KD_TOKEN_TILE, KD_VOCAB_TILE) == (chunked_divergence.TOKEN_CHUNK_SIZE, chunked_divergence.VOCAB_CHUNK_SIZE)
    # the plan offers the 4-bit teacher when the run does not fit
    tight = make_plan(student, replace(kd, device_memory=int(make_plan(student, kd).device_total * 0.8)))
    assert not tight.fits and any("teacher_load_in_4bit" in a["change"] for a in tight.alternatives), tight.alternatives


# ----------------------------------------------------------------------------------------------
# training and evaluation
# ----------------------------------------------------------------------------------------------
def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _independent_kl(student_dir: Path, adapter: Path, teacher_dir: Path, rows: list[dict]) -> dict[str, float]:
    """KL(teacher || model) per assistant token, recomputed with plain transformers + peft: full
    logits, the adapter's tokenizer and chat template; the trained tokens of a turn are its
    content and end-of-turn token, found here from the rendered text by string search."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32),
                                      adapter).eval()
    eot = "<|im_end|>"

    def positions(msgs) -> tuple[list[int], list[int]]:
        text = tok.apply_chat_template(msgs, tokenize=False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        spans, start = [], 0
        for m in msgs:
            at = text.index(m["content"] + eot, start) if m["role"] == "assistant" else None
            if at is not None:
                spans.append((at, at + len(m["content"]) + len(eot)))
                start = at + 1
        trained = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and any(a < e and b > s for s, e in spans)]
        return enc["input_ids"], [i - 1 for i in trained if i > 0]

    def kl(m) -> tuple[float, int]:
        total, n = 0.0, 0
        with torch.no_grad():
            for r in rows:
                ids, pos = positions(r["messages"])
                x = torch.tensor([ids])
                ls = F.log_softmax(m(x).logits[0, pos].double(), -1)
                lt = F.log_softmax(teacher(x).logits[0, pos].double(), -1)
                total += float((lt.exp() * (lt - ls)).sum())
                n += len(pos)
        return total / n, n

    with model.disable_adapter():
        base = kl(model)
    return {"base": base, "tuned": kl(model)}


@pytest.mark.slow
def test_distillation_trains_the_student_towards_the_teacher(tiny_model, tiny_student, chat_data, tmp_path):
    from finetune.config import load_config
    from finetune.eval.evaluation import evaluate
    from finetune.training.recipe import train

    run = tmp_path / "run"
    train(load_config(None, [
        *_base(tiny_student, chat_data, tmp_path), f"data.eval={chat_data['eval']}", "method=distill",
        f"distill.teacher={tiny_model}", "distill.alpha=0.25", "distill.temperature=2", "max_length=128",
        "training.max_steps=12", "training.eval_steps=6", "training.batch_size=8", "training.learning_rate=5e-3",
        "training.logging_steps=1", "training.report_to=[none]", "lora.r=8", "seed=0"]))
    logs = [m for m in _metrics(run) if "loss" in m]
    assert len(logs) == 12
    for m in logs:  # loss = alpha x CE + (1 - alpha) x KD, each per trained token
        assert m["loss"] == pytest.approx(0.25 * m["ce_loss"] + 0.75 * m["kd_loss"], rel=1e-4), m
    assert logs[-1]["kd_loss"] < logs[0]["kd_loss"], logs
    assert any("eval_kd_loss" in m for m in _metrics(run))
    meta = json.loads((run / "adapter" / "finetune.json").read_text())
    assert meta["method"] == "distill" and meta["distill"]["teacher"] == str(Path(tiny_model).resolve())

    # `finetune eval` of the adapter finds the teacher in finetune.json and reports the KL to it
    rows = [json.loads(ln) for ln in chat_data["eval"].read_text().splitlines()][:8]
    held_out = write_jsonl(tmp_path / "held_out.jsonl", rows)
    report = evaluate(data=held_out, adapter=run / "adapter", output=tmp_path / "eval", metrics=["exact_match"],
                      max_new_tokens=2, distributed=False)
    assert report["meta"]["teacher"]["teacher"] == meta["distill"]["teacher"]
    base, tuned = (report["models"][k]["intrinsic"] for k in ("base", "tuned"))
    assert tuned["kl_to_teacher"] < base["kl_to_teacher"], (base, tuned)
    independent = _independent_kl(tiny_student, run / "adapter", tiny_model, rows)
    for label, scores in (("base", base), ("tuned", tuned)):
        kl, n = independent[label]
        assert scores["tokens"] == n, label
        assert scores["kl_to_teacher"] == pytest.approx(kl, rel=1e-4), label
        assert scores["kl_to_teacher_sum"] == pytest.approx(kl * n, rel=1e-4), label
    assert not math.isnan(tuned["kl_to_teacher"])
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "kl_to_teacher" in md


@pytest.mark.slow
def test_distillation_trains_under_bf16_mixed_precision(tiny_model, tiny_student, chat_data, tmp_path):
    """bf16 autocast, as on every bf16 GPU: accelerate then rebuilds the student's outputs from their
    items (convert_outputs_to_fp32). The per-batch CE and KD sums must survive that (one H200 run
    failed its first step when they were attributes outside the items). The CPU has bf16 autocast too."""
    from finetune.config import load_config
    from finetune.training.recipe import train

    run = tmp_path / "run"
    train(load_config(None, [
        *_base(tiny_student, chat_data, tmp_path), "method=distill", f"distill.teacher={tiny_model}",
        "max_length=128", "training.max_steps=2", "training.batch_size=4", "training.precision=bf16",
        "training.logging_steps=1", "training.report_to=[none]", "lora.r=8", "seed=0"]))
    logs = [m for m in _metrics(run) if "kd_loss" in m]
    assert len(logs) == 2 and all(m["kd_loss"] > 0 and m["ce_loss"] > 0 for m in logs), logs


@pytest.mark.distributed
@pytest.mark.slow
def test_distillation_under_zero3_on_two_processes(tiny_model, tiny_student, tmp_path):
    """ZeRO-3 on 2 CPU processes (gloo): the student's and the teacher's weights are partitioned,
    each rank trains on its own examples, the divergence falls, and the adapter is whole."""
    pytest.importorskip("deepspeed")
    import re

    from tests.finetune import test_distributed as D

    data = {"train": write_jsonl(tmp_path / "train.jsonl", make_chat_examples(96, seed=0))}
    held_out = write_jsonl(tmp_path / "eval.jsonl", make_chat_examples(6, seed=1))
    # the post-training eval runs in a fresh process (a DeepSpeed run) and finds the teacher in the adapter
    config, run = D._write_config(tmp_path, tiny_student, data, method="distill",
                                  distill={"teacher": str(tiny_model), "alpha": 0.2, "temperature": 2.0},
                                  eval={"after_train": True, "data": str(held_out), "max_new_tokens": 2,
                                        "metrics": ["exact_match"]})
    res = D._run_ok("deepspeed_zero3.yaml", config)
    why = D._show(res)
    assert json.loads((run / "run.json").read_text())["world_size"] == 2, why
    assert "ZeRO stage 3" in res.stdout, why
    m = re.search(r"teacher +\S+ \(([\d.]+)M params, ([\d.]+)M of them on this rank \(ZeRO-3\)", res.stdout)
    assert m and float(m.group(2)) < 0.75 * float(m.group(1)), why  # the teacher is partitioned too
    p0, p1 = D._probes(run)
    seen0 = {h for b in p0["batches"] for h in b}
    seen1 = {h for b in p1["batches"] for h in b}
    assert seen0 and seen1 and not seen0 & seen1, "ranks saw the same examples"
    logs = [m for m in _metrics(run) if "loss" in m]
    assert len(logs) == D.MAX_STEPS, logs
    for m in logs:
        assert m["loss"] == pytest.approx(0.2 * m["ce_loss"] + 0.8 * m["kd_loss"], rel=1e-4), m
    assert logs[-1]["kd_loss"] < logs[0]["kd_loss"], logs
    D._check_adapter(run, tiny_student)
    report = json.loads((run / "eval" / "report.json").read_text())
    base, tuned = (report["models"][k]["intrinsic"] for k in ("base", "tuned"))
    assert report["meta"]["teacher"]["teacher"] == str(Path(tiny_model).resolve()), report["meta"]
    assert 0 < tuned["kl_to_teacher"] < base["kl_to_teacher"], (base, tuned)


def test_a_4bit_teacher_with_an_adapter_is_frozen_and_scores_as_its_adapter_says(tiny_model, tmp_path):
    pytest.importorskip("bitsandbytes")
    import torch

    from finetune.models.loading import load_tokenizer
    from finetune.models.teacher import load_teacher_model
    from finetune.tiny import build_random_adapter

    adapter = build_random_adapter(tiny_model, tmp_path / "adapter", std=0.5)
    tok = load_tokenizer(str(tiny_model))
    batch = _batch(tok, 2)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    plain = load_teacher_model(str(tiny_model), quant_kwargs={"compute_dtype": torch.float32})
    tuned = load_teacher_model(str(tiny_model), adapter=str(adapter), quant_kwargs={"compute_dtype": torch.float32})
    for teacher in (plain, tuned):
        assert "Linear4bit" in {type(m).__name__ for m in teacher.modules()}
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    h_plain, h_tuned = plain(**kw), tuned(**kw)
    assert h_plain.shape == h_tuned.shape == (int((batch["labels"][:, 1:] != -100).sum()), 64)
    assert not h_plain.requires_grad and (h_plain - h_tuned).abs().max() > 1e-2  # the adapter is applied


def test_a_lora_on_an_output_layer_is_refused_where_the_divergence_reads_it(tiny_model, tiny_student, chat_data,
                                                                           tmp_path):
    from finetune.config import ConfigError, load_config
    from finetune.tiny import build_random_adapter
    from finetune.training.recipe import train

    head_adapter = build_random_adapter(tiny_model, tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
    base = [*_base(tiny_student, chat_data, tmp_path), "method=distill", f"distill.teacher={tiny_model}",
            "training.max_steps=1", "training.report_to=[none]", "max_length=128"]
    with pytest.raises(ConfigError) as e:
        train(load_config(None, [*base, f"distill.teacher_adapter={head_adapter}"]))
    assert e.value.problems[0][0] == "distill.teacher_adapter" and "merge it into the teacher" in e.value.problems[0][1]
    with pytest.raises(ConfigError) as e:
        train(load_config(None, [*base, "lora.target_modules=[q_proj,lm_head]", f"output_dir={tmp_path / 'run2'}"]))
    assert e.value.problems[0][0] == "lora.target_modules" and "modules_to_save" in e.value.problems[0][1]


@pytest.mark.slow
def test_packed_distillation_gives_the_loss_of_padded_batches(tiny_model, tiny_student, chat_data, tmp_path):
    """packing: true with method distill: the teacher sees the same packed rows (position ids, no
    cross-attention), so the first step's loss is the padded run's; and a 4-bit teacher with an
    adapter trains through the same path."""
    pytest.importorskip("bitsandbytes")
    from finetune.config import load_config
    from finetune.tiny import build_random_adapter
    from finetune.training.recipe import train

    common = [*_base(tiny_student, chat_data, tmp_path), "method=distill", f"distill.teacher={tiny_model}",
              "distill.alpha=0.3", "max_length=128", "training.max_steps=2", "training.batch_size=8",
              "training.logging_steps=1", "training.report_to=[none]", "lora.dropout=0", "seed=0"]
    first = {}
    for packing in ("false", "true"):
        run = tmp_path / f"packing-{packing}"
        train(load_config(None, [*common, f"packing={packing}", f"output_dir={run}"]))
        first[packing] = [m for m in _metrics(run) if "loss" in m][0]
    for key in ("loss", "ce_loss", "kd_loss"):
        assert first["true"][key] == pytest.approx(first["false"][key], rel=1e-4), (key, first)
    adapter = build_random_adapter(tiny_model, tmp_path / "teacher_adapter", std=0.5)
    run = tmp_path / "4bit"
    train(load_config(None, [*common, f"output_dir={run}", "distill.teacher_load_in_4bit=true",
                             f"distill.teacher_adapter={adapter}"]))
    logs = [m for m in _metrics(run) if "loss" in m]
    assert len(logs) == 2 and logs[0]["kd_loss"] != pytest.approx(first["false"]["kd_loss"], rel=1e-3)
    meta = json.loads((run / "adapter" / "finetune.json").read_text())["distill"]
    assert meta["teacher_load_in_4bit"] and meta["teacher_quantization"]["quant_type"] == "nf4"
    assert meta["teacher_adapter"] == str(adapter.resolve())


def test_preview_shows_a_distillation_run_its_sft_masks(tiny_model, tiny_student, chat_data, tmp_path):
    from finetune.config import load_config
    from finetune.data.preview import preview_examples

    cfg = load_config(None, [*_base(tiny_student, chat_data, tmp_path), "method=distill", f"distill.teacher={tiny_model}"])
    sft = load_config(None, _base(tiny_student, chat_data, tmp_path))
    shown = preview_examples(cfg, n=2)
    assert shown == preview_examples(sft, n=2) and all(e["n_trained"] > 0 for e in shown)
