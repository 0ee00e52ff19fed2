"""Start-up: a command imports what it needs when it needs it. `finetune --help` and a config error
load no torch; training, evaluation and inference modules load no DeepSpeed (only a DeepSpeed run
does), no matplotlib (only a report), no Optuna (only a sweep), no TRL (only preference training).
bitsandbytes is imported by peft itself whenever it is installed (peft.helpers), so it is not
checked here."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def _loaded(code: str, names: tuple[str, ...]) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(n for n in {names!r} if n in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(out.stdout.split())


def test_the_cli_and_its_help_load_no_ml_library():
    heavy = ("torch", "transformers", "peft", "datasets", "deepspeed", "bitsandbytes", "trl", "matplotlib")
    code = ("import contextlib, io\nfrom finetune.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass")
    assert _loaded(code, heavy) == set()


def test_training_evaluation_and_inference_modules_load_only_what_every_run_needs():
    optional = ("deepspeed", "matplotlib", "optuna", "trl", "lm_eval", "sacrebleu")
    code = "import finetune.training.recipe, finetune.eval.evaluation, finetune.inference.load, finetune.plan.memory, finetune.data.cache"
    assert _loaded(code, optional) == set()


def test_the_public_names_stay_functions_after_every_module_is_imported():
    """`from finetune import evaluate` once gave the module finetune.evaluate, not the function, when
    that module had been imported before (importing a submodule sets the package's attribute of that
    name, which a lazy export cannot override): no public name may be a module's name too."""
    code = ("import importlib, pkgutil, finetune\n"
            "for m in pkgutil.walk_packages(finetune.__path__, 'finetune.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "from finetune import *\n"
            "bad = [n for n in finetune.__all__ if not callable(getattr(finetune, n)) or type(getattr(finetune, n))"
            ".__name__ == 'module']\n"
            "print('BAD', bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BAD []" in out.stdout, out.stdout[-2000:]
