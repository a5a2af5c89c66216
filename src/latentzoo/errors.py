"""The project's error types and the one-line error reporting every stage entry point uses.

A user error (bad params, a corrupt image, a shard whose checksum changed) is a `LatentzooError`: the entry point
prints one line naming the file, field or shard and exits non-zero, with no traceback unless LATENTZOO_DEBUG=1.
"""

from __future__ import annotations

import functools
import os
import select
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])

EXIT_USER_ERROR = 2


class LatentzooError(Exception):
    """Base of every error a user can fix (bad input, bad params); its message says what and where."""


class ConfigError(LatentzooError):
    """params.yaml (or an override) is invalid: names the key and the value."""


class DataError(LatentzooError):
    """An input file or image is unreadable, corrupt or inconsistent: names the file."""


class ShardError(LatentzooError):
    """A shard or manifest is missing, truncated or no longer matches its checksum: names the shard."""


class TrainingError(LatentzooError):
    """Training failed past the configured retries; names the run and where its checkpoints are."""


class DiskFullError(LatentzooError):
    """No space left on the device an output or checkpoint is written to: names the path and the space left."""


def disk_full(path: str | os.PathLike, what: str = "writing it", fix: str = "or write it elsewhere") -> DiskFullError:
    """The DiskFullError for `path` (ENOSPC while `what`), with the free space of its filesystem."""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free / 2**20
    return DiskFullError(
        f"{path}: no space left on device while {what} ({free:.1f} MiB free on its filesystem); free some space, {fix}"
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, like Ctrl-C's KeyboardInterrupt: `finally` blocks and the temporary
    outputs' clean-up run before the process exits."""


_sigterm = threading.Event()  # set once SIGTERM arrived (a library may re-raise it as a plain KeyboardInterrupt)


def _raise_terminated(signum, frame) -> None:
    # A second SIGTERM (the scheduler's, then DVC's death's), or one after Ctrl-C: the clean-up under way ends it.
    if _sigterm.is_set() or isinstance(sys.exc_info()[1], KeyboardInterrupt):
        return
    _sigterm.set()
    signal.alarm(0)  # a Ray driver's abseil handler, if it ran first, armed a 3 s abort: the clean-up may take longer
    raise Terminated()


def restore_sigterm(handler) -> None:
    """Put back the SIGTERM handler `ray.init` replaced (Ray's own exits at once, and its abseil handler aborts the
    process 3 s later), so a stopped stage still cleans up its temporary outputs and exits 143."""
    if handler is _raise_terminated and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _quiet_unraisable(unraisable) -> None:
    if isinstance(unraisable.exc_value, SystemExit):
        return  # a signal handler's exit, raised inside a weakref callback or __del__, which Python cannot raise
    sys.__unraisablehook__(unraisable)


def quiet_signal_exits() -> None:
    """In a Ray worker: don't print a traceback when its exit lands where Python cannot raise it.

    Ray stops a worker with SIGTERM, and the worker's handler raises SystemExit wherever the worker is. Inside a
    weakref callback or a `__del__` (a garbage collection in progress) Python can only report such an exception:
    "Exception ignored in … Traceback … SystemExit: 1", which Ray forwards to the stage's console as the worker
    goes. That report says nothing a user can act on (the worker is stopping either way), so it is dropped; every
    other unraisable exception is reported as before."""
    sys.unraisablehook = _quiet_unraisable


SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish", "busybox"})


def _parent(pid: int) -> tuple[int, str]:
    """(parent pid, command name) of process `pid`, from /proc/<pid>/stat: `pid (comm) state ppid …`."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
    return int(rest.split()[1]), comm


def dvc_process() -> int:
    """The pid of the `dvc repro` running this stage: the nearest ancestor that is not a shell. DVC runs a stage's
    `cmd` with `$SHELL -c` (or `/bin/sh -c`); bash execs a lone command, dash stays between DVC and the stage."""
    pid = os.getppid()
    while pid > 1:
        parent, comm = _parent(pid)
        if comm not in SHELLS:
            return pid
        pid = parent
    return pid


def _terminate_when_gone(pidfd: int) -> None:
    select.select([pidfd], [], [])  # a pidfd turns readable when its process has exited
    os.kill(os.getpid(), signal.SIGTERM)


def stop_with_dvc() -> None:
    """Under DVC (which sets DVC_STAGE in every stage command's environment), send this process SIGTERM when the
    `dvc repro` running it dies, with or without a shell between them (a thread waits on DVC's pidfd). A
    scheduler's SIGTERM to DVC alone, or DVC killed for memory, then stops the stage as a SIGTERM would (exit 143,
    temporary outputs removed) instead of leaving it to write outputs no DVC will record. A stage run by hand
    (`nohup ... &` included) is left alone."""
    if "DVC_STAGE" not in os.environ or not hasattr(os, "pidfd_open"):
        return
    dvc = dvc_process()
    try:
        pidfd = os.pidfd_open(dvc)
    except ProcessLookupError:
        pidfd = None
    if pidfd is None or dvc_process() != dvc:  # DVC is gone already
        os.kill(os.getpid(), signal.SIGTERM)
        return
    threading.Thread(target=_terminate_when_gone, args=(pidfd,), name="stop-with-dvc", daemon=True).start()


def cli_errors(fn: F) -> F:
    """Decorate a `main()`: a LatentzooError becomes one line on stderr and exit status 2; SIGINT (130) and
    SIGTERM (143) end it with one line after the temporary outputs are removed (`stop_with_dvc`: also when the
    `dvc repro` running it dies)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_terminated)
            stop_with_dvc()
        try:
            return fn(*args, **kwargs)
        except LatentzooError as err:
            if os.environ.get("LATENTZOO_DEBUG"):
                raise
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt as err:
            if os.environ.get("LATENTZOO_DEBUG"):
                raise
            terminated = isinstance(err, Terminated) or _sigterm.is_set()
            what = "terminated" if terminated else "interrupted"
            print(f"{what}: nothing was written under the final output names", file=sys.stderr)
            if threading.current_thread() is threading.main_thread():  # the exit's own clean-up runs undisturbed
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise SystemExit(143 if terminated else 130) from None

    return wrapper  # type: ignore[return-value]
