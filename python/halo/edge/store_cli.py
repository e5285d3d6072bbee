"""``halo edge store`` (write a model's 4-bit group store) and ``halo edge local`` (run a model
in one process from its store under a memory budget)."""

from __future__ import annotations

import argparse
import os
import sys

from .cli import attempt, fail, made_by, write_result


def register(sub) -> None:
    s = sub.add_parser("store", help="write a model's neuron groups to a 4-bit group store file")
    s.add_argument("--model", required=True, help="Hugging Face model folder (LLaMA or BERT)")
    s.add_argument("--out", required=True, help="store file to write (.halogrp)")
    s.add_argument("--group-size", type=int, default=128, help="FFN neurons per group")
    s.add_argument("--heads-per-group", type=int, default=None, help="default: one key/value head's queries")
    s.add_argument("--quant", choices=("nf4", "fp4"), default="nf4")
    s.add_argument("--blocksize", type=int, default=64)
    s.add_argument("--force", action="store_true", help="replace an existing group store (nothing else)")
    s.set_defaults(handler=_store)

    loc = sub.add_parser(
        "local", help="run the model in this process from its group store, under a memory budget"
    )
    loc.add_argument("--model", required=True)
    loc.add_argument("--store", default=None, help="group store file (default: built in --store-dir)")
    loc.add_argument("--store-dir", default=None, help="where group stores are built (default ~/.cache/halo)")
    loc.add_argument("--plan", default=None, help="edge plan with predictors (modes predict, static)")
    loc.add_argument(
        "--memory-budget", default=None, metavar="SIZE", help="e.g. 16MiB or 25%% (default: all)"
    )
    loc.add_argument(
        "--mode",
        choices=("predict", "static", "demand", "mmap", "resident"),
        default=None,
        help="default: predict with a plan that has predictors, else static (resident without a budget)",
    )
    loc.add_argument("--prompt", required=True)
    loc.add_argument("--tokens", type=int, default=16)
    loc.add_argument("--group-size", type=int, default=128, help="without a plan: FFN neurons per group")
    loc.add_argument(
        "--json", metavar="FILE", help="also write the result as JSON (replaces only a result halo wrote)"
    )
    loc.set_defaults(handler=_local)


def _store(args: argparse.Namespace) -> int:
    from .store import build_store

    options = (args.group_size, args.heads_per_group, args.quant, args.blocksize, args.force)
    path, code = attempt("store", lambda: build_store(args.model, args.out, *options))
    if code:
        return code
    print(f"halo edge store: {os.path.getsize(path) / 2**20:.1f} MiB -> {os.fspath(path)}")
    return 0


def _local(args: argparse.Namespace) -> int:
    import torch

    from .model import EdgeError, default_heads_per_group, fingerprint, read_spec
    from .plan import load_plan, tokenize
    from .store import StreamedLocal, budget_text, ensure_store, parse_budget

    torch.set_num_threads(1)
    if args.tokens < 1:
        return fail("local", ValueError(f"--tokens must be >= 1, got {args.tokens}"))
    try:
        spec = read_spec(args.model)
        plan = load_plan(args.plan, spec, fingerprint(args.model)) if args.plan is not None else None
        mode = args.mode or ("predict" if plan is not None and plan.predictor is not None else "static")
        if args.memory_budget is None:
            budget = None
            mode = args.mode or "resident"
        else:
            budget = parse_budget(args.memory_budget)
        group_size = plan.group_size if plan is not None else args.group_size
        hpg = plan.heads_per_group if plan is not None else default_heads_per_group(spec)
        store = ensure_store(args.model, group_size, hpg, path=args.store, directory=args.store_dir)
        json_out = _json_target(args, store) if args.json else None
        ids = tokenize(args.model, args.prompt)
        with StreamedLocal(args.model, store, plan=plan, budget=budget, mode=mode) as runner:
            result = runner.generate(ids, args.tokens)
            stats = runner.stats()
            damaged = runner.store.errors()
        if damaged:
            key, why = damaged[0]
            more = f" (and {len(damaged) - 1} more groups)" if len(damaged) > 1 else ""
            raise EdgeError(
                f"the group store {store} is damaged: group {'.'.join(map(str, key))}: {why}{more}; "
                "rebuild it with halo edge store --force"
            )
    except (EdgeError, ValueError) as exc:
        return fail("local", exc)
    except KeyboardInterrupt:
        return 130
    from transformers import AutoTokenizer

    result["text"] = AutoTokenizer.from_pretrained(args.model).decode(result["tokens"])
    print(result["text"])
    decode = result["decode_s"]
    per_token = sum(decode) / len(decode) * 1e3 if decode else float("nan")
    print(
        f"halo edge local: {len(result['tokens'])} tokens, {per_token:.1f} ms/token, mode {mode}, budget "
        f"{budget_text(stats['budget'])} of {budget_text(stats['held_bytes'])}, "
        f"{stats['bytes_read'] / 2**20:.1f} MiB read, {stats['missing_fraction']:.1%} groups missing",
        file=sys.stderr,
    )
    if json_out is not None:
        result["store"] = stats
        return write_result(json_out, result, "local")
    return 0


def _json_target(args: argparse.Namespace, store):
    """--json checked before the run: never an input, replaces only a result halo wrote."""

    from .._output import check

    inputs = [(args.model, "model folder"), (store, "group store")]
    inputs += [(args.plan, "plan")] if args.plan else []
    return check("edge local", args.json, inputs, "file", True, made_by("local"), flag="--json")
