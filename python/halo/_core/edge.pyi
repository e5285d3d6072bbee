from typing import Any

import numpy as np

WIRE_VERSION: int
FEC_MAX_K: int

def now() -> float: ...
def make_control(json: bytes, version: int = ...) -> bytes: ...
def decode(message: bytes) -> dict[str, Any]: ...
def make_partial(
    step: int, pos: int, layer: int, part: int, group: int, row0: int, rows: np.ndarray
) -> bytes: ...
def make_parity(set: int, members: list[bytes]) -> bytes: ...
def keygen() -> bytes: ...
def aes256gcm_available() -> bool: ...

class Transport:
    def __init__(
        self,
        protocol: str,
        host: str = "",
        port: int = 0,
        max_peers: int = 8,
        key: bytes | None = None,
        max_message_bytes: int = 67108864,
        aes: bool = True,
    ) -> None: ...
    @property
    def protocol(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def datagram_payload(self) -> int: ...
    @property
    def auth_failures(self) -> int: ...
    def connect(self, host: str, port: int, timeout: float) -> int: ...
    def send(self, peer: int, data: bytes, delivery: str) -> bool: ...
    def flush(self) -> None: ...
    def poll(self, timeout: float) -> tuple[str, int, bytes, float] | None: ...
    def disconnect(self, peer: int, now: bool = True) -> None: ...
    def connected(self, peer: int) -> bool: ...
    def stats(self, peer: int) -> dict[str, float]: ...
    def send_input(
        self,
        peer: int,
        step: int,
        pos: int,
        layer: int,
        part: int,
        critical: list[int],
        rows: np.ndarray,
        delivery: str = "control",
        flags: int = 0,
    ) -> bool: ...
    def send_partial(
        self,
        peer: int,
        step: int,
        pos: int,
        layer: int,
        part: int,
        group: int,
        rows: np.ndarray,
        delivery: str,
        duplicate: bool = False,
    ) -> int: ...
    def send_partials(
        self,
        peer: int,
        step: int,
        pos: int,
        layer: int,
        part: int,
        groups: list[int],
        rows: np.ndarray,
        delivery: str,
        fec: int = 0,
    ) -> int: ...
    def gather(
        self,
        step: int,
        layer: int,
        part: int,
        out: np.ndarray,
        peer_of_group: list[int],
        critical: list[int],
        deadline: float,
        hard_deadline: float,
        wait_all: bool = False,
        fec: bool = False,
    ) -> dict[str, Any]: ...
