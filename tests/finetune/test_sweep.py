"""`finetune sweep`: config checks, trials that fail or prune, resume after kill -9, shared workers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from finetune.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def _write_base(tmp_path: Path, tiny_model: Path, chat_data: dict, **training) -> Path:
    train = {"max_steps": 8, "batch_size": 8, "learning_rate": 5e-3, "eval_steps": 4, "logging_steps": 4,
             "report_to": ["none"], **training}
    base = {"model": str(tiny_model), "output_dir": "unused", "max_length": 128, "seed": 0,
            "data": {"train": str(chat_data["train"]), "eval": str(chat_data["eval"])},
            "training": train, "lora": {"r": 8}}
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def _write_sweep(tmp_path: Path, base: Path, **kw) -> Path:
    sweep = {"base": str(base), "output_dir": str(tmp_path / "out"), "study_name": "t",
             "search_space": {"training.learning_rate": {"type": "loguniform", "low": 1e-3, "high": 1e-2},
                              "lora.r": {"type": "categorical", "choices": [4, 8]}},
             "n_trials": 3, "pruner": "none", **kw}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def _load(storage: str, name: str = "t"):
    import optuna

    from finetune.sweep import make_storage

    return optuna.load_study(study_name=name, storage=make_storage(storage))


def _budget(study) -> list:
    from finetune.sweep import counts_toward_budget

    return [t for t in study.get_trials() if counts_toward_budget(t)]


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
def test_every_problem_of_a_sweep_config_is_reported(tmp_path, tiny_model, chat_data):
    from finetune.sweep import load_sweep_config

    base = _write_base(tmp_path, tiny_model, chat_data)
    path = _write_sweep(tmp_path, base, samplr="tpe", search_space={
        "training.learning_rate": {"type": "loguniform", "low": 0, "high": 1e-2},
        "lora.r": {"type": "categorical"},
        "lora.dropout": {"type": "uniform", "low": 0.0, "high": 0.1, "choices": [0.1]},
    })
    with pytest.raises(ConfigError) as err:
        load_sweep_config(path)
    keys = [k for k, _ in err.value.problems]
    assert "samplr" in keys
    assert any(k.startswith("search_space.training.learning_rate") for k in keys)
    assert any(k.startswith("search_space.lora.r") for k in keys)
    assert any(k.startswith("search_space.lora.dropout") for k in keys)

    # Once the schema passes, each searched value is checked against the training schema.
    path = _write_sweep(tmp_path, base, objective="extrinsic.bleu", search_space={
        "lora.rank": {"type": "int", "low": 4, "high": 8},
        "lora.dropout": {"type": "uniform", "low": 0.5, "high": 1.5},
    })
    with pytest.raises(ConfigError) as err:
        load_sweep_config(path)
    msgs = dict(err.value.problems)
    assert "unknown key" in msgs["search_space.lora.rank"]
    assert "lora.dropout" in msgs["search_space.lora.dropout"]
    objective = [m for k, m in err.value.problems if k == "objective"]
    assert any("eval.data" in m for m in objective) and any("eval.metrics" in m for m in objective)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs/sweep").glob("*.yaml")))
def test_shipped_sweep_configs_parse(name):
    """Schema, sampler/pruner options and the base file; their data and models live elsewhere."""
    from finetune.sweep import SweepConfig, make_pruner, make_sampler

    path = REPO / "configs/sweep" / name
    assert path.read_text().startswith("# "), "a config opens with its launch command"
    sweep = SweepConfig.model_validate(yaml.safe_load(path.read_text()))
    assert (path.parent / sweep.base).resolve().is_file()
    assert make_sampler(sweep) is not None and make_pruner(sweep) is not None


def test_model_choice_sets_model_and_target_modules_together(tmp_path, tiny_model, chat_data):
    import optuna

    from finetune.sweep import load_sweep_config, suggest, trial_config

    base = _write_base(tmp_path, tiny_model, chat_data)
    path = _write_sweep(tmp_path, base, search_space={"model": {"type": "categorical", "choices": [
        {"name": "tiny-attn", "model": str(tiny_model), "lora.target_modules": ["q_proj", "v_proj"]},
        {"name": "tiny-all", "model": str(tiny_model), "lora.target_modules": "all-linear"},
    ]}}, enqueue_base=False)
    sweep = load_sweep_config(path)
    keys = suggest(optuna.trial.FixedTrial({"model": "tiny-attn"}), sweep)
    cfg = trial_config(sweep, keys, tmp_path / "run")
    assert cfg.model == str(tiny_model) and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.output_dir == str(tmp_path / "run")


def test_command_line_overrides_set_the_sweep_files_keys(tmp_path, tiny_model, chat_data):
    from finetune.cli import build_parser
    from finetune.sweep import load_sweep_config

    base = _write_base(tmp_path, tiny_model, chat_data)
    path = _write_sweep(tmp_path, base)
    args = build_parser().parse_args(["sweep", str(path), "n_trials=5", "sampler=random",
                                      "sampler_options.seed=3", "overrides=[lora.r=4]",
                                      f"output_dir={tmp_path / 'other'}", "--workers", "2"])
    assert args.workers == 2
    sweep = load_sweep_config(args.sweep_config, args.overrides)
    assert (sweep.n_trials, sweep.sampler, sweep.sampler_options) == (5, "random", {"seed": 3})
    assert sweep.output_dir == str(tmp_path / "other") and sweep.overrides == ["lora.r=4"]
    assert sweep.search_space["lora.r"].choices == [4, 8]  # the rest is the file's
    assert load_sweep_config(path).n_trials == 3

    with pytest.raises(ConfigError) as err:
        load_sweep_config(path, ["n_trails=5", "n_trials=0"])
    keys = dict(err.value.problems)
    assert "unknown key" in keys["n_trails"] and "n_trials" in keys
    with pytest.raises(ConfigError, match="key=value"):
        load_sweep_config(path, ["n_trials"])


def test_base_is_read_next_to_the_sweep_file_and_a_base_override_from_the_cwd(tmp_path, tiny_model, chat_data,
                                                                              monkeypatch):
    from finetune.sweep import load_sweep_config

    sweeps, cwd = tmp_path / "sweeps", tmp_path / "cwd"
    sweeps.mkdir()
    cwd.mkdir()
    for d in (sweeps, cwd):  # the same relative name in both places
        _write_base(tmp_path, tiny_model, chat_data).rename(d / "base.yaml")
    path = _write_sweep(sweeps, Path("base.yaml"))
    monkeypatch.chdir(cwd)
    assert Path(load_sweep_config(path).base) == sweeps / "base.yaml"
    assert Path(load_sweep_config(path, ["base=base.yaml"]).base).resolve() == cwd / "base.yaml"


def test_nan_loss_stops_the_run():
    from transformers import TrainerControl, TrainerState

    from finetune.sweep import TrialMonitor

    mon = TrialMonitor(trial=None, eval_every_examples=None)
    cb = mon._as_callback()
    control = cb.on_log(None, TrainerState(global_step=7), TrainerControl(), logs={"loss": float("nan")})
    assert control.should_training_stop and "step 7" in mon.diverged


@pytest.mark.parametrize("backend", ["sqlite", "journal"])
def test_a_trial_whose_heartbeat_stopped_is_failed_and_queued_again(tmp_path, tiny_model, chat_data, backend):
    """A worker on another host went silent: after stale_after_s its trial is failed (not counted)
    and its params are queued again (Optuna's heartbeat on SQLite, the trial's own on a journal)."""
    from finetune.sweep import counts_toward_budget, load_sweep_config, open_study, suggest
    from finetune.sweep.worker import _reclaim_dead_trials

    base = _write_base(tmp_path, tiny_model, chat_data)
    sweep = load_sweep_config(_write_sweep(tmp_path, base, stale_after_s=1))
    url = f"journal://{tmp_path / 'study.log'}" if backend == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    study, storage, lock = open_study(sweep, url)
    trial = study.ask()  # the baseline, started by a worker elsewhere
    suggest(trial, sweep)
    trial.set_user_attr("host", "another-host")
    if backend == "sqlite":
        study_id = storage.get_study_id_from_name("t")
        storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number))
    else:
        trial.set_user_attr("heartbeat", time.time())
    with lock.hold():
        assert _reclaim_dead_trials(study, storage, sweep) == [] and study.trials[0].state.name == "RUNNING"
    time.sleep(2.5)
    with lock.hold():
        _reclaim_dead_trials(study, storage, sweep)
    first, retry = study.get_trials()
    assert first.state.name == "FAIL" and not counts_toward_budget(first)
    assert retry.state.name == "WAITING" and retry.params == first.params
    assert retry.user_attrs == {"retry_of": first.number, "baseline": True}


# ----------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_baseline_failure_pruning_and_results(tmp_path, tiny_model, chat_data):
    """A trial that raises is FAIL with its error and the sweep goes on; results are written."""
    from finetune.sweep import load_sweep_config, run_sweep

    base = _write_base(tmp_path, tiny_model, chat_data, max_steps=12)
    path = _write_sweep(tmp_path, base, n_trials=4, sampler="grid", pruner="median",
                        pruner_options={"n_startup_trials": 1}, search_space={
                            "training.learning_rate": {"type": "categorical", "choices": [1e-4, 5e-3]},
                            "lora.target_modules": {"type": "categorical",
                                                    "choices": ["all-linear", ["no_such_module"]]}})
    base_cfg = yaml.safe_load(base.read_text())
    base_cfg["lora"]["target_modules"] = "all-linear"
    base.write_text(yaml.safe_dump(base_cfg))
    sweep = load_sweep_config(path)
    summary = run_sweep(sweep)

    study = _load(f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    trials = study.get_trials()
    assert len(trials) == 4  # the whole grid, the baseline being one of its points
    baseline = next(t for t in trials if t.user_attrs.get("baseline"))
    assert baseline.state.name == "COMPLETE"
    assert baseline.params == {"training.learning_rate": 5e-3, "lora.target_modules": "all-linear"}
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 2 and all(t.params["lora.target_modules"] != "all-linear" for t in failed)
    assert all("error" in t.user_attrs for t in failed)
    for t in trials:
        run_dir = tmp_path / "out" / "trials" / f"trial-{t.number:04d}"
        assert (run_dir / "config.yaml").is_file()
        assert load_config(run_dir / "config.yaml").output_dir == str(run_dir)
    out = tmp_path / "out"
    csv_text = (out / "trials.csv").read_text()
    assert csv_text.count("\n") == 5 and "fail" in csv_text
    assert summary["baseline_trial"] == baseline.number
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # no grid point run twice
    best = load_config(out / "best_config.yaml")
    assert not Path(best.output_dir).exists()
    assert best.training.learning_rate == pytest.approx(study.best_trial.params["training.learning_rate"])
    assert (out / "optimization_history.png").stat().st_size > 1000
    # The median pruner (1 startup trial) compares a trial with the completed ones. The grid runs the
    # baseline before the other all-linear point (lr 1e-4), which learns slower, so that one is pruned
    # at its first eval; the baseline itself is never pruned.
    slow = next(t for t in trials if t.params == {"training.learning_rate": 1e-4, "lora.target_modules": "all-linear"})
    assert slow.datetime_start > baseline.datetime_complete, "the grid no longer runs the baseline first"
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert [t.number for t in pruned] == [slow.number], [(t.number, t.state.name) for t in trials]
    for t in pruned:
        assert t.user_attrs["pruned_at_step"] < 12


@pytest.mark.slow
def test_objective_from_finetune_eval_scores(tmp_path, tiny_model, chat_data):
    """objective: extrinsic.exact_match scores each tuned adapter on eval.data (maximized)."""
    from finetune.sweep import load_sweep_config, run_sweep

    base = _write_base(tmp_path, tiny_model, chat_data)
    raw = yaml.safe_load(base.read_text())
    raw["eval"] = {"data": str(chat_data["eval"]), "max_new_tokens": 6, "metrics": ["exact_match", "f1"]}
    base.write_text(yaml.safe_dump(raw))
    sweep = load_sweep_config(_write_sweep(tmp_path, base, n_trials=2, objective="extrinsic.f1"))
    assert sweep.resolved_direction == "maximize"
    summary = run_sweep(sweep)
    assert summary["states"] == {"complete": 2}
    for n in (0, 1):
        scores = yaml.safe_load((tmp_path / "out" / "trials" / f"trial-{n:04d}" / "sweep_scores.json").read_text())
        assert scores["extrinsic"]["n"] == 24
    study = _load(f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert [t.value for t in study.trials] == [
        yaml.safe_load((tmp_path / "out" / "trials" / f"trial-{n:04d}" / "sweep_scores.json").read_text())
        ["extrinsic"]["f1"] for n in (0, 1)]


@pytest.mark.slow
def test_a_dpo_sweep_optimises_held_out_preference_accuracy(tmp_path, tiny_model, chat_data):
    """objective: preference.<score> scores each tuned adapter on the preference pairs of eval.data."""
    from finetune.config import ConfigError
    from finetune.eval.preference import read_preference_records, score_preferences
    from finetune.inference.load import load_for_inference
    from finetune.sweep import load_sweep_config, run_sweep
    from tests.conftest import write_jsonl
    from tests.finetune.test_preference import parity_pairs

    train_rows, held = parity_pairs(48, 24)
    base = _write_base(tmp_path, tiny_model, chat_data, eval_steps=None, logging_steps=2, max_steps=4)
    raw = yaml.safe_load(base.read_text())
    raw.update(method="dpo", data={"train": str(write_jsonl(tmp_path / "pairs.jsonl", train_rows))},
               eval={"data": str(write_jsonl(tmp_path / "held.jsonl", held))})
    base.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="unknown preference score 'accuracy'"):
        load_sweep_config(_write_sweep(tmp_path, base, objective="preference.accuracy"))
    with pytest.raises(ConfigError, match="holds preference pairs: use preference"):
        load_sweep_config(_write_sweep(tmp_path, base, objective="intrinsic.nll"))
    sweep = load_sweep_config(_write_sweep(tmp_path, base, n_trials=2, objective="preference.logp_margin"))
    assert sweep.resolved_direction == "maximize"
    assert run_sweep(sweep)["states"] == {"complete": 2}
    study = _load(f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    records, _ = read_preference_records(tmp_path / "held.jsonl")
    for t in study.trials:  # the trial's value is the tuned adapter's score, recomputed here
        model, tok = load_for_inference(Path(t.user_attrs["run_dir"]) / "adapter")
        assert t.value == pytest.approx(score_preferences(model, tok, records)[0]["logp_margin"], rel=1e-5)


@pytest.mark.slow
def test_a_distillation_sweep_minimises_the_held_out_kl_to_the_teacher(tmp_path, tiny_model, chat_data):
    """objective: intrinsic.kl_to_teacher scores each distilled adapter against the run's teacher."""
    from transformers import AutoModelForCausalLM

    from finetune.config import ConfigError
    from finetune.eval.evaluation import intrinsic_scores, read_eval_records
    from finetune.inference.load import load_for_inference
    from finetune.sweep import load_sweep_config, run_sweep
    from finetune.tiny import build_tiny_model

    student = build_tiny_model(tmp_path / "student", tokenizer_from=tiny_model, hidden_size=32, layers=2, heads=4,
                               kv_heads=2, max_positions=512, seed=1)
    base = _write_base(tmp_path, student, chat_data, eval_steps=None, logging_steps=2, max_steps=4)
    raw = yaml.safe_load(base.read_text())
    raw["eval"] = {"data": str(chat_data["eval"]), "max_examples": 12}
    base.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"method \(sft\) trains against no teacher"):
        load_sweep_config(_write_sweep(tmp_path, base, objective="intrinsic.kl_to_teacher"))
    raw.update(method="distill", distill={"teacher": str(tiny_model), "alpha": 0.5})
    base.write_text(yaml.safe_dump(raw))
    sweep = load_sweep_config(_write_sweep(tmp_path, base, n_trials=2, objective="intrinsic.kl_to_teacher"))
    assert sweep.resolved_direction == "minimize"
    assert run_sweep(sweep)["states"] == {"complete": 2}
    study = _load(f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    records, _ = read_eval_records(chat_data["eval"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    for t in study.trials:  # the trial's value is the distilled adapter's KL, recomputed here
        model, tok = load_for_inference(Path(t.user_attrs["run_dir"]) / "adapter")
        kl = intrinsic_scores(model, tok, [r["messages"] for r in records[:12]], teacher=teacher)["kl_to_teacher"]
        assert t.value == pytest.approx(kl, rel=1e-4) and t.value > 0


@pytest.mark.slow
def test_killed_sweep_resumes_with_finished_trials(tmp_path, tiny_model, chat_data):
    """kill -9 after >= 2 finished trials; the same command again finishes the study, keeping them."""
    base = _write_base(tmp_path, tiny_model, chat_data, max_steps=24, eval_steps=8)
    n_trials = 7
    path = _write_sweep(tmp_path, base, n_trials=n_trials)
    storage = f"sqlite:///{tmp_path / 'out' / 'study.db'}"
    cmd = [sys.executable, "-m", "finetune.sweep", str(path)]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    finished_before: dict[int, float] = {}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        # Read the storage only once the sweep has created its tables and started a trial: two
        # processes creating a new SQLite schema at once race ("table ... already exists").
        if not (tmp_path / "out" / "trials").is_dir():
            continue
        try:
            done = [t for t in _load(storage).get_trials() if t.state.name == "COMPLETE"]
        except Exception:  # study not created yet
            continue
        if len(done) >= 2:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    before = {t.number: t for t in _load(storage).get_trials()}
    finished_before = {n: t.value for n, t in before.items() if t.state.name == "COMPLETE"}
    running_before = [n for n, t in before.items() if t.state.name == "RUNNING"]
    assert 2 <= len(finished_before) < n_trials

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    after = {t.number: t for t in _load(storage).get_trials()}
    for n, value in finished_before.items():
        assert after[n].state.name == "COMPLETE" and after[n].value == value  # kept, not re-run
    counted = _budget(_load(storage))
    assert len(counted) == n_trials and all(t.state.name == "COMPLETE" for t in counted)
    # The re-run samples new params: it does not replay the first run's random draws.
    assert len({tuple(sorted(t.params.items())) for t in counted}) == n_trials
    # The trial the kill interrupted: failed (not counted), its params queued again.
    for n in running_before:
        assert after[n].state.name == "FAIL" and "error" not in after[n].user_attrs
        retry = [t for t in after.values() if t.user_attrs.get("retry_of") == n]
        assert len(retry) == 1 and retry[0].params == after[n].params
    second_pids = {t.user_attrs["pid"] for t in counted if t.number not in finished_before}
    assert len(second_pids) == 1 and len([t for t in counted if t.number not in finished_before]) == \
        n_trials - len(finished_before)


def _check_shared(storage: str, out: Path, n_trials: int) -> None:
    trials = _budget(_load(storage))
    numbers = [t.number for t in trials]
    assert len(trials) == n_trials and len(set(numbers)) == n_trials
    assert all(t.state.name == "COMPLETE" for t in trials)
    dirs = {t.user_attrs["run_dir"] for t in trials}
    assert len(dirs) == n_trials and all(Path(d).is_dir() for d in dirs)
    assert sorted(p.name for p in (out / "trials").iterdir()) == sorted(Path(d).name for d in dirs)
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers ran trials
    assert len({tuple(sorted(t.params.items())) for t in trials}) == n_trials  # not the same draws twice


def _run_two_workers(tmp_path: Path, tiny_model, chat_data, storage: str, n_trials: int = 4) -> None:
    # Trials long enough (a few seconds) that the second worker is up before the first one is done.
    base = _write_base(tmp_path, tiny_model, chat_data, max_steps=24, eval_steps=8)
    path = _write_sweep(tmp_path, base, n_trials=n_trials)
    res = subprocess.run([sys.executable, "-m", "finetune.sweep", str(path), "--storage", storage,
                          "--workers", "2"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    _check_shared(storage, tmp_path / "out", n_trials)
    assert (tmp_path / "out" / "trials.csv").read_text().count("\n") == n_trials + 1


@pytest.mark.slow
def test_spawned_workers_get_the_command_line_overrides(tmp_path, tiny_model, chat_data):
    """`--workers 2` with n_trials and output_dir overridden: both workers run the overridden sweep
    (the file says 3 trials into out/)."""
    base = _write_base(tmp_path, tiny_model, chat_data, max_steps=4, eval_steps=2)
    path = _write_sweep(tmp_path, base, n_trials=3)
    other = tmp_path / "other"
    res = subprocess.run([sys.executable, "-m", "finetune.sweep", str(path), "n_trials=2", f"output_dir={other}",
                          "--workers", "2"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    trials = _budget(_load(f"sqlite:///{other / 'study.db'}"))
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)
    assert sorted(p.name for p in (other / "trials").iterdir()) == ["trial-0000", "trial-0001"]
    assert not (tmp_path / "out").exists()
    assert (other / "trials.csv").read_text().count("\n") == 3


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["journal", "sqlite"])
def test_two_workers_share_a_file_study(tmp_path, tiny_model, chat_data, backend):
    storage = (f"journal://{tmp_path / 'journal' / 'study.log'}" if backend == "journal"
               else f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    _run_two_workers(tmp_path, tiny_model, chat_data, storage)


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on a unix socket in a temp dir (skipped without the binaries)."""
    pytest.importorskip("psycopg2", reason="pip install psycopg2-binary")
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")) if Path("/usr/lib/postgresql").is_dir() else []
    initdb = str(bins[-1]) if bins else shutil.which("initdb")
    if not initdb:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    # The server refuses to run as root; the Debian package's `postgres` user runs it then.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user and not shutil.which("runuser"):
        pytest.skip("running as root without runuser")
    d = Path(tempfile.mkdtemp(prefix="sweep-pg-"))
    if as_user:
        shutil.chown(d, "postgres")
    data, log = d / "data", d / "server.log"
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(log), "-w", "-o",
                    f"-k {d} -c listen_addresses='' -c fsync=off", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@/postgres?host={d}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study(tmp_path, tiny_model, chat_data, postgres_url):
    _run_two_workers(tmp_path, tiny_model, chat_data, postgres_url)


@pytest.mark.slow
def test_model_selection_compares_two_base_models_end_to_end(tmp_path, tiny_model, chat_data):
    """`model` as a categorical parameter: two different base models (a 4-layer and a 1-layer
    Llama, each with its own LoRA targets) train on the same data, objective and budget; the table
    names both, and best_config.yaml carries the winner's model and target modules together."""
    import json

    from finetune.sweep import load_sweep_config, run_sweep
    from finetune.tiny import build_tiny_model

    small = build_tiny_model(tmp_path / "small", [chat_data["train"]], hidden_size=64, layers=1)
    base = _write_base(tmp_path, tiny_model, chat_data, max_steps=12)
    choices = [{"name": "tiny-4l", "model": str(tiny_model), "lora.target_modules": "all-linear"},
               {"name": "tiny-1l", "model": str(small), "lora.target_modules": ["q_proj", "v_proj"]}]
    path = _write_sweep(tmp_path, base, n_trials=2, sampler="grid", search_space={
        "model": {"type": "categorical", "choices": choices}})
    summary = run_sweep(load_sweep_config(path))
    assert summary["states"] == {"complete": 2}
    study = _load(f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    by_model = {t.params["model"]: t for t in study.trials}
    assert set(by_model) == {"tiny-4l", "tiny-1l"}
    for name, t in by_model.items():
        run = tmp_path / "out" / "trials" / f"trial-{t.number:04d}"
        cfg = load_config(run / "config.yaml")
        want = next(c for c in choices if c["name"] == name)
        assert cfg.model == want["model"] and cfg.lora.target_modules == want["lora.target_modules"]
        adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert adapter_cfg["base_model_name_or_path"] == want["model"]
    assert by_model["tiny-4l"].value != by_model["tiny-1l"].value  # really different models were trained
    best = load_config(tmp_path / "out" / "best_config.yaml")
    winner = next(c for c in choices if c["name"] == study.best_trial.params["model"])
    assert best.model == winner["model"] and best.lora.target_modules == winner["lora.target_modules"]
    assert "tiny-1l" in (tmp_path / "out" / "trials.csv").read_text()


def test_cmaes_sampler_runs_a_sweep(tmp_path, tiny_model, chat_data):
    """cmaes is a dependency: the evolutionary sampler works out of the box."""
    from finetune.sweep import load_sweep_config, run_sweep

    base = _write_base(tmp_path, tiny_model, chat_data, max_steps=4, eval_steps=2)
    path = _write_sweep(tmp_path, base, n_trials=3, sampler="cmaes", search_space={
        "training.learning_rate": {"type": "loguniform", "low": 1e-3, "high": 1e-2},
        "lora.dropout": {"type": "uniform", "low": 0.0, "high": 0.1}})
    summary = run_sweep(load_sweep_config(path))
    assert summary["states"] == {"complete": 3}
    study = _load(f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    # trials after the first were drawn by CMA-ES, which records its generation on each of them
    assert any(k.startswith("cma:") for t in study.trials for k in t.system_attrs), \
        [t.system_attrs for t in study.trials]


def test_a_preference_objective_needs_the_kind_of_record_it_scores(tmp_path, tiny_model, chat_data):
    from finetune.config import ConfigError
    from finetune.sweep import load_sweep_config
    from tests.conftest import write_jsonl
    from tests.finetune.test_preference import price_pairs

    pairs = price_pairs(4, 1)
    unpaired = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in pairs]
    base = _write_base(tmp_path, tiny_model, chat_data, eval_steps=None)
    raw = yaml.safe_load(base.read_text())
    for name, rows, objective in (("pairs", pairs, "preference.unpaired_logp_margin_per_token"),
                                  ("unpaired", unpaired, "preference.logp_margin")):
        raw.update(method="kto", data={"train": str(write_jsonl(tmp_path / f"{name}.jsonl", rows))},
                   eval={"data": str(tmp_path / f"{name}.jsonl")})
        base.write_text(yaml.safe_dump(raw))
        needs = "unpaired" if name == "pairs" else "paired"
        with pytest.raises(ConfigError, match=f"scored on {needs} records; eval.data .*{name}.jsonl has none"):
            load_sweep_config(_write_sweep(tmp_path, base, objective=objective))
    # the unpaired margin on unpaired records is accepted, and maximised
    assert load_sweep_config(_write_sweep(tmp_path, base, objective="preference.unpaired_logp_margin_per_token")
                             ).resolved_direction == "maximize"
