"""PLR-aware placement of neuron groups on tensor-parallel devices.

``balance`` (C++) places groups so that the expected step time is small and the
expected importance lost to dropped packets stays under a budget; ``oracle``
solves the same problem exactly as a mixed-integer program with HiGHS (small
instances only); ``Monitor`` estimates each device's loss rate and latency
online; ``simulate`` runs the seeded cluster simulator.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .._core import sched as _sched

__all__ = ["Device", "Monitor", "Plan", "SimResult", "balance", "evaluate", "oracle", "simulate"]

_GROUP_FIELDS = ("flops", "weight_bytes", "exchange_bytes", "input_bytes", "importance")


@dataclass(frozen=True)
class Device:
    """One TP worker: FLOP/s, link bytes/s (up; ``bandwidth_down`` 0 = same), one-way
    latency in seconds, packet-loss rate, mean loss-burst length (1 = Bernoulli)."""

    speed: float
    bandwidth: float
    latency: float = 0.0
    plr: float = 0.0
    burst_length: float = 1.0
    bandwidth_down: float = 0.0
    capacity_bytes: float = 1e300


@dataclass
class Plan:
    device_of: list[int]
    device_time: list[float]
    makespan: float
    expected_loss: float
    extra: dict[str, Any] = field(default_factory=dict)


def _group_dicts(groups: Iterable[Any]) -> list[dict[str, float]]:
    out = []
    for i, g in enumerate(groups):
        if isinstance(g, Mapping):
            d = {k: float(g.get(k, 0.0)) for k in _GROUP_FIELDS}
        elif all(hasattr(g, k) for k in ("flops", "importance")):
            d = {k: float(getattr(g, k, 0.0)) for k in _GROUP_FIELDS}
        else:
            raise TypeError(f"[balance] group {i} must be a mapping or a NeuronGroup, got {type(g).__name__}")
        out.append(d)
    return out


def _device_dicts(devices: Iterable[Any], function: str) -> list[dict[str, float]]:
    out = []
    for i, d in enumerate(devices):
        if isinstance(d, Device):
            out.append({k: float(v) for k, v in asdict(d).items()})
        elif isinstance(d, Mapping):
            unknown = set(d) - set(Device.__dataclass_fields__)
            if unknown:
                raise ValueError(f"[{function}] device {i}: unknown field(s) {sorted(unknown)}")
            for key in ("speed", "bandwidth"):
                if key not in d:
                    raise ValueError(f"[{function}] device {i}: missing field '{key}'")
            out.append({k: float(v) for k, v in d.items()})
        else:
            raise TypeError(f"[{function}] device {i} must be a Device or a mapping, got {type(d).__name__}")
    _sched.validate_devices(function, out)
    return out


def _plan(raw: Mapping[str, Any]) -> Plan:
    return Plan(
        list(raw["device_of"]), list(raw["device_time"]), float(raw["makespan"]), float(raw["expected_loss"])
    )


def balance(
    groups: Sequence[Any], devices: Sequence[Any], policy: str = "halo", loss_budget: float = 0.01
) -> Plan:
    """Place ``groups`` on ``devices``.

    policy ``"halo"``: minimise the step time subject to capacity and
    sum(importance * plr) <= loss_budget * total importance; ``"makespan"``: ignore
    the loss budget; ``"round_robin"``: group i on device i % D (naive TP split)."""
    return _plan(
        _sched.balance(_group_dicts(groups), _device_dicts(devices, "balance"), policy, float(loss_budget))
    )


def evaluate(groups: Sequence[Any], devices: Sequence[Any], device_of: Sequence[int]) -> Plan:
    """Step time and expected loss of a given placement under the cost model."""
    return _plan(_sched.evaluate(_group_dicts(groups), _device_dicts(devices, "evaluate"), list(device_of)))


def oracle(
    groups: Sequence[Any],
    devices: Sequence[Any],
    policy: str = "halo",
    loss_budget: float = 0.01,
    time_limit: float = 30.0,
    require_optimal: bool = True,
) -> Plan:
    """Exact placement as a MIP solved by HiGHS (small instances): binary x[g, d],
    device-used flags u[d]; minimise T with T >= latency_d u_d + sum_g t_gd x_gd.

    ``plan.extra`` holds ``optimal`` (proved) and ``bound`` (HiGHS's lower bound on the
    optimal step time). With ``require_optimal=False`` a run that hits ``time_limit`` returns
    its best placement and that bound instead of raising."""
    import highspy

    gs = _group_dicts(groups)
    ds = _device_dicts(devices, "oracle")
    if policy not in ("halo", "makespan"):
        raise ValueError(f"[oracle] policy must be 'halo' or 'makespan', got {policy!r}")
    G, D = len(gs), len(ds)
    if G * D > 20000:
        raise ValueError(f"[oracle] instance too large for the exact solver: {G} groups x {D} devices")
    t = np.zeros((G, D))
    for gi, g in enumerate(gs):
        for di, d in enumerate(ds):
            down = d["bandwidth_down"] if d.get("bandwidth_down", 0) > 0 else d["bandwidth"]
            t[gi, di] = (
                g["flops"] / d["speed"] + g["exchange_bytes"] / d["bandwidth"] + g["input_bytes"] / down
            )
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("mip_rel_gap", 1e-6)
    h.setOptionValue("threads", 1)
    x = [[h.addBinary() for _ in range(D)] for _ in range(G)]
    u = [h.addBinary() for _ in range(D)]
    T = h.addVariable(lb=0.0)
    for gi in range(G):
        h.addConstr(h.qsum(x[gi]) == 1)
        for di in range(D):
            h.addConstr(x[gi][di] - u[di] <= 0)
    for di, d in enumerate(ds):
        h.addConstr(T - d.get("latency", 0.0) * u[di] - h.qsum(t[gi, di] * x[gi][di] for gi in range(G)) >= 0)
        cap = d.get("capacity_bytes", 1e300)
        if cap < 1e200:
            h.addConstr(h.qsum(gs[gi]["weight_bytes"] * x[gi][di] for gi in range(G)) <= cap)
    if policy == "halo":
        total = sum(g["importance"] for g in gs)
        h.addConstr(
            h.qsum(
                gs[gi]["importance"] * ds[di].get("plr", 0.0) * x[gi][di]
                for gi in range(G)
                for di in range(D)
            )
            <= loss_budget * total * (1 + 1e-9)
        )
    h.minimize(T)
    status = h.getModelStatus()
    optimal = status == highspy.HighsModelStatus.kOptimal
    has_solution = h.getInfo().primal_solution_status == 2  # a feasible point was found
    if not optimal and (require_optimal or not has_solution):
        raise RuntimeError(f"[oracle] HiGHS did not prove optimality: {h.modelStatusToString(status)}")
    sol = np.array(h.getSolution().col_value)
    device_of = [int(np.argmax([sol[x[gi][di].index] for di in range(D)])) for gi in range(G)]
    plan = _plan(_sched.evaluate(gs, ds, device_of))
    bound = float(h.getInfo().mip_dual_bound)
    plan.extra = {"optimal": optimal, "bound": plan.makespan if optimal else bound}
    return plan


class Monitor:
    """Online PLR / latency estimate per device (bias-corrected EWMA with weight ``alpha``)."""

    def __init__(self, devices: int, alpha: float = 0.02) -> None:
        self._m = _sched.PlrMonitor(int(devices), float(alpha))

    def observe(self, device: int, delivered: bool, latency: float = 0.0) -> None:
        self._m.observe(int(device), bool(delivered), float(latency))

    def plr(self, device: int) -> float:
        return self._m.plr(int(device))

    def latency(self, device: int) -> float:
        return self._m.latency(int(device))

    def drifted(self, threshold: float = 0.01) -> bool:
        """True when some estimate moved more than ``threshold`` since ``mark()``: re-balance then."""
        return self._m.drifted(float(threshold))

    def mark(self) -> None:
        self._m.mark()

    def updated_devices(self, devices: Sequence[Device]) -> list[Device]:
        """``devices`` with plr and latency replaced by the current estimates (for a re-balance)."""
        return [
            Device(**{**asdict(d), "plr": min(self.plr(i), 0.999), "latency": self.latency(i)})
            for i, d in enumerate(devices)
        ]


@dataclass
class SimResult:
    tcp_time: np.ndarray
    halo_time: np.ndarray
    delivered: np.ndarray  # [steps, groups] bool, HALO aggregator
    lossless_time: float


def simulate(
    groups: Sequence[Any],
    devices: Sequence[Any],
    device_of: Sequence[int],
    critical: Sequence[bool],
    steps: int = 100,
    seed: int = 0,
    packet_bytes: float = 1400.0,
    rto: float = 0.2,
    nack_timeout: float = 0.0,
    deadline_factor: float = 1.5,
) -> SimResult:
    """Run the seeded cluster simulator (see include/halo/sched/simulate.hpp)."""
    raw = _sched.simulate(
        _group_dicts(groups),
        _device_dicts(devices, "simulate"),
        list(device_of),
        [1 if c else 0 for c in critical],
        float(packet_bytes),
        float(rto),
        float(nack_timeout),
        float(deadline_factor),
        int(steps),
        int(seed),
    )
    return SimResult(
        np.asarray(raw["tcp_time"]),
        np.asarray(raw["halo_time"]),
        np.asarray(raw["delivered"]).astype(bool),
        float(raw["lossless_time"]),
    )
