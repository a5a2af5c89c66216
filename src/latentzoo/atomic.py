"""Atomic outputs: a stage's result appears complete under its final name, or not at all.

Every writer goes through a temporary sibling (same directory, so the same filesystem) and an `os.replace`, so an
interrupted stage (Ctrl-C, a crash, a full disk) never leaves a half-written file or directory that DVC or the
next stage would take for a finished one.

    with atomic_dir(Path("data/prepared")) as tmp:   # write everything into tmp
        np.save(tmp / "x.npy", x)
    atomic_write_json(Path("metrics.json"), {"loss": 0.1})
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from latentzoo.errors import disk_full
from latentzoo.faults import pause_writing


def _temp_sibling(final: Path, tag: str) -> Path:
    """`.<name>.<tag>-<pid>` next to `final`: hidden, same filesystem, unique per process."""
    return final.parent / f".{final.name}.{tag}-{os.getpid()}"


def _remove(path: Path) -> None:
    """Delete a file, link or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_dir(path: Path) -> None:
    """Persist a rename: fsync the directory holding the entry (best effort; not every OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `final` when the block succeeds.

    On success an existing `final` is moved aside, the new directory renamed into place, and only then the old one
    deleted. On an exception (KeyboardInterrupt included) the temporary directory is removed, `final` is left as
    it was, and the exception propagates; a full disk (ENOSPC) as a DiskFullError naming `final`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final, "tmp")
    _remove(tmp)  # left over from a crashed run with the same pid
    tmp.mkdir()
    try:
        pause_writing(final)  # tests only (LATENTZOO_PAUSE_WRITING)
        yield tmp
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if no_space(err):
            raise disk_full(final) from err
        raise
    old = _temp_sibling(final, "old")
    _remove(old)
    had_old = final.exists() or final.is_symlink()
    if had_old:
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if had_old:
            os.replace(old, final)  # put the previous result back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
    _remove(old)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically: temporary sibling, fsync, then rename over `path` (a full disk: a
    DiskFullError naming `path`, nothing left behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            pause_writing(path)  # tests only (LATENTZOO_PAUSE_WRITING)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if no_space(err):
            raise disk_full(path) from err
        raise
    _fsync_dir(path.parent)


def no_space(err: BaseException) -> bool:
    """Is `err` a full disk (ENOSPC, also as what a library raised from it)?"""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        err = err.__cause__ or err.__context__
    return False


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_text(obj: Any, sort_keys: bool = True) -> str:
    """`obj` as the project writes JSON files: indent 2, sorted keys, a trailing newline; same obj, same bytes."""
    return json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n"


def atomic_write_json(path: str | Path, obj: Any, sort_keys: bool = True) -> None:
    """Write `obj` as JSON (`json_text`) to `path` atomically."""
    atomic_write_text(path, json_text(obj, sort_keys))
