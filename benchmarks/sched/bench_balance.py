"""Balancer timing: 1000 groups x 16 devices (target < 10 ms), beside the naive
round-robin split and the HiGHS MIP oracle on a small instance, all in this run; then the
gap to the oracle on the harder family of issue 13 (12-40 groups x 3-7 devices,
heavy-tailed importance, PLR among 0/1/5/10/30 %, budgets 0.5-2 %) over many seeds. When
HiGHS does not prove optimality within its time limit the gap is taken to its best
placement and, as an upper bound, to its proven lower bound.

    python benchmarks/sched/bench_balance.py [SEEDS]   # default 60 seeds (about 10-20 min)
"""

from __future__ import annotations

import sys
import time

import numpy as np
from halo import sched
from halo._core import sched as core


def instance(seed, groups, devices):
    rng = np.random.default_rng(seed)
    gs = [
        {
            "flops": rng.uniform(1, 10) * 1e6,
            "exchange_bytes": rng.uniform(1e3, 1e4),
            "weight_bytes": 1e5,
            "input_bytes": 0.0,
            "importance": rng.exponential(),
        }
        for _ in range(groups)
    ]
    ds = [
        {
            "speed": rng.uniform(1, 4) * 1e9,
            "bandwidth": rng.uniform(1, 5) * 1e6,
            "latency": 1e-4,
            "plr": float(rng.uniform(0, 0.1)),
            "burst_length": 1.0,
            "bandwidth_down": 0.0,
            "capacity_bytes": 1e300,
        }
        for _ in range(devices)
    ]
    ds[0]["plr"] = 0.0
    return gs, ds


def best_of(fn, repeats=7):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    gs, ds = instance(0, 1000, 16)
    t_rr, rr = best_of(lambda: core.balance(gs, ds, "round_robin", 0.03))
    t_fast, fast = best_of(lambda: core.balance(gs, ds, "halo", 0.03))
    t_api, _ = best_of(lambda: sched.balance(gs, ds, loss_budget=0.03))
    print("1000 groups x 16 devices")
    print(f"  round-robin split : {t_rr * 1e3:7.2f} ms  step {rr['makespan'] * 1e3:8.3f} ms")
    print(
        f"  halo balancer     : {t_fast * 1e3:7.2f} ms  step {fast['makespan'] * 1e3:8.3f} ms "
        f"({rr['makespan'] / fast['makespan']:.2f}x shorter step than round-robin)"
    )
    print(f"  via halo.sched    : {t_api * 1e3:7.2f} ms (incl. Python -> C++ conversion)")
    gs, ds = instance(1, 14, 3)
    t_orc, orc = best_of(lambda: sched.oracle(gs, ds, loss_budget=0.03), repeats=3)
    t_small, small = best_of(lambda: sched.balance(gs, ds, loss_budget=0.03))
    print("14 groups x 3 devices")
    print(f"  MIP oracle (highs): {t_orc * 1e3:7.2f} ms  step {orc.makespan * 1e3:8.4f} ms")
    print(
        f"  halo balancer     : {t_small * 1e3:7.2f} ms  step {small.makespan * 1e3:8.4f} ms "
        f"(gap {100 * (small.makespan / orc.makespan - 1):.2f} %, {t_orc / t_small:.0f}x faster)"
    )


def hard_family(seeds: int) -> None:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "tests" / "python"))
    from test_sched import hard_instance

    gaps, bound_gaps, times, proved, infeasible = [], [], [], 0, 0
    for seed in range(seeds):
        gs, ds, budget = hard_instance(seed, (12, 40), (3, 7))
        t0 = time.perf_counter()
        fast = sched.balance(gs, ds, loss_budget=budget)
        times.append(time.perf_counter() - t0)
        try:
            exact = sched.oracle(gs, ds, loss_budget=budget, time_limit=20, require_optimal=False)
        except RuntimeError:
            infeasible += 1  # HiGHS found no placement within the budget in time
            continue
        proved += exact.extra["optimal"]
        gaps.append(fast.makespan / exact.makespan - 1)
        bound_gaps.append(fast.makespan / exact.extra["bound"] - 1)
    g, b = np.array(gaps), np.array(bound_gaps)
    print(
        f"hard family, {len(g)} instances ({proved} proved optimal by HiGHS in 20 s, {infeasible} without a plan)"
    )
    print(
        f"  gap to the oracle's placement: max {g.max():.2%}, mean {g.mean():.2%}, above 2 %: {(g > 0.02).sum()}"
    )
    print(
        f"  gap to the oracle's lower bound (upper bound on the true gap): max {b.max():.2%}, mean {b.mean():.2%}"
    )
    print(f"  balancer time: median {np.median(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
    hard_family(int(sys.argv[1]) if len(sys.argv) > 1 else 60)
