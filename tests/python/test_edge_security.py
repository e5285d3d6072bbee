"""halo.edge on a hostile network: a worker process under attack from peers on loopback (and,
where sealing is built, across namespaces of tests/net/testbed.py), each case followed by the
legitimate root's run, which must give bit for bit the result it got before any attack (the
same runtime and wire; that result itself agrees with the model's local float32 reference).

Cases: oversized, empty and forged datagrams; garbage and oversized TCP frames; nested and
huge JSON before and after hello; floods of connections that never authenticate; takeover by
an empty or unauthenticated connection; hijack, forgery and replay of sealed traffic; paths on
the wire; hostile numbers after load (threads, group sizes, delivery modes, widths, rows,
positions); NaN and malformed partials from a fake worker to the root; one-line CLI errors.
Every loop is bounded in count and time; namespaces are torn down by the test bed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from halo import edge
from halo._core import edge as core
from halo.cli import main as halo_main
from halo.edge.link import read_key, write_key
from halo.edge.model import ATTN, FFN
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "net"))
import testbed  # noqa: E402 - lives beside the tests, not in the package

IDS = [5, 17, 3, 99]
MAX_POSITIONS = 64


def _env() -> dict[str, str]:
    import halo

    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(halo.__file__).parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("HALO_EDGE_KEY_FILE", None)
    return env


def _transport(protocol: str, host: str = "", port: int = 0, key: bytes | None = None, peers: int = 2):
    return core.Transport(protocol, host, port, peers, key=key)


# ----------------------------------------------------------------------------------------------
# The model, the key, the worker under attack and the legitimate root


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=MAX_POSITIONS,
    )
    path = tmp_path_factory.mktemp("other_llama")
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    return write_key(tmp_path_factory.mktemp("key") / "edge.key")


@pytest.fixture(scope="module")
def key(key_file) -> bytes:
    return read_key(key_file)


class WorkerProcess:
    """``halo edge worker`` in a process of its own (so a crash is seen as one), its log kept."""

    def __init__(self, model: Path, key_file: Path, *args: str) -> None:
        secure = ["--key-file", str(key_file)]
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "halo.cli", "edge", "worker", "--listen", "127.0.0.1:0"),
                *("--model", str(model), *secure, *args),
            ],
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        line = self.proc.stderr.readline()
        m = re.search(r"listening on (\S+)", line)
        assert m, f"worker did not start: {line!r}"
        self.address = m.group(1)
        self.host, port = self.address.rsplit(":", 1)
        self.port = int(port)
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line.rstrip())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def worker(model, key_file):
    w = WorkerProcess(model, key_file)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def plan(model):
    return edge.make_plan(model, 1, calibration_tokens=0, group_size=48)


def _legit_run(model, address: str, plan, key, policy: str):
    """The legitimate root: a prefill and one decode step; returns the logits of both."""
    with edge.Root(
        str(model), [address], plan, policy=policy, key=key, connect_timeout=20.0, log=None
    ) as root:
        first = root.forward(IDS, 0)
        second = root.forward([int(first[-1].argmax())], len(IDS))
        assert not root.stats.dead and root.stats.delivered_fraction() == 1.0
    return torch.cat([first, second])


@pytest.fixture(scope="module")
def baseline(model, worker, plan, key):
    """What the legitimate root gets from the untouched worker, per wait-for-all policy."""
    local = edge.Local(str(model), group_size=48)
    first = local.forward(IDS, 0)
    reference = torch.cat([first, local.forward([int(first[-1].argmax())], len(IDS))])
    runs = {}
    for policy in ("tcp", "reliable-udp"):
        runs[policy] = _legit_run(model, worker.address, plan, key, policy)
        # float16 on the wire: close to the float32 reference, same next tokens
        torch.testing.assert_close(runs[policy], reference, rtol=0.02, atol=0.02)
        assert runs[policy].argmax(-1).tolist() == reference.argmax(-1).tolist()
    return runs


def _still_serves(model, worker, plan, key, baseline) -> None:
    """The case's verdict: the worker process lives and gives the legitimate root, over both
    transports, exactly the result it gave before the attack."""
    assert worker.alive(), "\n".join(worker.log[-20:])
    for policy, expected in baseline.items():
        got = _legit_run(model, worker.address, plan, key, policy)
        assert torch.equal(got, expected), policy


class Peer:
    """A hand-driven peer: one connection, raw messages, bounded waits."""

    def __init__(self, worker, key, protocol: str = "tcp") -> None:
        self.t = _transport(protocol, key=key)
        self.peer = self.t.connect(worker.host, worker.port, 5.0)

    def send(self, message: bytes) -> None:
        self.t.send(self.peer, message, "control")
        self.t.flush()

    def control(self, body: dict | bytes) -> None:
        self.send(core.make_control(body if isinstance(body, bytes) else json.dumps(body).encode()))

    def answer(self, timeout: float = 10.0) -> dict:
        """The next control answer, or {"type": "disconnected"}."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            event = self.t.poll(0.05)
            if event is None:
                continue
            if event[0] == "disconnect":
                return {"type": "disconnected"}
            if event[0] == "message":
                msg = core.decode(event[2])
                if msg["kind"] == "control":
                    return json.loads(msg["json"])
        raise AssertionError(f"no answer within {timeout} s")

    def refused(self, word: str) -> str:
        """Expects an error naming ``word``, then the worker closing the connection."""
        answer = self.answer()
        assert answer["type"] == "error" and word in answer["message"], answer
        assert self.answer()["type"] == "disconnected"
        return answer["message"]

    def hello(self) -> None:
        self.control({"type": "hello", "version": core.WIRE_VERSION})
        assert self.answer()["type"] == "hello"

    def load(self, fingerprint: str, **fields) -> None:
        body = {"type": "load", "fingerprint": fingerprint, "group_size": 48, "heads_per_group": 2}
        self.control({**body, **fields})

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.t.disconnect(self.peer, True)


def _fp(model) -> str:
    from halo.edge.model import fingerprint

    return fingerprint(model)


# ----------------------------------------------------------------------------------------------
# Before any session: datagrams, frames, floods, empty connections


def test_oversized_empty_and_forged_datagrams(model, worker, plan, key, baseline):
    rng = np.random.default_rng(0)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for size in (0, 1, 4, 12, 4097, 9000, 65507):
            s.sendto(rng.bytes(size), (worker.host, worker.port))
        # ENet-looking headers (peer id, sent time, command bytes) with random bodies.
        for i in range(300):
            head = bytes([0x80 | (i & 0x0F), i & 0xFF, 0, 0, (i % 12) + 1, 0xFF])
            s.sendto(head + rng.bytes(int(rng.integers(0, 1400))), (worker.host, worker.port))
            if i % 50 == 49:
                time.sleep(0.01)
    finally:
        s.close()
    _still_serves(model, worker, plan, key, baseline)


def test_garbage_and_oversized_tcp_frames(model, worker, plan, key, baseline):
    frames = [
        (2**31).to_bytes(4, "little") + b"x" * 64,  # a frame length of 2 GiB
        (2**28 - 1).to_bytes(4, "little") + b"\0" * 4096,
        b"\xff" * 4096,
        b"GET / HTTP/1.0\r\n\r\n",
    ]
    for data in frames:
        with (
            socket.create_connection((worker.host, worker.port), timeout=5) as s,
            contextlib.suppress(OSError),
        ):
            s.sendall(data)
            s.settimeout(2)
            s.recv(64)  # the worker closes it, or says nothing: both fine
    _still_serves(model, worker, plan, key, baseline)


def test_floods_of_connections_that_never_authenticate(model, worker, plan, key, baseline):
    held = []
    try:
        for _ in range(24):  # more than the worker's peer slots, all held open, silent
            with contextlib.suppress(OSError):
                held.append(socket.create_connection((worker.host, worker.port), timeout=2))
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(2000):  # ENet connect-looking datagrams
            s.sendto(bytes([0xFF, 0xFF, 0, 0, 0x82, 0]) + os.urandom(40), (worker.host, worker.port))
            if i % 200 == 199:
                time.sleep(0.01)
        s.close()
        # The legitimate root gets in while the flood is still connected.
        _still_serves(model, worker, plan, key, baseline)
    finally:
        for s in held:
            s.close()


def test_an_empty_connection_is_no_session(model, key_file, plan, key):
    """``--sessions 1``: a connection that sends nothing (or garbage) neither counts as the one
    session nor ends the worker; the legitimate root is served, then the worker exits 0."""
    w = WorkerProcess(model, key_file, "--sessions", "1", "--idle-timeout", "60")
    try:
        with socket.create_connection((w.host, w.port), timeout=5):
            time.sleep(0.3)
        with socket.create_connection((w.host, w.port), timeout=5) as s:
            s.sendall(b"\x00" * 1000)
            time.sleep(0.3)
        with contextlib.suppress(ConnectionError):  # the wrong key: refused in the handshake
            Peer(w, os.urandom(32))
        peer = Peer(w, None)  # no key: a plaintext hello to a sealed worker
        peer.control({"type": "hello", "version": core.WIRE_VERSION})
        time.sleep(0.3)
        peer.close()
        time.sleep(0.3)
        assert w.alive(), "\n".join(w.log)
        got = _legit_run(model, w.address, plan, key, "tcp")
        assert torch.isfinite(got).all()
        assert w.proc.wait(30) == 0
    except BaseException:
        w.stop()
        raise


# ----------------------------------------------------------------------------------------------
# JSON


def test_nested_and_huge_json_before_and_after_hello(model, worker, plan, key, baseline):
    deep = b"[" * 100_000 + b"]" * 100_000
    for before_hello in (True, False):
        for body in (deep, b'{"type": "load", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"):
            peer = Peer(worker, key)
            if not before_hello:
                peer.hello()
            peer.control(body)
            answer = peer.answer()
            if answer["type"] == "error":
                assert (
                    "nested" in answer["message"]
                    or "exceeds" in answer["message"]
                    or "hello" in answer["message"]
                ), answer
                answer = peer.answer()
            assert answer["type"] == "disconnected"
            peer.close()
    peer = Peer(worker, key)
    peer.hello()
    peer.control(b'{"type": "sync", "id": 1, "pad": "' + b"x" * (1 << 20) + b'"}')  # 1 MiB of JSON
    answer = peer.answer()
    assert answer["type"] in ("error", "disconnected"), answer
    peer.close()
    _still_serves(model, worker, plan, key, baseline)


def test_control_json_is_bounded_before_it_is_parsed(monkeypatch):
    from halo.edge import link as edge_link

    assert edge_link.parse_control(b'{"a": "[[[[[[[[[[[[{{{{{{{{{\\"]]]]", "b": [[1]]}', 100) == {
        "a": '[[[[[[[[[[[[{{{{{{{{{"]]]]',
        "b": [[1]],
    }
    assert edge_link.json_depth(b'{"a": [[[{"b": "]]]"}]]]}') == 5
    parsed = []
    monkeypatch.setattr(edge_link.json, "loads", lambda data: parsed.append(data))
    for text, word in (
        (b"[" * 9 + b"]" * 9, "nested deeper than 8"),
        (b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested deeper than 8"),
        (b"[" * 9, "nested deeper than 8"),
        (b'{"a": "' + b"x" * 200 + b'"}', "exceeds 100"),
    ):
        with pytest.raises(ValueError, match=word):
            edge_link.parse_control(text, 100 if b"x" in text else 1 << 20)
    assert not parsed  # refused without reaching the parser


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _json, max_size=4))
def test_control_json_depth_is_counted_exactly(body):
    from halo.edge import link as edge_link

    text = json.dumps(body).encode()
    assert edge_link.json_depth(text) == _depth(body)
    if _depth(body) <= edge_link.JSON_DEPTH:
        assert edge_link.parse_control(text, len(text)) == body
    else:
        with pytest.raises(ValueError, match="nested deeper"):
            edge_link.parse_control(text, len(text))


# ----------------------------------------------------------------------------------------------
# Paths and models over the wire


def test_no_path_crosses_the_wire(model, other_model, worker, plan, key, baseline):
    fp = _fp(model)
    messages = []
    for fields in ({"model": "/etc"}, {"model": str(model)}, {"plan": "/dev/zero"}):
        peer = Peer(worker, key)
        peer.hello()
        peer.load(fp, **fields)
        messages.append(peer.refused("unknown field"))
        peer.close()
    # A model the worker does not serve, named by its fingerprint or by a path: the same
    # answer whether or not the path exists on the worker's host.
    for name in (_fp(other_model), str(other_model), "/nonexistent/model", "../../../etc"):
        peer = Peer(worker, key)
        peer.hello()
        peer.load(name)
        messages.append(peer.refused("does not serve"))
        peer.close()
    assert len(set(messages[3:])) == 1, messages  # nothing tells which paths exist there
    assert not any(str(model) in m or str(other_model) in m for m in messages), messages
    # hello tells the version, not the process
    peer = Peer(worker, key)
    peer.control({"type": "hello", "version": core.WIRE_VERSION})
    assert peer.answer() == {"type": "hello", "version": core.WIRE_VERSION}
    peer.close()
    _still_serves(model, worker, plan, key, baseline)


def test_a_memory_budget_worker_reads_and_writes_only_what_it_was_told(model, tmp_path, key):
    """Group stores are built only for the layouts of the worker's plans; other layouts asked
    for over the wire are refused without a new file."""
    from halo.edge import streaming as es

    plan48 = edge.make_plan(model, 1, calibration_tokens=0, group_size=48, out=tmp_path / "plan.json")
    stores = tmp_path / "stores"
    streaming = es.WorkerStreaming("50%", stores, plans=[plan48])
    log = open(os.devnull, "w")  # noqa: SIM115 - closed below
    w = edge.Worker("127.0.0.1", 0, [str(model)], key=key, log=log, streaming=streaming)
    thread = threading.Thread(target=w.serve, kwargs={"idle_timeout": 5}, daemon=True)
    thread.start()

    class Address:
        host, port = "127.0.0.1", w.port

    try:
        fp = _fp(model)
        for group_size in (1, 2, 3, 5, 7, 160):
            peer = Peer(Address, key)
            peer.hello()
            peer.load(fp, group_size=group_size)
            peer.refused("no group store here")
            peer.close()
        assert not stores.exists() or not list(stores.rglob("*.halogrp"))
        got = _legit_run(model, f"127.0.0.1:{w.port}", plan48, key, "tcp")
        assert torch.isfinite(got).all()
        assert len(list(stores.rglob("*.halogrp"))) == 1  # the plan's layout, built once
    finally:
        thread.join(30)
        log.close()
    assert not thread.is_alive()


# ----------------------------------------------------------------------------------------------
# Hostile numbers after load


def test_hostile_load_fields_are_refused(model, worker, plan, key, baseline):
    fp = _fp(model)
    cases = {
        b'"threads": 0': "'threads'",
        b'"threads": -5': "'threads'",
        b'"threads": 1e400': "'threads'",
        b'"threads": 1.5': "'threads'",
        b'"group_size": 1e400': "'group_size'",
        b'"group_size": 0': "'group_size'",
        b'"heads_per_group": 99': "'heads_per_group'",
        b'"delivery": {"critical": "fast"}': "delivery 'critical'",
        b'"delivery": {"other": 7}': "delivery 'other'",
        b'"delivery": {"duplicate": "yes"}': "'duplicate'",
        b'"delivery": {"duplicate_other": 1}': "'duplicate_other'",
        b'"delivery": []': "'delivery'",
        b'"weights": "fp64"': "'weights'",
    }
    base = f'"type": "load", "fingerprint": "{fp}", "group_size": 48, "heads_per_group": 2'.encode()
    for field, word in cases.items():
        peer = Peer(worker, key)
        peer.hello()
        name = field.split(b":")[0]
        rest = b", ".join(p for p in base.split(b", ") if not p.startswith(name))
        peer.control(b"{" + rest + b", " + field + b"}")
        peer.refused(word)
        peer.close()
    _still_serves(model, worker, plan, key, baseline)


def _loaded_peer(worker, key, fp, groups) -> Peer:
    peer = Peer(worker, key)
    peer.hello()
    peer.load(fp)
    assert peer.answer()["type"] == "loaded"
    peer.control({"type": "assign", "groups": groups})
    peer.control({"type": "sync", "id": 1})
    assert peer.answer()["type"] == "synced"
    return peer


def test_hostile_inputs_and_assignments_are_refused(model, worker, plan, key, baseline):
    fp = _fp(model)
    hidden = 64
    everything = [
        [layer, part, i] for layer in range(2) for part, n in ((ATTN, 2), (FFN, 4)) for i in range(n)
    ]
    ok = np.ones((1, hidden), np.float32)
    inputs = [  # (pos, layer, part, rows, the word of the refusal)
        (0, 0, FFN, np.ones((3, hidden + 1), np.float32), "width"),
        (0, 0, FFN, np.ones((1, 8), np.float32), "width"),
        (0, 0, ATTN, np.ones((MAX_POSITIONS + 1, hidden), np.float32), "positions"),
        (MAX_POSITIONS - 1, 0, ATTN, np.ones((2, hidden), np.float32), "positions"),
        (2**31, 0, FFN, ok, "positions"),
        (0, 7, FFN, ok, "no such layer"),
        (0, 0, 5, ok, "no such layer"),
    ]
    for pos, layer, part, rows, word in inputs:
        peer = _loaded_peer(worker, key, fp, everything)
        peer.t.send_input(peer.peer, 1, pos, layer, part, [0], rows, "control")
        peer.t.flush()
        peer.refused(word)
        peer.close()
    assignments = {
        json.dumps([[0, 0, 99]]): "no such group",
        json.dumps([[9, 0, 0]]): "no such layer",
        json.dumps([[0, 0]]): "expected [layer, part, index]",
        json.dumps([[0, 0, 1e300]]): "integers",
        json.dumps([[0, 0, 0]] * 13): "at most",
        '"all"': "must be a list",
    }
    for groups, word in assignments.items():
        peer = Peer(worker, key)
        peer.hello()
        peer.load(fp)
        assert peer.answer()["type"] == "loaded"
        peer.control(b'{"type": "assign", "groups": ' + groups.encode() + b"}")
        peer.refused(word)
        peer.close()
    for body, word in (
        ({"type": "assign", "groups": []}, "before load"),
        ({"type": "frobnicate"}, "unknown control message"),
        ({"type": "sync", "id": -1}, "'id'"),
    ):
        peer = Peer(worker, key)
        peer.hello()
        peer.control(body)
        peer.refused(word)
        peer.close()
    _still_serves(model, worker, plan, key, baseline)


# ----------------------------------------------------------------------------------------------
# Takeover, hijack, replay


def test_unauthenticated_connections_cannot_take_the_worker_over(model, worker, plan, key, baseline):
    """While the legitimate root runs: empty TCP and ENet connections, and (sealed) peers with a
    wrong key or none saying hello, do not drop it; its results stay exact."""
    with edge.Root(
        str(model), [worker.address], plan, policy="reliable-udp", key=key, connect_timeout=20.0, log=None
    ) as root:
        first = root.forward(IDS, 0)
        with socket.create_connection((worker.host, worker.port), timeout=5):
            time.sleep(0.2)
        intruders = []
        for protocol in ("tcp", "enet"):
            t = core.Transport(protocol, "", 0, 2)  # no key: a plaintext hello to a sealed worker
            with contextlib.suppress(ConnectionError):
                p = t.connect(worker.host, worker.port, 2.0)
                intruders.append((t, p))
                t.send(p, core.make_control(b'{"type": "hello", "version": 1}'), "control")
                t.flush()
            t = core.Transport(protocol, "", 0, 2, key=os.urandom(32))  # the wrong key
            with pytest.raises(ConnectionError, match="key handshake"):
                t.connect(worker.host, worker.port, 2.0)
        time.sleep(0.5)
        second = root.forward([int(first[-1].argmax())], len(IDS))
        assert not root.stats.dead
        assert torch.equal(torch.cat([first, second]), baseline["reliable-udp"])
        for t, p in intruders:
            with contextlib.suppress(RuntimeError):
                t.disconnect(p, True)
    _still_serves(model, worker, plan, key, baseline)


class Tap:
    """A UDP man in the middle on loopback: forwards root <-> worker, records what the root
    sent, flips a bit in the last byte of the next ``tamper`` datagrams of the root that carry
    data (in a layer input that is a float16 exponent bit), and sends the worker forged or
    replayed datagrams from the root's address."""

    def __init__(self, worker) -> None:
        self.worker = (worker.host, worker.port)
        self.outside = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.outside.bind(("127.0.0.1", 0))
        self.inside = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # faces the worker
        self.inside.bind(("127.0.0.1", 0))
        self.port = self.outside.getsockname()[1]
        self.root = None
        self.recorded: list[bytes] = []
        self.tamper = 0
        self.tampered = 0
        self.stop = False
        self.thread = threading.Thread(target=self._relay, daemon=True)
        self.thread.start()

    def _relay(self) -> None:
        import select

        end = time.monotonic() + 120
        while not self.stop and time.monotonic() < end:
            ready, _, _ = select.select([self.outside, self.inside], [], [], 0.05)
            for s in ready:
                data, source = s.recvfrom(65536)
                if s is self.outside:
                    self.root = source
                    if len(self.recorded) < 20000:
                        self.recorded.append(data)
                    if self.tamper > 0 and len(data) > 150:
                        self.tamper -= 1
                        self.tampered += 1
                        data = data[:-1] + bytes([data[-1] ^ 0x40])
                    self.inside.sendto(data, self.worker)
                elif self.root is not None:
                    self.outside.sendto(data, self.root)

    def inject(self, data: bytes) -> None:
        self.inside.sendto(data, self.worker)

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)
        self.outside.close()
        self.inside.close()


def _tapped_run(model, worker, plan, key, attack) -> tuple[torch.Tensor, Tap, edge.Root]:
    """The legitimate root through a tap: prefill, ``attack(tap, captured)``, one decode step."""
    tap = Tap(worker)
    try:
        with edge.Root(
            str(model),
            [f"127.0.0.1:{tap.port}"],
            plan,
            policy="reliable-udp",
            key=key,
            connect_timeout=20.0,
            log=None,
        ) as root:
            first = root.forward(IDS, 0)
            captured = list(tap.recorded)
            assert len(captured) > 10
            attack(tap, captured)
            second = root.forward([int(first[-1].argmax())], len(IDS))
        return torch.cat([first, second]), tap, root
    finally:
        tap.close()


def test_replayed_and_forged_datagrams_from_the_roots_address_change_nothing(
    model, worker, plan, key, baseline
):
    rng = np.random.default_rng(1)

    def attack(tap, captured):
        for i, data in enumerate(captured[:2000]):  # replay everything the root said so far
            tap.inject(data)
            if i % 100 == 99:
                time.sleep(0.005)
        for data in captured[:500]:  # forgeries: one flipped bit anywhere after the ENet header
            forged = bytearray(data)
            at = int(rng.integers(min(len(forged) - 1, 4), len(forged)))
            forged[at] ^= 1 << int(rng.integers(0, 8))
            tap.inject(bytes(forged))
        time.sleep(0.3)

    got, _, root = _tapped_run(model, worker, plan, key, attack)
    assert not root.stats.dead and root.stats.delivered_fraction() == 1.0
    assert torch.equal(got, baseline["reliable-udp"])
    _still_serves(model, worker, plan, key, baseline)


def test_a_datagram_altered_in_flight_is_refused_and_resent(model, worker, plan, key, baseline):
    """The worker's ENet intercept opens the sealed packet before ENet acknowledges its datagram
    and drops the altered datagram whole, so the root's ENet resends it. (Before: ENet had
    acknowledged it, the seal refused it, it was never resent and the root dropped the worker.)"""

    def attack(tap, captured):
        tap.tamper = 1  # one bit of the next layer input the root sends

    got, tap, root = _tapped_run(model, worker, plan, key, attack)
    assert tap.tampered == 1
    assert not root.stats.dead and root.stats.delivered_fraction() == 1.0
    assert torch.equal(got, baseline["reliable-udp"])


# ----------------------------------------------------------------------------------------------
# The root against a lying worker


class FakeWorker:
    """Speaks the worker's protocol to a root and answers every input with NaN terms (and a
    partial of the wrong width before each)."""

    def __init__(self, key) -> None:
        self.t = _transport("tcp", "127.0.0.1", 0, key=key)
        self.address = f"127.0.0.1:{self.t.port}"
        self.held: dict[tuple[int, int], list[int]] = {}
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _reply(self, peer: int, body: dict) -> None:
        self.t.send(peer, core.make_control(json.dumps(body).encode()), "control")
        self.t.flush()

    def _serve(self) -> None:
        end = time.monotonic() + 120
        while not self.stop and time.monotonic() < end:
            event = self.t.poll(0.05)
            if event is None or event[0] != "message":
                continue
            peer, msg = event[1], core.decode(event[2])
            if msg["kind"] == "control":
                body = json.loads(msg["json"])
                kind = body["type"]
                if kind == "hello":
                    self._reply(peer, {"type": "hello", "version": core.WIRE_VERSION})
                elif kind == "load":
                    self._reply(peer, {"type": "loaded"})
                elif kind == "assign":
                    self.held = {}
                    for layer, part, index in body["groups"]:
                        self.held.setdefault((layer, part), []).append(index)
                elif kind == "sync":
                    self._reply(peer, {"type": "synced", "id": body["id"], "held": 0})
            elif msg["kind"] == "input" and not msg["flags"] & 1:
                n, width = msg["rows"].shape
                for g in self.held.get((msg["layer"], msg["part"]), []):
                    for cols, value in ((width + 3, 1.0), (width, float("nan"))):
                        rows = np.full((n, cols), value, np.float32)
                        self.t.send_partial(
                            peer, msg["step"], msg["pos"], msg["layer"], msg["part"], g, rows, "reliable"
                        )

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)


def test_nan_and_malformed_partials_are_lost_and_the_worker_dropped(model, worker, key, baseline):
    plan2 = edge.make_plan(model, 2, calibration_tokens=0, group_size=48)
    fake = FakeWorker(key)
    try:
        with edge.Root(
            str(model),
            [worker.address, fake.address],
            plan2,
            policy="tcp",
            key=key,
            connect_timeout=20.0,
            log=None,
        ) as root:
            scores = root.score([*IDS, 7, 9, 11, 13], prefill=len(IDS))
            assert all(np.isfinite(scores["nll"]))
            assert root.stats.rejected > 0 and root.stats.malformed > 0
            assert list(root.stats.dead) == [1] and "non-finite" in root.stats.dead[1]
            # With the liar gone the honest worker holds every group: exact again.
            first = root.forward(IDS, 0)
            second = root.forward([int(first[-1].argmax())], len(IDS))
            assert torch.equal(torch.cat([first, second]), baseline["tcp"])
    finally:
        fake.close()


def test_score_refuses_non_finite_values(model):
    local = edge.Local(str(model), group_size=48)
    real = local.forward

    def poisoned(ids, pos):
        out = real(ids, pos)
        out[0, 0] = float("nan")
        return out

    local.forward = poisoned
    with pytest.raises(edge.EdgeError, match="non-finite"):
        local.score([*IDS, 7], prefill=2)


# ----------------------------------------------------------------------------------------------
# Keys and one-line CLI errors


def test_a_sealed_worker_refuses_a_plaintext_root(model, worker, plan):
    with pytest.raises(edge.EdgeError, match="(did not answer|closed the connection).*'hello'"):
        edge.Root(str(model), [worker.address], plan, policy="tcp", connect_timeout=2, log=None).connect()


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    code = halo_main(["edge", *argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines


def test_keygen_writes_a_private_key_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "k"
    code, _ = _cli(capsys, "keygen", "--out", str(out))
    assert code == 0 and stat.S_IMODE(out.stat().st_mode) == 0o600
    key = read_key(out)
    assert len(key) == 32
    code, lines = _cli(capsys, "keygen", "--out", str(out))
    assert code == 1 and len(lines) == 1 and "exists" in lines[0]
    assert read_key(out) == key
    code, _ = _cli(capsys, "keygen", "--out", str(tmp_path / "k2"))
    assert read_key(tmp_path / "k2") != key


def test_worker_and_run_cli_errors_are_one_line(model, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HALO_EDGE_KEY_FILE", raising=False)
    good = write_key(tmp_path / "good.key")
    loose = tmp_path / "loose.key"
    loose.write_text(good.read_text())
    loose.chmod(0o644)
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)  # would block a plain open() for reading
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    # --idle-timeout: a worker that wrongly starts stops after 1 s (and the case fails), no hang
    worker = ["worker", "--idle-timeout", "1", "--model", str(model)]
    cases = [
        ([*worker, "--listen", "localhost:7000", "--insecure"], "not a numeric IPv4 address"),
        ([*worker, "--listen", "[::1]:7000", "--insecure"], "IPv6"),
        ([*worker, "--listen", "::1:7000", "--insecure"], "IPv6"),
        ([*worker, "--listen", "127.0.0.1:99999", "--insecure"], "expected HOST:PORT"),
        ([*worker, "--listen", f"127.0.0.1:{port}", "--insecure"], "cannot open tcp"),
        ([*worker, "--listen", "127.0.0.1:0"], "no key"),
        ([*worker, "--listen", "10.1.2.3:7000", "--insecure"], "refused on a non-loopback"),
        ([*worker, "--listen", "0.0.0.0:7000", "--insecure"], "refused on a non-loopback"),
        ([*worker, "--listen", "127.0.0.1:0", "--key-file", str(loose)], "readable by others"),
        ([*worker, "--listen", "127.0.0.1:0", "--key-file", str(tmp_path / "none")], "No such file"),
        ([*worker, "--listen", "127.0.0.1:0", "--key-file", str(fifo)], "not a regular file"),
        ([*worker, "--listen", "127.0.0.1:0", "--key-file", str(good), "--insecure"], "contradict"),
        ([*worker[:3], "--model", str(tmp_path), "--listen", "127.0.0.1:0", "--insecure"], "no config.json"),
        ([*worker, "--listen", "127.0.0.1:0", "--insecure", "--plan", "p.json"], "--memory-budget"),
    ]
    (tmp_path / "plan.json").write_text("{}")
    run = ["run", "--model", str(model), "--plan", str(tmp_path / "plan.json"), "--prompt", "hi"]
    cases += [
        ([*run, "--workers", "10.1.2.3:7000", "--insecure"], "refused on a non-loopback"),
        ([*run, "--workers", "127.0.0.1:7000"], "no key"),
        ([*run, "--workers", "localhost:7000", "--insecure"], "not a numeric IPv4 address"),
    ]
    try:
        for argv, word in cases:
            code, lines = _cli(capsys, *argv)
            assert code == 1 and len(lines) == 1 and word in lines[0], (argv, lines)
            assert lines[0].startswith(f"halo edge {argv[0]}: error:"), lines
    finally:
        busy.close()
    # A busy UDP port (TCP free): the same one line, and no traceback from a real process.
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    try:
        done = subprocess.run(
            [
                *(sys.executable, "-m", "halo.cli", "edge", "worker", "--model", str(model), "--insecure"),
                *("--listen", f"127.0.0.1:{udp.getsockname()[1]}"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(),
        )
    finally:
        udp.close()
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and "cannot open enet" in lines[0], done.stderr


def test_the_environment_names_the_key_file(model, tmp_path, monkeypatch):
    from halo.edge.link import choose_key

    good = write_key(tmp_path / "k")
    monkeypatch.setenv("HALO_EDGE_KEY_FILE", str(good))
    assert choose_key(None, False, ["10.0.0.1"]) == read_key(good)
    with pytest.raises(edge.EdgeError, match="contradict"):
        choose_key(None, True, ["127.0.0.1"])
    with pytest.raises(edge.EdgeError, match="non-loopback"):
        edge.Worker("10.0.0.1", 0, [str(model)])  # the Python API: no key, no plaintext off loopback


# ----------------------------------------------------------------------------------------------
# Across namespaces


_NO_NETNS = testbed.available()


@pytest.mark.skipif(_NO_NETNS is not None, reason=f"network namespaces unavailable: {_NO_NETNS}")
def test_a_sealed_worker_in_its_namespace_serves_only_the_keyed_root(model, key_file, key, plan):
    with testbed.Testbed([testbed.Link(rate_mbit=None)]) as bed:
        proc = bed.popen(
            bed.worker(0),
            [
                *(
                    sys.executable,
                    "-m",
                    "halo.cli",
                    "edge",
                    "worker",
                    "--listen",
                    bed.worker_address(0, 7000),
                ),
                *("--model", str(model), "--key-file", str(key_file), "--idle-timeout", "60"),
            ],
            env=_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert "listening on" in proc.stderr.readline()
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            address = bed.worker_address(0, 7000)
            with bed.inside(bed.root):
                for wrong in (os.urandom(32),):
                    with pytest.raises(edge.EdgeError):
                        edge.Root(
                            str(model), [address], plan, policy="tcp", key=wrong, connect_timeout=3
                        ).connect()
                with edge.Root(
                    str(model), [address], plan, policy="tcp", key=key, connect_timeout=20
                ) as root:
                    out = root.forward(IDS, 0)
                    assert torch.isfinite(out).all() and not root.stats.dead
            assert proc.poll() is None
        finally:
            proc.kill()
            proc.wait(10)
