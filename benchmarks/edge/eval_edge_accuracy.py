"""What lost terms cost HALO edge inference in accuracy, measured in one process in seconds.

The simulator runs SmolLM2-135M's groups in this process (``halo.edge.compute.LocalCluster``), takes
the critical set and the compensation from the runtime's own ``halo.edge.policy.TermPolicy`` (the
object ``halo.edge.root.Root`` uses) and drops, with a seeded generator, what the network would:

* every datagram of a non-critical term (one row of one group: a 576-wide float16 row fills a
  datagram) independently with probability p (worker -> root);
* the layer input (root -> worker) travels reliably; a decode input goes twice (an unreliable
  copy first): when both are lost (p^2) it arrives a retransmission later, past the deadline,
  so that worker's non-critical terms of the exchange are lost too (a prefill's deadline
  scales with its rows and absorbs ENet's few-ms resends of its fragments);
* critical terms are never lost (they come reliably; they only cost time);
* with ``duplicate`` (the runtime's ``duplicate_other``) a non-critical row goes twice and is
  lost only if both copies are (p^2).

Held-out text: standard-library docstrings n-z (the plan calibrates on a-m), teacher-forced:
a 32-token prefill, then one token per forward, scored against the lossless run (every term
delivered) on perplexity and next-token agreement, over several loss seeds (min / median / max).

    python benchmarks/edge/eval_edge_accuracy.py                      # the policy table at 5 %
    python benchmarks/edge/eval_edge_accuracy.py --kinds              # cost per exchange kind
    python benchmarks/edge/eval_edge_accuracy.py --loss 0.1 --seeds 5 --tokens 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
SMOL = REPO / "build" / "models" / "smollm2-135m"
OUT = REPO / "build" / "edge_bench"
PREFILL = 32


class Simulated:
    """A root whose exchanges run in-process with seeded losses (see the module docstring).

    ``drop``: which exchanges may lose terms, a predicate (layer, part, prefill) -> bool (the
    per-kind measurements lose terms of one kind only); every term of the others arrives."""

    def __init__(self, model_dir, plan, policy, loss: float, seed: int, drop=None, duplicate=False) -> None:
        from halo.edge.compute import LocalCluster, RootModel
        from halo.edge.model import Checkpoint, layout, read_spec

        self.spec = read_spec(model_dir)
        ck = Checkpoint(model_dir)
        self.groups = layout(self.spec, plan.group_size, plan.heads_per_group)
        self.cluster = LocalCluster(ck, self.spec, self.groups)
        self.model = RootModel(ck, self.spec)
        self.plan, self.policy, self.loss = plan, policy, loss
        self.rng = np.random.default_rng(seed)
        self.drop = drop
        self.other_loss = loss**2 if duplicate else loss
        self.expected = self.delivered = 0
        self.ffn = {layer: self._stacked_ffn(ck, layer) for layer in range(self.spec.layers)}

    def _stacked_ffn(self, ck, layer):
        """A layer's FFN weights stacked by group, so one batched product gives every group's
        term (what ``GroupCompute`` does group by group); None where groups differ in size."""
        from halo.edge.model import FFN, _names

        gs = self.groups[layer][FFN]
        size = gs[0].stop - gs[0].start
        if self.spec.family != "llama" or any(
            g.stop - g.start != size or g.start != i * size for i, g in enumerate(gs)
        ):
            return None
        names = _names(self.spec, layer)
        G, stop = len(gs), gs[-1].stop
        gate = ck.get(names["gate"] + ".weight")[:stop].float()
        up = ck.get(names["up"] + ".weight")[:stop].float()
        down = ck.get(names["down"] + ".weight")[:, :stop].float()
        return (
            gate,
            up,
            down.reshape(down.shape[0], G, size).permute(1, 2, 0).contiguous(),
        )  # [G, size, hidden]

    def _terms(self, layer, part, h, pos):
        import torch

        stacked = self.ffn.get(layer) if part == 1 else None
        if stacked is None:
            return torch.stack(self.cluster.compute.run(self.groups[layer][part], h, pos))
        gate, up, down = stacked
        act = torch.nn.functional.silu(h @ gate.T) * (h @ up.T)  # [rows, G * size]
        G, size, _ = down.shape
        return torch.bmm(act.view(h.shape[0], G, size).transpose(0, 1), down)  # [G, rows, hidden]

    def exchange(self, layer: int, part: int, h, pos: int):
        import torch

        x = np.ascontiguousarray(h.numpy(), dtype=np.float32)
        rows, hidden = x.shape
        critical = self.policy.critical(layer, part, x).astype(bool)
        out = self._terms(layer, part, h, pos).numpy().copy()
        count = out.shape[0]
        received = np.ones((count, rows), bool)
        if self.loss > 0 and (self.drop is None or self.drop(layer, part, rows > 1)):
            received = self.rng.random((count, rows)) >= self.other_loss
            owners = np.asarray(self.plan.assignment[layer][part])
            for w in np.unique(owners):
                if rows == 1 and self.rng.random() < self.loss**2:
                    received[owners == w] = False
            received[critical] = True
        self.expected += received.size
        self.delivered += int(received.sum())
        out[~received] = 0
        self.policy.compensate(layer, part, x, out, received)
        return torch.from_numpy(out.sum(0))

    def score(self, ids):
        """Teacher-forced NLL and argmax per position: prefill, then one token per forward."""
        import torch

        nll, top = [], []
        pos = 0
        with torch.no_grad():
            while pos < len(ids) - 1:
                n = PREFILL if pos == 0 else 1
                logits = self.model.forward(ids[pos : pos + n], pos, self.exchange)
                logp = torch.log_softmax(logits.double(), dim=-1)
                for r in range(n):
                    nll.append(-float(logp[r, ids[pos + r + 1]]))
                    top.append(int(torch.argmax(logits[r])))
                pos += n
        return {"nll": nll, "argmax": top}


def policy_for(plan, predictors, spec, **knobs):
    from halo.edge.model import layout
    from halo.edge.policy import TermPolicy

    groups = layout(spec, plan.group_size, plan.heads_per_group)
    return TermPolicy(groups, plan.importance, predictors, **knobs)


# The configurations of the policy table: the runtime's old defaults, then one change at a time.
CONFIGS = {
    "old (top 25 %; predictor estimate)": dict(
        critical_fraction=0.25, compensation="predictor", reliable_attention=False, reliable_prefill=False
    ),
    "attention + prefill reliable": dict(
        critical_fraction=0.25, compensation="predictor", reliable_attention=True, reliable_prefill=True
    ),
    "+ running-mean compensation": dict(
        critical_fraction=0.25, compensation="mean", reliable_attention=True, reliable_prefill=True
    ),
    "+ coverage 0.5": dict(
        critical_fraction=0.25,
        compensation="mean",
        coverage=0.5,
        reliable_attention=True,
        reliable_prefill=True,
    ),
    "attention + prefill reliable; non-critical twice": dict(
        critical_fraction=0.25,
        compensation="predictor",
        reliable_attention=True,
        reliable_prefill=True,
        duplicate=True,
    ),
    "attention + prefill reliable; non-critical twice; running mean": dict(
        critical_fraction=0.25,
        compensation="mean",
        reliable_attention=True,
        reliable_prefill=True,
        duplicate=True,
    ),
}


CONFIG_NAMES = list(CONFIGS)


def summary(run, ref) -> dict:
    n = min(len(run["nll"]), len(ref["nll"]))
    ppl = math.exp(statistics.mean(run["nll"][:n]))
    ref_ppl = math.exp(statistics.mean(ref["nll"][:n]))
    agree = float(np.mean(np.array(run["argmax"][:n]) == np.array(ref["argmax"][:n])))
    return {"positions": n, "ppl": ppl, "ppl_ratio": ppl / ref_ppl, "agreement": agree}


def spread(values):
    return min(values), statistics.median(values), max(values)


def load(args):
    import torch

    torch.set_num_threads(1)
    from halo import edge
    from halo.edge.model import layout
    from halo.edge.plan import docstring_text, tokenize
    from halo.edge.predictor import load_predictors

    spec = edge.read_spec(SMOL)
    OUT.mkdir(parents=True, exist_ok=True)
    plan_path = OUT / "smollm2_plan.json"
    try:
        plan = edge.load_plan(plan_path, spec)
    except edge.EdgeError:
        print("calibrating SmolLM2 (importance + predictors, 512 tokens)...", flush=True)
        plan = edge.make_plan(SMOL, 4, calibration_tokens=512, out=plan_path)
    groups = layout(spec, plan.group_size, plan.heads_per_group)
    predictors = load_predictors(plan.predictor_path(), spec, groups)
    ids = tokenize(SMOL, docstring_text("n", "z", max_words=3 * (args.tokens + PREFILL)))
    ids = ids[: PREFILL + args.tokens + 1]
    if len(ids) < PREFILL + args.tokens + 1:
        raise SystemExit(f"only {len(ids)} tokens of held-out text")
    return spec, plan, predictors, ids


def evaluate(spec, plan, predictors, ids, knobs, loss, seeds, drop=None):
    runs = []
    knobs = dict(knobs)
    duplicate = knobs.pop("duplicate", False)
    for seed in seeds:
        policy = policy_for(plan, predictors, spec, **knobs)
        sim = Simulated(SMOL, plan, policy, loss, seed, drop, duplicate)
        r = sim.score(ids)
        r["delivered"] = sim.delivered / max(sim.expected, 1)
        runs.append(r)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256, help="decode positions after the prefill")
    parser.add_argument("--kinds", action="store_true", help="the cost of losing terms of one kind only")
    parser.add_argument("--configs", default=None, help="comma-separated names from the policy table")
    args = parser.parse_args()
    if not SMOL.exists():
        print(f"eval_edge_accuracy: skipped, {SMOL} missing (make model)")
        return 0
    spec, plan, predictors, ids = load(args)
    seeds = list(range(args.seeds))
    t0 = time.monotonic()
    # The lossless run (every term delivered), kept beside the plan for the other processes.
    ref_path = OUT / f"accuracy_reference_{len(ids)}.json"
    try:
        ref = json.loads(ref_path.read_text())
        assert ref["ids"] == ids
    except (OSError, ValueError, KeyError, AssertionError):
        ref = Simulated(SMOL, plan, policy_for(plan, predictors, spec), 0.0, 0).score(ids)
        ref["ids"] = ids
        tmp = ref_path.with_name(f".{ref_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(ref))
        os.replace(tmp, ref_path)
    print(
        f"SmolLM2-135M, {len(ref['nll'])} teacher-forced positions of held-out text ({PREFILL}-token prefill), "
        f"lossless ppl {math.exp(statistics.mean(ref['nll'])):.2f}; loss {args.loss:.0%}, seeds {seeds}; "
        f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results = {"loss": args.loss, "seeds": seeds, "positions": len(ref["nll"]), "rows": []}
    if args.kinds:
        # Lose terms of one kind only (old policy: nothing but the top 25 % protected, zero fill),
        # to see where reliability buys accuracy.
        knobs = dict(
            critical_fraction=0.25, compensation="zero", reliable_attention=False, reliable_prefill=False
        )
        L = spec.layers
        kinds = {
            "attention, decode": lambda layer, part, pre: part == 0 and not pre,
            "FFN, decode": lambda layer, part, pre: part == 1 and not pre,
            "attention, prefill": lambda layer, part, pre: part == 0 and pre,
            "FFN, prefill": lambda layer, part, pre: part == 1 and pre,
        }
        for lo in range(0, L, L // 5):
            hi = min(lo + L // 5, L)
            kinds[f"FFN decode, layers {lo}-{hi - 1}"] = lambda layer, part, pre, lo=lo, hi=hi: (
                part == 1 and not pre and lo <= layer < hi
            )
        print(
            "| terms that may be lost | ppl vs lossless min / median / max | agreement min / median / max |"
        )
        print("|---|---|---|")
        for name, drop in kinds.items():
            runs = evaluate(spec, plan, predictors, ids, knobs, args.loss, seeds, drop)
            s = [summary(r, ref) for r in runs]
            row = {"kind": name, "runs": s}
            results["rows"].append(row)
            pr = spread([x["ppl_ratio"] - 1 for x in s])
            ag = spread([x["agreement"] for x in s])
            print(
                f"| {name} | {pr[0]:+.1%} / {pr[1]:+.1%} / {pr[2]:+.1%} | "
                f"{ag[0]:.3f} / {ag[1]:.3f} / {ag[2]:.3f} |",
                flush=True,
            )
        (OUT / f"accuracy_kinds_{args.loss:g}.json").write_text(json.dumps(results, indent=1))
    else:
        names = list(CONFIGS) if args.configs is None else [c.strip() for c in args.configs.split(",")]
        print("| policy | delivered | ppl vs lossless min / median / max | agreement min / median / max |")
        print("|---|---|---|---|")
        for name in names:
            runs = evaluate(spec, plan, predictors, ids, CONFIGS[name], args.loss, seeds)
            s = [summary(r, ref) for r in runs]
            delivered = statistics.mean(r["delivered"] for r in runs)
            results["rows"].append(
                {"policy": name, "knobs": CONFIGS[name], "delivered": delivered, "runs": s}
            )
            pr = spread([x["ppl_ratio"] - 1 for x in s])
            ag = spread([x["agreement"] for x in s])
            print(
                f"| {name} | {delivered:.3f} | {pr[0]:+.1%} / {pr[1]:+.1%} / {pr[2]:+.1%} | "
                f"{ag[0]:.3f} / {ag[1]:.3f} / {ag[2]:.3f} |",
                flush=True,
            )
        tag = "" if args.configs is None else "_" + "_".join(str(CONFIG_NAMES.index(n)) for n in names)
        (OUT / f"accuracy_{args.loss:g}{tag}.json").write_text(json.dumps(results, indent=1))
    print(f"eval_edge_accuracy: {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
