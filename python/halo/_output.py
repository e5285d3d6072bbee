"""Writing an output folder safely next to its inputs (used by ``halo merge``).

- ``check_disjoint``: refuse an output that is, contains or lies inside an input
  (compared by device and inode, so symlinks and bind mounts cannot hide it).
- ``TempFolder``: ``.OUT.halo-tmp-PID`` beside the output, owned by this process;
  ``remove_stale`` deletes the ones whose process is dead (SIGKILL, power cut).
- ``signals_raise``: SIGTERM and SIGHUP raise ``Interrupted`` as SIGINT raises
  ``KeyboardInterrupt``, so the temp folder is cleaned up; ``blocked`` defers them
  while the output is swapped in.
- ``replace_folder``: puts the finished temp folder in place of the output with
  ``renameat2(RENAME_EXCHANGE)``, so the output path never stops existing; where the
  file system cannot exchange, two renames with a short window.
- ``fsync_tree``: fsync every file and folder of the temp folder before the swap.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import signal
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "Interrupted",
    "TempFolder",
    "blocked",
    "check_disjoint",
    "fsync_folder",
    "fsync_tree",
    "remove_path",
    "remove_stale",
    "replace_folder",
    "signals_raise",
]

_OWNER = ".halo-owner"
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived (``signum``); raised like KeyboardInterrupt so cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _ancestors(path: Path) -> Iterator[tuple[int, int]]:
    """(device, inode) of `path` (when it exists) and of every existing folder above it."""
    for p in (path, *path.parents):
        ident = _identity(p)
        if ident is not None:
            yield ident


def check_disjoint(fn: str, out: Path, inputs: Iterable[tuple[Path, str]]) -> None:
    """ValueError when `out` is, contains or lies inside one of `inputs` ((path, what) pairs)."""
    out = Path(os.path.abspath(out))
    out_id = _identity(out)
    # out itself and the folders holding it, by the path as written and as resolved
    above_out = set(_ancestors(out)) | set(_ancestors(Path(os.path.realpath(out))))
    for path, what in inputs:
        path_id = _identity(path)
        if path_id is None:
            continue
        if path_id in above_out:
            relation = "is" if path_id == out_id else "lies inside"
            raise ValueError(f"[{fn}] --out {out} {relation} the {what} {path}; choose another output folder")
        if out_id is not None and out_id in set(_ancestors(Path(os.path.realpath(path)))):
            raise ValueError(f"[{fn}] --out {out} contains the {what} {path}; choose another output folder")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _temp_name(out: Path, kind: str, pid: int) -> Path:
    return out.parent / f".{out.name}.halo-{kind}-{pid}"


def remove_stale(out: Path) -> list[Path]:
    """Deletes ``.OUT.halo-tmp-PID`` / ``.OUT.halo-old-PID`` folders beside `out` whose process
    is gone (this host's, judged by the owner note inside; folders from other hosts are kept)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.halo-(?:tmp|old)-(\d+)")
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    host = socket.gethostname()
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            owner_host = (entry / _OWNER).read_text().strip()
        except OSError:
            owner_host = host  # no note: the old output swapped out by a commit that was killed
        if owner_host != host or entry.is_symlink() or not entry.is_dir():
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


class TempFolder:
    """``.OUT.halo-tmp-PID`` beside `out`, with an owner note for ``remove_stale``."""

    def __init__(self, out: Path):
        self.path = _temp_name(out, "tmp", os.getpid())
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
        (self.path / _OWNER).write_text(socket.gethostname() + "\n")

    def drop_owner_note(self) -> None:
        (self.path / _OWNER).unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


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


def replace_folder(tmp: Path, out: Path) -> Path | None:
    """Moves `tmp` to `out`. When `out` exists it is exchanged atomically with `tmp`, and the
    path now holding the old output is returned for the caller to delete."""
    if not out.exists() and not out.is_symlink():
        os.rename(tmp, out)
        return None
    if _exchange(tmp, out):
        return tmp
    # No RENAME_EXCHANGE (e.g. some network file systems): out is missing between the renames.
    old = _temp_name(out, "old", os.getpid())
    os.rename(out, old)
    os.rename(tmp, out)
    return old


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path, folder: bool) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if folder else os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (folder and exc.errno == errno.EINVAL):  # some file systems cannot sync folders
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync of every file below `folder`, then of the folders themselves."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name, folder=False)
        _fsync(Path(root), folder=True)


def fsync_folder(folder: Path) -> None:
    _fsync(folder, folder=True)
