"""Files and folders written all or nothing: a reader sees the old version or the new one.

A file is written under a temp name beside it, flushed to disk and renamed over its target; a
folder is built in a temp sibling and swapped in with one rename (on Linux an atomic exchange with
the old folder, so the name never points at nothing). A process killed half-way leaves only a
hidden `.NAME.partial-PID` sibling, which the next writer of NAME removes.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mlxtune.errors import MlxtuneError

# A full disk, a quota or a read-only mount: the user's to fix, so one line, not a traceback.
_STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS sys/stdio.h


def _temp_name(path: Path) -> Path:
    # Keep the suffix: mx.save_safetensors appends ".safetensors" to names without it.
    return path.with_name(f".{path.name}.partial-{os.getpid()}{path.suffix}")


def remove_stale(path: Path) -> None:
    """Remove temp siblings of `path` (whose name may be a glob pattern, e.g. step-*) left by
    writers that were killed: those whose process is gone."""
    for old in path.parent.glob(f".{path.name}.partial-*"):
        pid = old.name.rpartition(".partial-")[2].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(path: Path | str, error: BaseException) -> MlxtuneError | None:
    """A one-line error for a write that failed for lack of space or permission, else None."""
    text = str(error)
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRORS:
        why = error.strerror
    elif isinstance(error, RuntimeError) and text.startswith("[write]"):
        # MLX's writers (mx.save_safetensors) raise RuntimeError("[write] Unable to write N
        # bytes to file.") without an errno; a short write is a full disk or quota.
        why = "the disk is full or over quota"
    else:
        return None
    return MlxtuneError(f"{path}: cannot write ({why}); nothing was replaced. Free some space "
                        "or choose another location")


def write_file(path: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(temp_path)`, flush it to disk and rename it onto `path`; on any error the
    temp file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = _temp_name(path)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        friendly = storage_error(path, e)
        if friendly is not None:
            raise friendly from None
        raise
    _fsync(path.parent)
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    """`data` to `path`, all or nothing."""
    return write_file(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: Path, text: str) -> Path:
    """`text` (UTF-8) to `path`, all or nothing."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data) -> Path:
    """`data` as indented JSON to `path`, all or nothing."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` in one step (Linux renameat2, macOS renamex_np); False where
    neither exists."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    if hasattr(libc, "renameat2"):
        at_fdcwd = -100
        done = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
                              _RENAME_EXCHANGE)
    elif hasattr(libc, "renamex_np"):  # macOS 10.12+; not run on this project's Linux CI
        done = libc.renamex_np(os.fsencode(a), os.fsencode(b), _RENAME_SWAP)
    else:
        return False
    if done == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # a file system without exchange (some network mounts)
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def remove_folder(path: Path) -> None:
    """Delete folder `path` so that it is never seen half-deleted: it is first renamed to a temp
    name (one step), then removed; a kill in between leaves a temp folder the next writer removes."""
    path = Path(path)
    doomed = path.with_name(f".{path.name}.partial-{os.getpid()}")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _sync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            _fsync(file)
    _fsync(folder)


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """A temp folder beside `out` to write into; when the block ends without error it replaces
    `out` in one step, and on any error it is removed and `out` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _sync_tree(tmp)
        if not out.exists():
            tmp.rename(out)
        elif _exchange(tmp, out):
            shutil.rmtree(tmp)  # now the old folder
        else:
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        _fsync(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        friendly = storage_error(out, e)
        if friendly is not None:
            raise friendly from None
        raise
