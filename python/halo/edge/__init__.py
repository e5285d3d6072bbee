"""halo's edge runtime: HALO-style tensor-parallel inference over lossy links, for real.

A root process and N worker processes (each its own device, on this host or others) run a
LLaMA or BERT model split per layer into attention-head groups and FFN neuron groups, placed
by ``halo.sched.balance``. Transport is ENet (UDP): critical groups (picked per token by the
semantic predictor) come reliably, the rest unreliably with a deadline, and the root
compensates what is missing; ``tcp`` and ``reliable-udp`` are the wait-for-all baselines.

    >>> from halo import edge
    >>> plan = edge.make_plan("build/models/smollm2-135m", 4, out="plan.json")   # doctest: +SKIP
    >>> # on each worker host:  halo edge worker --listen 10.0.0.2:7000 --model DIR --key-file edge.key
    >>> out = edge.run("build/models/smollm2-135m", ["10.0.0.2:7000", ...], "plan.json",
    ...                policy="halo", tokens=16, prompt="The capital of France is",
    ...                key=edge.read_key("edge.key"))  # doctest: +SKIP

See docs/edge.md for the protocol, the test bed and measured figures.
"""

from __future__ import annotations

from .link import read_key, write_key
from .model import EdgeError, read_spec
from .plan import Plan, docstring_text, load_plan, make_plan, with_placement
from .policy import COMPENSATIONS
from .root import Root, run
from .runner import POLICIES, Local, RunOptions, Stats
from .worker import Worker, serve

__all__ = [
    "COMPENSATIONS",
    "POLICIES",
    "EdgeError",
    "Local",
    "Plan",
    "Root",
    "RunOptions",
    "Stats",
    "Worker",
    "docstring_text",
    "load_plan",
    "make_plan",
    "read_key",
    "read_spec",
    "run",
    "serve",
    "with_placement",
    "write_key",
]
