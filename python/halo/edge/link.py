"""What the edge runtime lets onto its links: addresses, the pre-shared key, frame and JSON limits.

A worker is a network service. Its links are sealed with a 32-byte pre-shared key (the C++
transport runs a mutual handshake, then seals every message; see docs/edge.md, "Threat
model"); plaintext only with an explicit ``insecure`` and only on loopback addresses. Every
message is bounded before it is parsed: frames by the largest message the model needs, control
JSON by length and nesting depth.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

from .._core import edge as _edge
from .model import EdgeError, Spec

KEY_BYTES = 32
KEY_ENV = "HALO_EDGE_KEY_FILE"
JSON_DEPTH = 8  # the deepest legitimate control message ("assign": object > list > list) is 3
HEADER_BYTES = 32


class Refused(EdgeError):
    """A peer's message broke a rule: ends that session; the text goes to the peer (no paths)."""


# ----------------------------------------------------------------------------------------------
# Addresses


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """``"10.0.0.2:7000"`` -> ("10.0.0.2", 7000): a numeric IPv4 address (the transports are
    IPv4 only; a name would be resolved behind the user's back) and a port in [0, 65535]."""
    text = str(text).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise EdgeError(f"bad {what} {text!r} (expected HOST:PORT, e.g. 127.0.0.1:7000)")
    if ":" in host or host.startswith("["):
        raise EdgeError(f"bad {what} {text!r}: IPv6 is not supported (the transports are IPv4 only)")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise EdgeError(f"bad {what} {text!r}: {host!r} is not a numeric IPv4 address") from None
    return host, int(port)


def is_loopback(host: str) -> bool:
    return ipaddress.IPv4Address(host).is_loopback


# ----------------------------------------------------------------------------------------------
# The pre-shared key


def write_key(path: str | os.PathLike) -> Path:
    """``halo edge keygen --out FILE``: a new random key as 64 hex digits, mode 0600, never
    over an existing file (written beside it, then linked into place: all or nothing)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise EdgeError(f"{path} exists (a key is never overwritten; remove it first)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise EdgeError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_edge.keygen().hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if the name appeared meanwhile: no overwrite
        except FileExistsError:
            raise EdgeError(f"{path} exists (a key is never overwritten; remove it first)") from None
        except OSError as exc:
            raise EdgeError(f"{path}: cannot write ({exc.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_key(path: str | os.PathLike) -> bytes:
    """The key in ``path``: a regular file of 64 hex digits that only its owner can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise EdgeError(f"key file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise EdgeError(f"key file {path}: not a regular file")
        if info.st_mode & 0o077:
            raise EdgeError(
                f"key file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}): chmod 600 it"
            )
        raw = os.read(fd, 256)
    finally:
        os.close(fd)
    text = raw.decode("ascii", "replace").strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise EdgeError(f"key file {path}: expected {KEY_BYTES} bytes as 64 hex digits (halo edge keygen)")
    return bytes.fromhex(text)


def choose_key(key_file: str | None, insecure: bool, hosts: list[str]) -> bytes | None:
    """The CLI's policy: a key from ``--key-file`` or $HALO_EDGE_KEY_FILE, or plaintext with an
    explicit ``--insecure`` on loopback addresses only; anything else is a one-line error."""
    source = "--key-file"
    if key_file is None and os.environ.get(KEY_ENV):
        key_file, source = os.environ[KEY_ENV], KEY_ENV
    if insecure:
        if key_file is not None:
            raise EdgeError(f"--insecure and a key ({source}) contradict each other: choose one")
        outside = [h for h in hosts if not is_loopback(h)]
        if outside:
            raise EdgeError(f"--insecure is refused on a non-loopback address ({outside[0]}): use --key-file")
        return None
    if key_file is None:
        raise EdgeError(
            f"no key: pass --key-file FILE (or set {KEY_ENV}; make one with 'halo edge keygen --out FILE'), "
            "or --insecure on loopback"
        )
    return read_key(key_file)


def check_key(key: bytes | None, hosts: list[str]) -> bytes | None:
    """The Python API's policy: ``key`` (32 bytes) seals the links; None (plaintext) is
    accepted on loopback addresses only. (The CLI also wants an explicit ``--insecure``.)"""
    if key is None:
        outside = [h for h in hosts if not is_loopback(h)]
        if outside:
            raise EdgeError(f"no key: plaintext links are refused on a non-loopback address ({outside[0]})")
        return None
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise EdgeError(f"key must be {KEY_BYTES} bytes (halo edge keygen), got {type(key).__name__}")
    return bytes(key)


# ----------------------------------------------------------------------------------------------
# Limits derived from the model


def json_limit(spec: Spec) -> int:
    """Bytes of the longest control message a session of this model needs: an ``assign``
    naming every group at one neuron per group (about 16 bytes a group), plus room."""
    return 8192 + 16 * spec.layers * (spec.heads + spec.inter)


def frame_limit(spec: Spec) -> int:
    """Bytes of the largest message of a session: an input of max_positions rows (float16)
    with every group of a part named critical, or the longest control message."""
    groups = max(spec.heads, spec.inter)
    rows = HEADER_BYTES + 2 * groups + 2 * spec.max_positions * spec.hidden
    return max(rows, HEADER_BYTES + json_limit(spec))


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(data: bytes) -> int:
    """Nesting depth of a JSON text, counted without parsing (strings removed first)."""
    plain = np.frombuffer(_STRING.sub(b'""', data), dtype=np.uint8)
    if plain.size == 0:
        return 0
    step = (plain == ord("[")).astype(np.int64) + (plain == ord("{"))
    step -= (plain == ord("]")).astype(np.int64) + (plain == ord("}"))
    return int(np.cumsum(step).max(initial=0))


def parse_control(data: bytes | str, limit: int) -> dict[str, Any]:
    """A control message's JSON object, its length and depth checked before it is parsed;
    ValueError (one line) for anything else."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if len(data) > limit:
        raise ValueError(f"control message of {len(data)} bytes exceeds {limit}")
    if json_depth(data) > JSON_DEPTH:
        raise ValueError(f"control message nested deeper than {JSON_DEPTH}")
    try:
        body = json.loads(data)
    except RecursionError:  # not reachable after the depth check; kept as a second wall
        raise ValueError("control message nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"control message is not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ValueError("control message is not a JSON object")
    return body


def make_transport(protocol: str, host: str, port: int, peers: int, key: bytes | None, frame: int) -> Any:
    """A transport with the session's key (None: plaintext) and frame limit; one-line errors
    for a busy port or an address this host does not have."""
    try:
        return _edge.Transport(protocol, host, port, peers, key=key, max_message_bytes=frame)
    except (RuntimeError, OSError, ValueError) as exc:
        where = f"{host or '0.0.0.0'}:{port}"
        raise EdgeError(f"cannot open {protocol} on {where} ({' '.join(str(exc).split())})") from None
