"""The plumbing under ``halo._output``'s guard: signals that clean up, atomic swaps, fsync.

- ``signals_raise``: SIGTERM and SIGHUP raise ``Interrupted`` as SIGINT raises
  ``KeyboardInterrupt``, so temp outputs are removed on the way out; ``blocked`` defers
  all three while an output is swapped in or a temp removed.
- ``replace_path``: puts a finished temp file or folder in place of the output with
  ``renameat2(RENAME_EXCHANGE)`` when the output exists, so its path never stops existing;
  where the file system cannot exchange, two renames with a short window.
- ``fsync_tree`` / ``fsync_path``: data on disk before the rename makes it visible.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "Interrupted",
    "blocked",
    "fsync_path",
    "fsync_tree",
    "pid_alive",
    "remove_path",
    "replace_path",
    "signals_raise",
]

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived (``signum``); raised like KeyboardInterrupt so cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While active (main thread only), SIGTERM and SIGHUP raise ``Interrupted``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def blocked() -> Iterator[None]:
    """Defers SIGINT, SIGTERM and SIGHUP (delivered when the block ends)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps the names `a` and `b`; False where the system or file system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def replace_path(tmp: Path, out: Path, old: Path) -> Path | None:
    """Moves `tmp` to `out`. When `out` exists it is exchanged atomically with `tmp` (or, where
    the file system cannot, renamed to `old` first); returns the path now holding the old
    output, for the caller to delete, or None."""
    if not out.exists() and not out.is_symlink():
        os.rename(tmp, out)
        return None
    if _exchange(tmp, out):
        return tmp
    os.rename(out, old)  # no RENAME_EXCHANGE (e.g. some network file systems): a short gap
    os.rename(tmp, out)
    return old


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def fsync_path(path: Path) -> None:
    folder = path.is_dir()
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if folder else os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (folder and exc.errno == errno.EINVAL):  # some file systems cannot sync folders
            raise
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync of every file below `path` (or of `path` itself, a file), then of the folders."""
    if not path.is_dir():
        fsync_path(path)
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))
