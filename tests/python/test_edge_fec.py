"""Forward error correction of the non-critical terms (halo/edge/fec.py, wire.hpp parity):
a parity datagram rebuilds exactly the one lost datagram of its set, never two, refuses
hostile parity, and is chosen from the measured loss. Runs over real ENet transports on
loopback (sealed links where authentication is under test); the end-to-end comparison runs on
the namespace test bed (skipped with the reason where namespaces are not allowed)."""

from __future__ import annotations

import select
import socket
import threading
import time

import numpy as np
import pytest
import test_edge
from halo import _core
from halo.edge import fec
from halo.edge.model import EdgeError
from test_edge import _bed_workers, netns, testbed

tiny_llama = test_edge.tiny_llama  # the fixtures of test_edge.py
link_key = test_edge.link_key

core = _core.edge
COLS = 96  # a partial is then a datagram of over 200 bytes, which the relay tells apart
STEP, LAYER, PART = 40, 3, 1


class Pair:
    """A root transport (unbound client, as the root's) connected to a worker transport, over a
    loopback UDP relay that can drop, alter and replay the worker's datagrams."""

    def __init__(self, key: bytes | None = None) -> None:
        self.worker = core.Transport("enet", "127.0.0.1", 0, 4, key=key)
        self.root = core.Transport("enet", "", 0, 4, key=key)
        self.relay_out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # faces the root
        self.relay_out.bind(("127.0.0.1", 0))
        self.relay_in = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # faces the worker
        self.relay_in.bind(("127.0.0.1", 0))
        self.root_address = None
        self.drop_next = 0  # drop the worker's next N datagrams of data
        self.tamper_next = 0  # flip a bit in the worker's next N datagrams of data
        self.record = False
        self.recorded: list[bytes] = []
        self.stop = False
        self.thread = threading.Thread(target=self._relay, daemon=True)
        self.thread.start()
        accepted: list[int] = []

        def accept() -> None:
            end = time.monotonic() + 10
            while time.monotonic() < end and not accepted:
                e = self.worker.poll(0.01)
                if e is not None and e[0] == "connect":
                    accepted.append(e[1])

        t = threading.Thread(target=accept)
        t.start()
        self.peer = self.root.connect("127.0.0.1", self.relay_out.getsockname()[1], 10.0)
        end = time.monotonic() + 10
        while not accepted and time.monotonic() < end:  # the root's ENet acknowledges the worker's answer
            self.root.poll(0.01)
        t.join()
        self.worker_peer = accepted[0]

    def _relay(self) -> None:
        end = time.monotonic() + 120
        worker = ("127.0.0.1", self.worker.port)
        while not self.stop and time.monotonic() < end:
            ready, _, _ = select.select([self.relay_out, self.relay_in], [], [], 0.02)
            for s in ready:
                data, source = s.recvfrom(65536)
                if s is self.relay_out:
                    self.root_address = source
                    self.relay_in.sendto(data, worker)
                    continue
                if self.root_address is None:
                    continue
                if len(data) > 200:  # a datagram carrying a term or a parity
                    if self.record:
                        self.recorded.append(data)
                    if self.drop_next > 0:
                        self.drop_next -= 1
                        continue
                    if self.tamper_next > 0:
                        self.tamper_next -= 1
                        data = data[:-1] + bytes([data[-1] ^ 0x01])
                self.relay_out.sendto(data, self.root_address)

    def inject(self, data: bytes) -> None:
        """A datagram to the root from the relay (the worker's address, as the root sees it)."""
        self.relay_out.sendto(data, self.root_address)

    def send(self, messages: list[bytes], settle: float = 0.05) -> None:
        for m in messages:
            assert self.worker.send(self.worker_peer, m, "unreliable")
            self.worker.flush()
            time.sleep(settle)  # one datagram at a time through the relay (ENet would bundle them)

    def gather(self, groups: int, wait: float = 2.0, step: int = STEP, rows: int = 1, **kw):
        out = np.zeros((groups, rows, COLS), np.float32)
        t = time.monotonic()
        r = self.root.gather(
            step, LAYER, PART, out, [self.peer] * groups, [0] * groups, t + wait, t + wait, False, **kw
        )
        return out, r

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)
        self.relay_out.close()
        self.relay_in.close()


@pytest.fixture
def sealed():
    pair = Pair(key=core.keygen())
    yield pair
    pair.close()


def random_halves(rng, shape) -> np.ndarray:
    """float32 values that are exact float16 values of every kind: normal, subnormal, +-0."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    bits[(bits & 0x7C00) == 0x7C00] &= 0x3FFF  # no inf / NaN: the root refuses those rows anyway
    bits.flat[0] = 0x8000  # -0.0
    bits.flat[-1] = 0x0001  # the smallest subnormal
    return bits.view(np.float16).astype(np.float32)


def partials(rng, groups: list[int], rows: int = 1, row0: int = 0, step: int = STEP):
    values = {g: random_halves(rng, (rows, COLS)) for g in groups}
    return values, [core.make_partial(step, 7, LAYER, PART, g, row0, values[g]) for g in groups]


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)


# ----------------------------------------------------------------------------------------------
# The code and its rate


def test_parity_rebuilds_exactly_the_lost_term_at_every_position(sealed):
    """For sets of 1 to 5 members, each member in turn is not sent: the root rebuilds it from
    the parity bit for bit (sealed links: the parity is authenticated like any datagram)."""
    rng = np.random.default_rng(0)
    step = STEP
    for k in range(1, 6):
        for lost in range(k):
            step += 1
            groups = list(range(k))
            values, messages = partials(rng, groups, step=step)
            parity = core.make_parity(0, messages)
            sealed.send([m for i, m in enumerate(messages) if i != lost] + [parity], settle=0.0)
            out, r = sealed.gather(k, step=step, fec=True)
            assert r["end"] == "complete" and r["received"].all(), (k, lost)
            assert r["rebuilt"][:, 0].tolist() == [int(g == lost) for g in groups]
            assert r["parity"] == 1 and r["parity_refused"] == 0
            for g in groups:
                np.testing.assert_array_equal(bits(out[g]), bits(values[g]))
    assert sealed.root.auth_failures == 0


def test_parity_over_several_rows_rebuilds_the_member_rows():
    """A member of several rows (a prefill term's datagram): all its rows come back."""
    pair = Pair()
    try:
        rng = np.random.default_rng(1)
        values, messages = partials(rng, [0, 1, 2], rows=3)
        pair.send([messages[0], messages[2], core.make_parity(4, messages)], settle=0.0)
        out, r = pair.gather(3, rows=3, fec=True)
        assert r["end"] == "complete" and r["rebuilt"].tolist() == [[0] * 3, [1] * 3, [0] * 3]
        np.testing.assert_array_equal(bits(out[1]), bits(values[1]))
    finally:
        pair.close()


def test_two_losses_in_one_set_are_not_rebuilt(sealed):
    rng = np.random.default_rng(2)
    values, messages = partials(rng, [0, 1, 2, 3])
    sealed.send([messages[0], messages[3], core.make_parity(0, messages)], settle=0.0)
    out, r = sealed.gather(4, wait=0.4, fec=True)
    assert r["end"] != "complete"
    assert r["received"][:, 0].tolist() == [1, 0, 0, 1]
    assert not r["rebuilt"].any() and r["parity"] == 1
    assert not out[1].any() and not out[2].any()  # nothing written for the two missing
    for g in (0, 3):
        np.testing.assert_array_equal(bits(out[g]), bits(values[g]))


def test_parity_is_ignored_unless_asked_for(sealed):
    rng = np.random.default_rng(3)
    _, messages = partials(rng, [0, 1])
    sealed.send([messages[0], core.make_parity(0, messages)], settle=0.0)
    _, r = sealed.gather(2, wait=0.3)  # fec=False: the wait-for-all policies
    assert r["received"][:, 0].tolist() == [1, 0] and r["parity"] == 0 and not r["rebuilt"].any()


def test_make_parity_refuses_sets_that_disagree():
    rng = np.random.default_rng(4)
    _, one = partials(rng, [0])
    _, two = partials(rng, [1], rows=2)
    _, other_step = partials(rng, [2], step=STEP + 1)
    with pytest.raises(ValueError, match="shares one exchange and one shape"):
        core.make_parity(0, [one[0], two[0]])
    with pytest.raises(ValueError, match="shares one exchange and one shape"):
        core.make_parity(0, [one[0], other_step[0]])
    with pytest.raises(ValueError, match="repeats group 0"):
        core.make_parity(0, [one[0], one[0]])
    with pytest.raises(ValueError, match="1 to 16 members"):
        core.make_parity(0, [])
    with pytest.raises(ValueError, match="1 to 16 members"):
        core.make_parity(0, partials(rng, list(range(17)))[1])
    with pytest.raises(ValueError, match="not a partial"):
        core.make_parity(0, [core.make_control(b"{}")])


def _with_count(parity: bytes, count: int) -> bytes:
    return parity[:28] + count.to_bytes(4, "little") + parity[32:]


def test_hostile_parity_is_refused_without_harm(sealed):
    """Parity from an authenticated peer that does not fit its exchange: every one refused
    (counted), nothing rebuilt from it, the exchange's real terms kept, the root alive."""
    rng = np.random.default_rng(5)
    values, messages = partials(rng, [0, 1, 2])
    good = core.make_parity(0, messages)
    wrong_cols = core.make_parity(
        1, [core.make_partial(STEP, 7, LAYER, PART, 0, 0, np.ones((1, COLS + 1), np.float32))]
    )
    foreign_group = core.make_parity(2, [core.make_partial(STEP, 7, LAYER, PART, 9, 0, values[0])])
    past_rows = core.make_parity(3, [core.make_partial(STEP, 7, LAYER, PART, 1, 5, values[1])])
    overlap = core.make_parity(
        4,
        [
            core.make_partial(STEP, 7, LAYER, PART, 1, 0, np.ones((2, COLS), np.float32)),
            core.make_partial(STEP, 7, LAYER, PART, 1, 1, np.ones((2, COLS), np.float32)),
        ],
    )
    refused = [wrong_cols, foreign_group, past_rows]
    malformed = [
        good[:-2],  # wrong length
        good + b"\0\0",
        _with_count(good, 0xFFFFFFFF),  # a huge set: refused before any size is computed from it
        _with_count(good, 17) + bytes(4 * 14),  # 17 members, length consistent with them
        _with_count(good, 0)[:32] + good[32 + 12 :],
    ]
    stale = core.make_parity(0, partials(rng, [1], step=STEP - 1)[1])
    sealed.send([messages[0], messages[2], *malformed, *refused, stale], settle=0.0)
    out, r = sealed.gather(3, wait=0.4, fec=True)
    assert r["malformed"] == len(malformed)
    assert r["parity_refused"] == len(refused) and r["parity"] == 0 and r["stale"] == 1
    assert r["received"][:, 0].tolist() == [1, 0, 1] and not r["rebuilt"].any()
    # Two members whose rows of one group overlap: refused.
    sealed.send([overlap], settle=0.0)
    out2, r2 = sealed.gather(3, wait=0.3, rows=3, step=STEP, fec=True)
    assert r2["parity_refused"] == 1 and not r2["rebuilt"].any()
    # A second parity with a set id already used by this peer in the exchange: refused.
    sealed.send([messages[0], good, core.make_parity(0, messages[1:])], settle=0.0)
    out, r = sealed.gather(3, wait=0.4, fec=True)
    assert r["parity"] == 1 and r["parity_refused"] == 1
    assert sealed.root.auth_failures == 0


def test_forged_and_replayed_parity_is_refused_by_the_link(sealed):
    """An altered parity datagram fails the AEAD tag (auth_failures), a replayed one is refused
    by the replay windows: neither rebuilds anything. The same parity, genuine, does."""
    rng = np.random.default_rng(6)
    values, messages = partials(rng, [0])  # a set of one: the parity alone would rebuild it
    parity = core.make_parity(0, messages)
    sealed.tamper_next = 1
    sealed.send([parity])
    out, r = sealed.gather(1, wait=0.3, fec=True)
    assert sealed.root.auth_failures == 1
    assert not r["received"].any() and r["parity"] == 0 and not out.any()
    sealed.record = True
    sealed.send([parity])
    sealed.record = False
    out, r = sealed.gather(1, wait=1.0, fec=True)
    assert r["rebuilt"].all() and r["parity"] == 1  # genuine: used
    np.testing.assert_array_equal(bits(out[0]), bits(values[0]))
    assert len(sealed.recorded) == 1
    failures = sealed.root.auth_failures
    for _ in range(3):
        sealed.inject(sealed.recorded[0])
    out, r = sealed.gather(1, wait=0.3, fec=True)
    assert not r["received"].any() and r["parity"] == 0 and not out.any()
    assert sealed.root.auth_failures >= failures  # ENet's own window may drop it first


def test_send_partials_sends_sets_of_at_most_k_with_their_parity():
    """The worker's side: n unreliable datagrams of one shape go in ceil(n / k) sets of nearly
    equal size, each followed by its parity; a set of another shape (a shorter last chunk) apart."""
    pair = Pair()
    try:
        rng = np.random.default_rng(7)
        terms = random_halves(rng, (5, 1, COLS))
        sent = pair.worker.send_partials(
            pair.worker_peer, STEP, 7, LAYER, PART, [0, 1, 2, 3, 4], terms, "unreliable", 2
        )
        assert sent == 5
        got = []
        end = time.monotonic() + 5
        while time.monotonic() < end and len(got) < 8:
            e = pair.root.poll(0.05)
            if e is not None and e[0] == "message":
                got.append(core.decode(e[2]))
        kinds = [m["kind"] for m in got]
        assert kinds.count("partial") == 5 and kinds.count("parity") == 3
        sets = sorted(sorted(g for g, _ in m["members"]) for m in got if m["kind"] == "parity")
        assert sets == [[0], [1, 2], [3, 4]] or sorted(map(len, sets)) == [1, 2, 2]
        with pytest.raises(ValueError, match="fec_k must be in"):
            pair.worker.send_partials(
                pair.worker_peer, STEP, 7, LAYER, PART, [0], terms[:1], "unreliable", 17
            )
        assert (
            pair.worker.send_partials(pair.worker_peer, STEP, 7, LAYER, PART, [0], terms[:1], "reliable", 2)
            == 1
        )
    finally:
        pair.close()


def test_code_rate_follows_the_loss():
    assert fec.code_rate(0.0) == 0 and fec.code_rate(0.004) == 0
    assert fec.code_rate(0.01) == fec.FEC_MAX_K
    assert fec.code_rate(0.05) == 4 and fec.code_rate(0.10) == 2 and fec.code_rate(0.30) == 1
    assert fec.code_rate(float("nan")) == 0 and fec.code_rate(1.0) == 1
    ks = [fec.code_rate(p / 100) for p in range(1, 60)]
    assert ks == sorted(ks, reverse=True)  # never more data per parity as the loss grows
    for p in (0.01, 0.02, 0.05, 0.1):  # what remains lost: at most RESIDUAL of the loss
        k = fec.code_rate(p)
        assert p * (1 - (1 - p) ** k) <= fec.RESIDUAL * p + 1e-12
        assert k == fec.FEC_MAX_K or p * (1 - (1 - p) ** (k + 1)) > fec.RESIDUAL * p
    rate = fec.FecRate(2, alpha=0.05)
    for _ in range(400):
        rate.observe(0, 20, 1)  # 5 % of the unreliable rows lost on worker 0
        rate.observe(1, 20, 0)
    assert rate.k(0) == 4 and rate.k(1) == 0


def test_fec_option_is_checked():
    assert fec.check_fec("auto") == "auto" and fec.check_fec("off") == "off"
    assert fec.check_fec("4") == 4 and fec.check_fec(16) == 16
    for bad in (0, 17, -1, "x", True, 2.5, "4.5", None):
        with pytest.raises(EdgeError, match="fec must be"):
            fec.check_fec(bad)


# ----------------------------------------------------------------------------------------------
# The worker's and the root's side


def test_worker_sends_its_unreliable_terms_with_parity_when_told():
    """With a code rate from the root the worker's non-critical terms go through send_partials
    (with parity), critical ones as before; 'fec' is refused where terms are reliable anyway."""
    from types import SimpleNamespace

    import torch
    from halo.edge.worker import FFN, Refused, _delivery, _Session

    class Sent:
        def __init__(self):
            self.calls = []

        def send_partial(self, peer, step, pos, layer, part, group, rows, delivery, duplicate):
            self.calls.append(("one", group, delivery))

        def send_partials(self, peer, step, pos, layer, part, groups, rows, delivery, fec):
            assert rows.shape == (len(groups), 1, 4)
            np.testing.assert_array_equal(rows[:, 0, 0], groups)  # each group's own term
            self.calls.append(("fec", tuple(groups), delivery, fec))

        def send(self, *args):
            pass

        def flush(self):
            pass

    class Compute:
        def run(self, groups, h, pos):
            return [torch.full((h.shape[0], 4), float(g.index)) for g in groups]

    def session(delivery):
        s = _Session(SimpleNamespace(log=None, streaming=None), Sent(), 0)
        s.delivery = _delivery(delivery)
        s.compute = Compute()
        s.held = {(0, FFN): [SimpleNamespace(index=i) for i in range(4)]}
        return s

    msg = {"step": 1, "layer": 0, "part": FFN, "pos": 0, "rows": np.zeros((1, 4), np.float32), "flags": 0}
    s = session({})
    assert s.control({"type": "fec", "k": 3})
    assert s._run({**msg, "critical": [1]})
    assert s.t.calls == [("one", 1, "reliable"), ("fec", (0, 2, 3), "unreliable", 3)]
    s.t.calls = []
    s.control({"type": "fec", "k": 0})  # off again: one message per term, as before
    assert s._run({**msg, "step": 2, "critical": [1]})
    assert [c[0] for c in s.t.calls] == ["one"] * 4
    for bad in (17, -1, 2.5, "4", True):
        with pytest.raises(Refused):
            s.control({"type": "fec", "k": bad})
    with pytest.raises(Refused, match="needs unreliable"):
        session({"other": "reliable"}).control({"type": "fec", "k": 2})


def test_root_tells_workers_their_code_rate(tiny_llama):
    import json

    from halo import edge

    plan = edge.make_plan(tiny_llama, 2, calibration_tokens=0, group_size=48)

    class Recorder:
        def __init__(self):
            self.sent = []

        def send(self, peer, data, delivery):
            self.sent.append((peer, json.loads(core.decode(data)["json"])))

    def root(**options):
        r = edge.Root(str(tiny_llama), ["127.0.0.1:1", "127.0.0.1:2"], plan, **options)
        r.transport, r.peer = Recorder(), [0, 1]
        return r

    fixed = root(fec=3)
    fixed._set_code_rates()
    fixed._set_code_rates()  # unchanged: nothing sent again
    assert fixed.transport.sent == [(0, {"type": "fec", "k": 3}), (1, {"type": "fec", "k": 3})]
    auto = root()  # the default: auto
    auto._set_code_rates()
    assert auto.transport.sent == []  # no loss measured: off
    auto.fec_rate.loss = [0.05, 0.0]
    auto._set_code_rates()
    assert auto.transport.sent == [(0, {"type": "fec", "k": 4})]
    auto.fec_rate.loss = [0.0, 0.0]
    auto._set_code_rates()
    assert auto.transport.sent[-1] == (0, {"type": "fec", "k": 0})
    old = root(fec=2)
    old._fec_max = [0, 16]  # worker 0 said hello without "fec" (from before FEC): never asked
    old._set_code_rates()
    assert old.transport.sent == [(1, {"type": "fec", "k": 2})]
    for options in ({"fec": "off"}, {"policy": "tcp", "fec": 2}):
        r = root(**options)
        r.fec_rate.loss = [0.1, 0.1]
        r._set_code_rates()
        assert r.transport.sent == []
    with pytest.raises(EdgeError, match="fec must be"):
        root(fec=0)


# ----------------------------------------------------------------------------------------------
# End to end, on lossy links


@netns
def test_fec_raises_the_delivered_fraction_on_lossy_links(tiny_llama, link_key):
    """Two workers behind 10 % loss each way: the same generation with parity (k = 2) delivers
    more of the terms than without (each lost datagram whose set lost nothing else is rebuilt),
    and auto turns parity on by itself once it has measured the loss."""
    from halo import edge

    plan = edge.make_plan(tiny_llama, 2, calibration_tokens=0, group_size=16)
    prompt = [5, 17, 3, 99]
    links = [testbed.Link(plr=0.0), testbed.Link(plr=0.0)]
    # Deadlines long enough that a term missing at the deadline was lost, not late.
    patient = {"initial_deadline": 0.05, "deadline_factor": 6.0, "deadline_slack": 0.02, "replan": False}
    delivered: dict[str, list[float]] = {"off": [], "2": [], "auto": []}
    rebuilt: dict[str, int] = {"off": 0, "2": 0, "auto": 0}
    with testbed.Testbed(links, seed=5) as bed:
        addresses = _bed_workers(bed, 2, tiny_llama, link_key[0])
        with bed.inside(bed.root):
            for rnd in range(2):
                for fec_mode in ("off", "2", "auto") if rnd == 0 else ("auto", "2", "off"):
                    for i in range(2):
                        bed.set_loss(i, 0.0)
                    with edge.Root(
                        str(tiny_llama),
                        addresses,
                        plan,
                        connect_timeout=20.0,
                        key=link_key[1],
                        fec=fec_mode,
                        **patient,
                    ) as root:
                        for i in range(2):
                            bed.set_loss(i, 0.10)
                        root.generate(prompt, 24)
                        decode = [e for e in root.stats.exchanges if e.rows == 1]
                        delivered[fec_mode].append(
                            sum(e.delivered for e in decode) / sum(e.expected for e in decode)
                        )
                        rebuilt[fec_mode] += root.stats.rebuilt
                        assert not root.stats.dead and root.stats.parity_refused == 0
    print("delivered", delivered, "rebuilt", rebuilt)
    assert rebuilt["off"] == 0 and rebuilt["2"] > 0 and rebuilt["auto"] > 0
    # Without parity about 7.5 % of the rows are lost (10 % of the 3 in 4 that are not
    # critical); with k = 2 about 1.5 %.
    assert min(delivered["2"]) > max(delivered["off"]) + 0.02
    assert np.mean(delivered["auto"]) > np.mean(delivered["off"]) + 0.01
