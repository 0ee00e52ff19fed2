import subprocess
import sys

from finetune.cli import COMMANDS


def test_finetune_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "finetune", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout
    # one-line descriptions, not just names
    assert "loss masks" in out.stdout and "Merge an adapter" in out.stdout


def test_data_prep_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "data_prep", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for name in ("build", "run", "validate", "stats"):
        assert f"    {name}" in out.stdout


def test_console_scripts_are_installed():
    import shutil

    for script in ("finetune", "data-prep"):
        assert shutil.which(script) or (sys.prefix and __import__("pathlib").Path(sys.prefix, "bin", script).exists())
