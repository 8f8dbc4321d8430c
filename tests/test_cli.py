"""The command line as a user meets it: its name, its version, flags that read as flags, and
every user error as one red line (one per problem for a config) with exit code 2, no traceback.

Errors are checked in-process (typer's CliRunner sees exactly what a terminal does); the real
entry point runs in a subprocess only where the process itself matters.
"""

import os
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mlxtune.cli import app


def invoke(*args: str):
    """Run `mlxtune ARGS` in this process; the result has exit_code, stdout and stderr."""
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="mlxtune")


def assert_one_line_error(result, message: str, exit_code: int = 2, quiet: bool = True) -> None:
    """Exit `exit_code`, exactly `error: ...message...` on stderr and, if `quiet`, nothing on
    stdout (a command that reports progress has said something before it failed)."""
    assert result.exit_code == exit_code, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in result.stderr and (result.stdout == "" or not quiet)


def test_help_names_the_command_and_flags_take_no_value():
    # A real process: the BLAS re-exec runs the CLI as `python -m mlxtune` underneath.
    out = subprocess.run([sys.executable, "-m", "mlxtune", "train", "--help"],
                         capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("Usage: mlxtune train [OPTIONS]")
    assert "--dry-run  " in out and "<bool>" not in out


def test_version_prints_mlxtune_mlx_and_mlx_lm():
    from importlib.metadata import version

    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip().startswith(f"mlxtune {version('mlxtune')} (mlx ")
    assert f"mlx-lm {version('mlx-lm')}" in result.output


@pytest.mark.parametrize("args, message", [
    (["train", "missing.yaml"], "missing.yaml: no such config file"),
    (["models", "path", "no/such-model"], "'no/such-model' is not in the Hugging Face cache"),
    (["models", "path", "./nope.gguf"], "no model './nope.gguf'"),
    (["fuse", "--out", "y", "--adapter", "."], ": not an adapter folder (no adapters.safetensors)"),
    (["fuse", "--out", "y"], "give exactly one of --run runs/NAME or --adapter DIR"),
    (["serve", "--run", "."], ": not an adapter folder"),
    (["eval", "--data", "missing", "--model", "m", "--out", "o"], "missing: no such file"),
    (["prepare", "missing.jsonl", "--out", "o"], "missing.jsonl"),
])
def test_user_errors_are_one_line_and_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(invoke(*args), message)
    assert not (tmp_path / "o").exists() and not (tmp_path / "y").exists()


def test_a_config_error_is_one_line_per_problem(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rat: 1\nbatch_size: 0\n")
    result = invoke("train", config, "--dry-run")
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), lines
    assert "learning_rat" in lines[0] and "learning_rate" in lines[0]
    assert "batch_size" in lines[1]


def test_a_taken_port_fails_before_anything_loads(tiny_qmodel_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = invoke("serve", "--model", tiny_qmodel_dir, "--port", port)
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}")
    assert "pick another --port" in result.stderr


def test_the_installed_entry_point_prints_one_line_and_exits_2(tmp_path):
    # The real process, through main(): the fast-BLAS re-exec must keep the exit code and line.
    proc = subprocess.run([sys.executable, "-m", "mlxtune", "train", str(tmp_path / "no.yaml")],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'no.yaml'}: no such config "
                                                "file"]


def test_a_full_disk_anywhere_is_one_line_and_a_bug_keeps_its_traceback():
    import errno

    import typer

    from mlxtune.cli import _Commands

    demo = typer.Typer(cls=_Commands)

    @demo.command()
    def write(kind: str) -> None:
        if kind == "full":
            raise OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.jsonl")
        raise OSError(errno.EBADF, "Bad file descriptor")

    @demo.command()
    def other() -> None:  # two commands, so `write` is a subcommand, as mlxtune's are
        pass

    full = CliRunner().invoke(demo, ["write", "full"])
    assert_one_line_error(full, "runs/x/metrics.jsonl: cannot write (No space left on device)")
    bug = CliRunner().invoke(demo, ["write", "bug"])
    assert bug.exit_code == 1 and isinstance(bug.exception, OSError)
