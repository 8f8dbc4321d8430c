"""The command line as a user meets it: its name, its version, flags that read as flags."""

import subprocess
import sys

from typer.testing import CliRunner

from mlxtune.cli import app


def test_help_names_the_command_and_flags_take_no_value():
    # A real process: the BLAS re-exec runs the CLI as `python -m mlxtune` underneath.
    out = subprocess.run([sys.executable, "-m", "mlxtune", "train", "--help"],
                         capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("Usage: mlxtune train [OPTIONS]")
    assert "--dry-run  " in out and "<bool>" not in out


def test_version_prints_mlxtune_mlx_and_mlx_lm():
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"], prog_name="mlxtune")
    assert result.exit_code == 0
    assert result.output.strip().startswith(f"mlxtune {version('mlxtune')} (mlx ")
    assert f"mlx-lm {version('mlx-lm')}" in result.output
