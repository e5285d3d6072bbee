"""The one output-path guard of every halo command that writes a file or folder
(``halo merge``, ``export-gguf``, ``import-gguf``, ``hwq``, ``edge store``, ``edge local --json``).

``output(command, out, inputs, kind=..., force=..., halo_made=...)`` checks `out` before a
byte is written and yields an ``Output`` whose ``temp`` the command writes; ``commit()``
puts it in place. The rules (docs/cli.md):

- ``out`` is resolved (symlinks followed, the Hugging Face cache's snapshot -> blob links
  included) and compared by device and inode with every input, each file of an input
  folder and what each links to: an output that is, lies inside or contains an input is
  refused, whatever spelling or link leads there.
- An existing target must be of the kind written (a regular file, or a folder): device
  nodes, FIFOs and sockets are refused, with or without ``--force``.
- An existing target (a non-empty folder) is replaced only with ``force``, and only when
  halo wrote it: a folder holds ``.halo-output.json`` listing its files and nothing
  else; a file carries the command's own mark (``halo_made``: GGUF key ``halo.output``,
  the group store's format, a JSON key).
- The output is written to ``.NAME.halo-tmp-PID`` beside the target and renamed (swapped
  with ``renameat2(RENAME_EXCHANGE)`` when the target exists), so the target is always
  either the old output or the new one. SIGTERM / SIGHUP raise ``Interrupted`` (SIGINT
  ``KeyboardInterrupt``) and the temp output is removed; temp outputs of runs that were
  killed (their pid is gone) are removed when the next run writes the same target.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ._atomic import (
    Interrupted,
    blocked,
    fsync_path,
    fsync_tree,
    pid_alive,
    remove_path,
    replace_path,
    signals_raise,
)

__all__ = ["MARKER", "Interrupted", "Output", "output", "remove_stale"]

MARKER = ".halo-output.json"  # in every folder halo writes: which command, which files
_OWNER = ".halo-owner"  # in a temp folder while it is written: the host, for remove_stale
_MARKER_LIMIT = 16 << 20


def _fail(command: str, message: str) -> None:
    raise ValueError(f"[{command}] {message}")


def _kind_name(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "folder"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symlink"),
    ):
        if test(mode):
            return name
    return "special file"


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _ancestors(path: Path) -> list[tuple[int, int]]:
    """(device, inode) of `path` (when it exists) and of every existing folder above it."""
    return [i for i in map(_identity, (path, *path.parents)) if i is not None]


def _input_items(inputs: Iterable[tuple[str | os.PathLike, str]]) -> Iterator[tuple[Path, str]]:
    """Each input, and each entry of an input folder (what it links to is found by stat)."""
    for raw, what in inputs:
        path = Path(os.path.abspath(os.fspath(raw)))
        yield path, what
        if path.is_dir():
            label = what.removesuffix(" folder") + " file"
            with contextlib.suppress(OSError):
                for entry in sorted(path.iterdir()):
                    yield entry, label


def _check_disjoint(command: str, flag: str, given: Path, path: Path, inputs) -> None:
    out_id = _identity(path)
    above_out = set(_ancestors(given)) | set(_ancestors(path))
    for item, what in _input_items(inputs):
        item_id = _identity(item)
        if item_id is None:
            continue
        if item_id in above_out:
            relation = "is" if item_id == out_id else "lies inside"
            _fail(command, f"{flag} {given} {relation} the {what} {item}; choose another output")
        if out_id is not None and (
            out_id in _ancestors(item) or out_id in _ancestors(Path(os.path.realpath(item)))
        ):
            _fail(command, f"{flag} {given} contains the {what} {item}; choose another output")


def _folder_files(folder: Path) -> list[str]:
    """Every non-folder entry below `folder` (symlinks to folders included), relative, sorted."""
    found = []
    for root, dirs, names in os.walk(folder):
        rel = Path(root).relative_to(folder)
        found += [(rel / n).as_posix() for n in names]
        found += [(rel / d).as_posix() for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(found)


def _not_halos_folder(folder: Path) -> str | None:
    """Why `folder` is not an output halo wrote (None when it is)."""
    marker = folder / MARKER
    try:
        st = marker.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MARKER_LIMIT:
            raise ValueError
        note = json.loads(marker.read_text(encoding="utf-8"))
        listed = set(note["files"])
        if not str(note["writer"]).startswith("halo "):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        return f"{folder} has no valid {MARKER}, so halo did not write it"
    for name in _folder_files(folder):
        if name != MARKER and name not in listed:
            return f"{folder} holds {name!r}, which halo did not write"
    return None


class Output:
    """A checked output path: write ``temp`` (a file path, or a folder that exists), then
    ``commit()``. Made by ``output()``."""

    def __init__(self, command: str, given: Path, path: Path, kind: str, fsync: bool):
        self.command, self.given, self.path, self.kind, self.fsync = command, given, path, kind, fsync
        self.temp = _temp_name(path, "tmp", os.getpid())
        self.committed = False
        self._seen = _state(path)  # what was checked; commit() refuses if it changed since

    def _begin(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.path)
        remove_path(self.temp)
        if self.kind == "folder":
            self.temp.mkdir()
            (self.temp / _OWNER).write_text(socket.gethostname() + "\n")

    def commit(self) -> None:
        """Puts the finished temp output in place of the target (the old one, if any, is removed)."""
        if self.kind == "folder":
            (self.temp / _OWNER).unlink(missing_ok=True)
            files = [f for f in _folder_files(self.temp) if f != MARKER]
            note = {"writer": "halo " + self.command.replace("_", "-"), "files": files}
            (self.temp / MARKER).write_text(json.dumps(note, indent=1) + "\n", encoding="utf-8")
        elif not self.temp.is_file():
            _fail(self.command, f"internal error: {self.temp} was not written")
        if self.fsync:
            fsync_tree(self.temp)
        with blocked():  # a signal now would leave the swap half done: defer it
            if _state(self.path) != self._seen:
                _fail(self.command, f"{self.given} changed while halo was writing; it was left as it is")
            old = replace_path(self.temp, self.path, _temp_name(self.path, "old", os.getpid()))
            if self.fsync:
                fsync_path(self.path.parent)
            self.committed = True
            if old is not None:
                remove_path(old)

    @contextlib.contextmanager
    def writing(self) -> Iterator[Output]:
        """With SIGTERM / SIGHUP raising ``Interrupted``: stale temps removed, the temp output
        made (a folder) or named (a file); it is removed unless ``commit()`` ran in the block."""
        with signals_raise():
            try:
                self._begin()
                yield self
            finally:
                if not self.committed:
                    self._discard()

    def _discard(self) -> None:
        with blocked():
            for entry in _own_temps(self.path):
                remove_path(entry)


def _state(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mode, st.st_mtime_ns


def _temp_name(out: Path, kind: str, pid: int) -> Path:
    return out.parent / f".{out.name}.halo-{kind}-{pid}"


def _temp_pattern(out: Path) -> re.Pattern:
    # .NAME.halo-tmp-PID, .NAME.halo-old-PID, and the temp names halo's C++ writers derive
    # from a temp path: ..NAME.halo-tmp-PID.halo-tmp-PID (GGUF), .NAME.halo-tmp-PID.tmp-PID (stores)
    return re.compile(rf"\.\.?{re.escape(out.name)}\.halo-(?:tmp|old)-(\d+)(?:\.halo-tmp-\d+|\.tmp-\d+)?")


def _own_temps(out: Path) -> list[Path]:
    pattern, pid = _temp_pattern(out), str(os.getpid())
    with contextlib.suppress(OSError):
        return [e for e in out.parent.iterdir() if (m := pattern.fullmatch(e.name)) and m.group(1) == pid]
    return []


def remove_stale(out: Path) -> list[Path]:
    """Deletes temp outputs beside `out` whose process is gone: files, and folders whose owner
    note names this host (or that have none: an old output swapped out by a killed commit)."""
    pattern, removed, host = _temp_pattern(out), [], socket.gethostname()
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))) or entry.is_symlink():
            continue
        if entry.is_dir():
            try:
                owner_host = (entry / _OWNER).read_text().strip()
            except OSError:
                owner_host = host
            if owner_host != host:
                continue
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file():
            entry.unlink(missing_ok=True)
        else:
            continue
        removed.append(entry)
    return removed


def check(
    command: str,
    out: str | os.PathLike,
    inputs: Iterable[tuple[str | os.PathLike, str]],
    kind: str,
    force: bool = False,
    halo_made: Callable[[Path], bool] | None = None,
    fsync: bool = True,
    flag: str = "--out",
) -> Output:
    """Every rule of the module docstring, checked before anything is written (ValueError
    naming the command, ``flag`` and the path)."""
    if kind not in ("file", "folder"):
        raise ValueError(f"[{command}] kind must be 'file' or 'folder', got {kind!r}")
    raw = os.fspath(out)
    if not isinstance(raw, str) or not raw or "\0" in raw:
        _fail(command, f"{flag} must be a non-empty path, got {raw!r}")
    given = Path(os.path.abspath(raw))
    path = Path(os.path.realpath(given))
    _check_disjoint(command, flag, given, path, inputs)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return Output(command, given, path, kind, fsync)
    except OSError as exc:
        _fail(command, f"{flag} {given}: {exc.strerror}")
    found = _kind_name(st.st_mode)
    if found != kind:  # kind is "file" or "folder", as _kind_name names them
        wanted = "a regular file" if kind == "file" else "a folder"
        _fail(command, f"{flag} {given} is a {found}; halo writes its output only as {wanted}")
    if kind == "folder" and not any(path.iterdir()):
        return Output(command, given, path, kind, fsync)
    if not force:
        what = "exists and is not empty" if kind == "folder" else "exists"
        _fail(command, f"{flag} {given} {what} (use --force to replace an output halo wrote)")
    if kind == "folder":
        why = _not_halos_folder(path)
    else:
        try:
            made = halo_made is not None and halo_made(path)
        except Exception:  # unreadable, damaged, not the format: not halo's output
            made = False
        why = None if made else f"{path} does not carry halo's output mark, so halo did not write it"
    if why is not None:
        _fail(command, f"--force replaces only an output halo wrote: {why}")
    return Output(command, given, path, kind, fsync)


def output(
    command: str, out: str | os.PathLike, *args: Any, **options: Any
) -> contextlib.AbstractContextManager[Output]:
    """``check(...).writing()``: the checked target, its temp output ready to be written."""
    return check(command, out, *args, **options).writing()
