"""Giving back the pages of a memory-mapped checkpoint once a tensor read from it is used up.

transformers reads safetensors through a read-only memory map: every float weight it hands to
halo's quantizer is a view of the file, and each page the quantizer reads stays in the process's
resident set (RSS) until the whole map is closed, which is after the last tensor (or never,
while an unquantized parameter such as the embedding is still a view of it). Loading a model
in 4 bits therefore peaks at the size of the float checkpoint on every rank of a distributed run.
:func:`release_file_pages` drops the pages of one such view once it is quantized
(``madvise(MADV_DONTNEED)``): for file pages nobody wrote, that only forgets this process's
reference (the data stays in the page cache and is read back on the next access), so it is safe
even if the tensor were read again. Anything else (an anonymous copy, a mapping with a written
page, a shared writable map) is left alone.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import torch

__all__ = ["release_file_pages"]

_MADV_DONTNEED = 4
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise


def _clean_file_mapping(start: int, end: int) -> bool:
    """True when [start, end) lies inside one file-backed mapping of this process whose pages all
    still hold the file's bytes: read-only, or private (copy-on-write) with no page written yet
    (smaps' ``Anonymous: 0 kB``). Dropping such pages loses nothing: they are read back from the
    file. torch maps safetensors private and writable, and nothing writes the weights."""
    with open("/proc/self/smaps") as smaps:
        found = None
        for line in smaps:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5:  # a mapping's first line: range perms offset dev inode
                if found is not None:
                    return False  # the mapping ended without an Anonymous line
                low, high = (int(x, 16) for x in head[0].split("-"))
                if low <= start and end <= high:
                    path = head[5].strip() if len(head) == 6 else ""
                    perms = head[1]
                    if not (path.startswith("/") and os.path.isfile(path)):
                        return False
                    if "w" not in perms:
                        return True
                    if not perms.endswith("p"):
                        return False
                    found = (low, high)
            elif found is not None and head[0] == "Anonymous:":
                return int(head[1]) == 0
    return False


def release_file_pages(tensor: torch.Tensor) -> int:
    """Drops the whole pages of ``tensor``'s bytes from this process's RSS when they are a view of
    an unwritten file mapping (a safetensors checkpoint as transformers maps it); returns how many
    bytes were released, 0 when the tensor is not such a view, on another device, or off Linux."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"[release_file_pages] tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return 0
    page = mmap.PAGESIZE
    begin = tensor.data_ptr()
    size = tensor.numel() * tensor.element_size()
    start = -(-begin // page) * page  # whole pages only: neighbours may share the first and last
    end = (begin + size) // page * page
    if end <= start or not _clean_file_mapping(start, end):
        return 0
    if _madvise()(start, end - start, _MADV_DONTNEED) != 0:
        return 0
    return end - start
