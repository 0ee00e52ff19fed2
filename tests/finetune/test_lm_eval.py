"""`finetune eval --lm-eval-tasks` on local-file tasks, offline, for the base and the tuned model.

Two tasks written here: a `generate_until` task scored by exact_match (ChatML prompts, the model's
reply ends at `<|im_end|>`) and a `loglikelihood_rolling` task giving word_perplexity and
bits_per_byte. The command runs in a fresh process with no HF_*_OFFLINE variables set: the runner
must switch offline itself before lm-eval and `datasets` are imported.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

QA_TASK = """\
task: kit_price_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "<|im_start|>user\\n{{{{question}}}}<|im_end|>\\n<|im_start|>assistant\\n"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

TEXT_TASK = """\
task: kit_text_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""


@pytest.fixture
def lm_eval_tasks(chat_data, tmp_path):
    pytest.importorskip("lm_eval")
    rows = [json.loads(ln)["messages"] for ln in chat_data["eval"].read_text().splitlines()[:6]]
    qa, text = [], []
    for msgs in rows:
        user = next(m["content"] for m in msgs if m["role"] == "user")
        answer = next(m["content"] for m in msgs if m["role"] == "assistant")
        qa.append({"question": user, "answer": answer})
        text.append({"text": user})
    d = tmp_path / "lm_eval_tasks"
    d.mkdir()
    (d / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    (d / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text))
    (d / "kit_price_qa.yaml").write_text(QA_TASK.format(data=d / "qa.jsonl"))
    (d / "kit_text_ppl.yaml").write_text(TEXT_TASK.format(data=d / "text.jsonl"))
    return d


def test_local_lm_eval_tasks_land_in_the_report(trained_run, tiny_model, chat_data, lm_eval_tasks, tmp_path):
    out = tmp_path / "eval"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # an empty cache: nothing may come from an earlier run
    r = subprocess.run([sys.executable, "-m", "finetune", "eval", "--model", str(tiny_model),
                        "--adapter", str(trained_run / "adapter"), "--data", str(chat_data["eval"]),
                        "--output", str(out), "--max-examples", "4", "--max-new-tokens", "4",
                        "--metrics", "exact_match", "--lm-eval-tasks", "kit_price_qa,kit_text_ppl",
                        "--lm-eval-include", str(lm_eval_tasks)],
                       capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
    report = json.loads((out / "report.json").read_text())
    for label in ("base", "tuned"):
        res = report["models"][label]["lm_eval"]
        assert 0.0 <= res["kit_price_qa"]["exact_match,none"] <= 1.0, res
        ppl = res["kit_text_ppl"]
        assert math.isfinite(ppl["word_perplexity,none"]) and ppl["word_perplexity,none"] > 1, ppl
        assert 0 < ppl["bits_per_byte,none"] < 16, ppl
    base, tuned = (report["models"][k]["lm_eval"]["kit_text_ppl"]["bits_per_byte,none"] for k in ("base", "tuned"))
    assert base != tuned  # the tuned run really had the adapter on
    md = (out / "report.md").read_text()
    for row in ("kit_price_qa/exact_match", "kit_text_ppl/word_perplexity", "kit_text_ppl/bits_per_byte"):
        assert row in md, md


def test_generation_stops_at_end_of_turn(trained_run, tiny_model, lm_eval_tasks, monkeypatch):
    """The raw lm-eval replies of the tuned model hold no `<|im_end|>` and nothing after one."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    adapter = trained_run / "adapter"
    res = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tiny_model},peft={adapter},tokenizer={adapter},dtype=float32",
        tasks=["kit_price_qa"], task_manager=TaskManager(include_path=str(lm_eval_tasks)), device="cpu",
        log_samples=True, gen_kwargs={"max_gen_toks": 24})
    replies = [s["resps"][0][0] for s in res["samples"]["kit_price_qa"]]
    assert len(replies) == 6
    assert all("<|im_end|>" not in r and "<|im_start|>" not in r and len(r) < 24 for r in replies), replies
