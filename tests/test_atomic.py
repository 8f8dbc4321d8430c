"""mlxtune/atomic.py: every file and folder mlxtune writes is replaced all or nothing."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlxtune.atomic import atomic_folder, storage_error, write_file, write_json, write_text
from mlxtune.errors import MlxtuneError


def test_files_are_replaced_whole_and_a_failed_write_leaves_the_old_one(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}

    def half_then_fail(tmp):
        tmp.write_text('{"x": ')
        raise ValueError("a bug while writing")

    with pytest.raises(ValueError, match="a bug"):
        write_file(path, half_then_fail)
    assert json.loads(path.read_text()) == {"x": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_the_temp_file_keeps_the_suffix_writers_look_at(tmp_path):
    seen = []
    write_file(tmp_path / "w.safetensors", lambda tmp: (seen.append(tmp.suffix),
                                                        tmp.write_bytes(b"x")))
    assert seen == [".safetensors"]


def test_a_folder_is_swapped_in_whole_or_not_at_all(tmp_path):
    out = tmp_path / "model"
    with atomic_folder(out) as tmp:
        (tmp / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "config.json").write_text("new")
            raise RuntimeError("killed half-way")
    assert (out / "config.json").read_text() == "old"
    with atomic_folder(out) as tmp:
        (tmp / "weights").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["weights"]  # nothing of the old one mixed in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_temp_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f".out.partial-{dead}").mkdir()
    (tmp_path / f".f.txt.partial-{dead}.txt").write_text("half")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / f".out.partial-{live.pid}").mkdir()
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "a").write_text("a")
        write_text(tmp_path / "f.txt", "whole")
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            f".out.partial-{live.pid}", "f.txt", "out"]
    finally:
        live.kill()
        live.wait()


def test_the_folder_name_never_points_at_nothing_while_it_is_replaced(tmp_path):
    # A separate process watches the name while this one replaces the folder many times: with a
    # rename-away-then-rename-in swap it would catch the gap; an exchange has none.
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        (tmp / "n").write_text("0")
    watcher = subprocess.Popen([sys.executable, "-c", (
        "import os, sys\n"
        "misses = 0\n"
        "while not os.path.exists(sys.argv[2]):\n"
        "    if not os.path.exists(sys.argv[1]): misses += 1\n"
        "print(misses)\n"), str(out), str(tmp_path / "stop")], stdout=subprocess.PIPE, text=True)
    for i in range(150):
        with atomic_folder(out) as tmp:
            (tmp / "n").write_text(str(i))
    (tmp_path / "stop").touch()
    assert watcher.communicate(timeout=60)[0].strip() == "0"
    assert (out / "n").read_text() == "149"


def test_a_full_disk_is_a_user_error_naming_the_path_and_a_bug_is_not(tmp_path):
    full = storage_error(tmp_path / "x", OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(full, MlxtuneError) and str(full).startswith(f"{tmp_path / 'x'}: cannot write")
    mlx_short_write = RuntimeError("[write] Unable to write 3737952 bytes to file.")
    assert "disk is full" in str(storage_error("w.safetensors", mlx_short_write))
    assert storage_error("x", OSError(errno.EISDIR, "Is a directory")) is None
    assert storage_error("x", RuntimeError("some other failure")) is None


def test_a_removed_folder_goes_in_one_step(tmp_path, monkeypatch):
    import shutil

    from mlxtune.atomic import remove_folder

    old = tmp_path / "step-0000002"
    old.mkdir()
    (old / "state.json").write_text("{}")
    seen = []
    # What rmtree is handed is no longer under the name: a kill during it leaves no step-* behind.
    monkeypatch.setattr(shutil, "rmtree", lambda p, **kw: seen.append(
        (Path(p).name, old.exists())))
    remove_folder(old)
    assert seen == [(f".step-0000002.partial-{os.getpid()}", False)]
