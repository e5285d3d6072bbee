"""``halo edge``: worker, plan and run commands of the edge runtime."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any


def register(subparsers) -> None:
    edge = subparsers.add_parser("edge", help="tensor-parallel inference over lossy links (HALO)")
    sub = edge.add_subparsers(dest="edge_command", metavar="EDGE_COMMAND")

    k = sub.add_parser("keygen", help="write a new pre-shared key for workers and roots (mode 0600)")
    k.add_argument("--out", required=True, metavar="FILE", help="key file to create (never overwritten)")
    k.set_defaults(handler=_keygen)

    w = sub.add_parser("worker", help="serve roots on ADDR:PORT (ENet/UDP and TCP)")
    w.add_argument("--listen", required=True, metavar="ADDR:PORT", help="numeric IPv4 address and port")
    w.add_argument(
        "--model",
        required=True,
        action="append",
        metavar="DIR",
        help="a model folder to serve (repeat for several); roots name it by its fingerprint",
    )
    _key_arguments(w)
    w.add_argument("--sessions", type=int, default=None, help="exit after serving this many roots")
    w.add_argument("--idle-timeout", type=float, default=None, help="exit after this many idle seconds")
    w.add_argument(
        "--memory-budget",
        default=None,
        metavar="SIZE",
        help="keep the groups on local disk (4-bit) and at most SIZE of them in memory (512MiB, 25%%)",
    )
    w.add_argument("--store-dir", default=None, help="where group stores are built (default ~/.cache/halo)")
    w.add_argument(
        "--plan",
        action="append",
        default=[],
        metavar="FILE",
        help="with --memory-budget: an edge plan of a served model (importance, predictors; its "
        "group layout is one the worker builds a store for); repeat for several",
    )
    w.set_defaults(handler=_worker)

    p = sub.add_parser("plan", help="place neuron groups on workers and fit the predictors")
    p.add_argument("--model", required=True, help="Hugging Face model folder (LLaMA or BERT)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--workers", type=int, help="number of identical workers")
    who.add_argument(
        "--devices", help="JSON list of devices (speed, bandwidth, latency, plr, burst_length...)"
    )
    p.add_argument("--out", required=True, help="plan file to write (predictor .npz goes beside it)")
    p.add_argument("--placement", choices=("balance", "round_robin"), default="balance")
    p.add_argument("--loss-budget", type=float, default=0.01)
    p.add_argument("--group-size", type=int, default=128, help="FFN neurons per group")
    p.add_argument("--heads-per-group", type=int, default=None, help="default: one key/value head's queries")
    p.add_argument("--calibration-tokens", type=int, default=512, help="0: static importance, no predictor")
    p.add_argument("--critical-fraction", type=float, default=0.25)
    p.set_defaults(handler=_plan)

    r = sub.add_parser("run", help="run the model on the workers")
    r.add_argument("--model", required=True)
    r.add_argument("--workers", required=True, metavar="A:P,B:P,...")
    r.add_argument("--plan", required=True)
    r.add_argument("--policy", choices=("halo", "tcp", "reliable-udp"), default="halo")
    r.add_argument("--tokens", type=int, default=16)
    r.add_argument("--prompt", required=True)
    r.add_argument("--compensation", choices=("zero", "previous", "predictor", "mean"), default=None)
    r.add_argument(
        "--protect",
        action="store_true",
        help="halo: attention and prefill terms reliable, the other terms sent twice",
    )
    r.add_argument(
        "--coverage",
        type=float,
        default=None,
        help="halo: protect FFN groups until they hold this share of the predicted term mass",
    )
    r.add_argument(
        "--weights", choices=("float32", "nf4"), default="float32", help="how workers hold weights"
    )
    r.add_argument("--connect-timeout", type=float, default=5.0)
    r.add_argument("--json", metavar="FILE", help="also write the result (timings, delivery) as JSON")
    _key_arguments(r)
    r.set_defaults(handler=_run)
    from .store_cli import register as register_store

    register_store(sub)
    edge.set_defaults(handler=lambda args: _usage(edge))


def _key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-file",
        default=None,
        metavar="FILE",
        help="pre-shared key (halo edge keygen; mode 0600); default $HALO_EDGE_KEY_FILE",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext links without a key: loopback addresses only (experiments)",
    )


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_usage(sys.stderr)
    print(
        "halo edge: error: a command is required (keygen, worker, plan, run, local or store)", file=sys.stderr
    )
    return 2


def fail(command: str, exc: BaseException) -> int:
    print(f"halo edge {command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
    return 1


def interrupted(command: str, exc: KeyboardInterrupt) -> int:
    print(f"halo edge {command}: {str(exc) or 'interrupted'}; the output was left as it was", file=sys.stderr)
    return 128 + getattr(exc, "signum", 2)


def attempt(command: str, work: Callable[[], Any]) -> tuple[Any, int]:
    """``work()`` for ``halo edge COMMAND``: (its result, 0), or (None, the exit code) after one
    line naming what went wrong, or saying that an interrupt left the output as it was."""
    from .model import EdgeError

    try:
        return work(), 0
    except (EdgeError, ValueError, OSError) as exc:
        return None, fail(command, exc)
    except KeyboardInterrupt as exc:
        return None, interrupted(command, exc)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _keygen(args: argparse.Namespace) -> int:
    from .link import write_key
    from .model import EdgeError

    try:
        path = write_key(args.out)
    except EdgeError as exc:
        return fail("keygen", exc)
    print(
        f"halo edge keygen: wrote {path} (mode 0600; copy it to the root and every worker)", file=sys.stderr
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    from .link import choose_key, parse_address
    from .model import EdgeError
    from .worker import serve

    _one_thread()
    try:
        host, _ = parse_address(args.listen, "listen address")
        key = choose_key(args.key_file, args.insecure, [host])
        if args.plan and args.memory_budget is None:
            raise EdgeError("--plan is for workers with --memory-budget")
        streaming = None
        if args.memory_budget is not None:
            from .store import WorkerStreaming

            streaming = WorkerStreaming(args.memory_budget, args.store_dir, log=sys.stderr, plans=args.plan)
        serve(
            args.listen,
            args.model,
            key=key,
            sessions=args.sessions,
            idle_timeout=args.idle_timeout,
            streaming=streaming,
        )
    except EdgeError as exc:
        return fail("worker", exc)
    except KeyboardInterrupt:
        return 130
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .model import EdgeError
    from .plan import make_plan

    def work():
        devices = args.workers
        if args.devices is not None:
            try:
                with open(args.devices) as f:
                    devices = json.load(f)
            except (OSError, ValueError) as exc:
                raise EdgeError(f"{args.devices}: {exc}") from None
            if not isinstance(devices, list):
                raise EdgeError(f"{args.devices}: expected a JSON list of devices")
        return make_plan(
            args.model,
            devices,
            placement=args.placement,
            loss_budget=args.loss_budget,
            group_size=args.group_size,
            heads_per_group=args.heads_per_group,
            calibration_tokens=args.calibration_tokens,
            critical_fraction=args.critical_fraction,
            out=args.out,
            inputs=[(args.devices, "devices file")] if args.devices is not None else (),
        )

    plan, code = attempt("plan", work)
    if code:
        return code
    print(f"halo edge plan: {plan.workers} workers, {plan.placement} placement -> {os.fspath(args.out)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from .link import choose_key, parse_address
    from .model import EdgeError
    from .root import run

    _one_thread()
    if args.tokens < 1:
        return fail("run", ValueError(f"--tokens must be >= 1, got {args.tokens}"))
    options = {"connect_timeout": args.connect_timeout, "weights": args.weights}
    if args.compensation is not None:
        options["compensation"] = args.compensation
    if args.coverage is not None:
        options["coverage"] = args.coverage
    if args.protect:
        options.update(reliable_attention=True, reliable_prefill=True, duplicate_other=True)
    try:
        if not os.path.exists(args.plan):
            raise EdgeError(f"{args.plan}: no such plan file")
        workers = [w for w in args.workers.split(",") if w.strip()]
        hosts = [parse_address(w, "worker address")[0] for w in workers]
        key = choose_key(args.key_file, args.insecure, hosts)
        json_out = _json_target(args) if args.json else None
        result = run(
            args.model, workers, args.plan, args.policy, args.tokens, args.prompt, key=key, **options
        )
    except (EdgeError, ValueError) as exc:
        return fail("run", exc)
    except KeyboardInterrupt:
        return 130
    if "text" in result:
        print(result["text"])
        decode = result["decode_s"]
        per_token = sum(decode) / len(decode) * 1e3 if decode else float("nan")
        print(
            f"halo edge run: {len(result['tokens'])} tokens, prefill {result['prefill_s'] * 1e3:.1f} ms, "
            f"{per_token:.1f} ms/token, delivered {result['delivered']:.1%}, re-plans {len(result['replans'])}",
            file=sys.stderr,
        )
    else:
        vector = result["embedding"]
        print(" ".join(f"{v:.5f}" for v in vector))
        print(
            f"halo edge run: embedding of {len(vector)} values in {result['forward_s'] * 1e3:.1f} ms, "
            f"delivered {result['delivered']:.1%}",
            file=sys.stderr,
        )
    if json_out is not None:
        return write_result(json_out, result, "run")
    return 0


_JSON_MARK = "halo_output"  # the mark that lets a later run replace the result file


def made_by(command: str):
    """Whether a file is a --json result ``halo edge COMMAND`` wrote (which it may replace)."""

    def halo_made(path) -> bool:
        small = path.stat().st_size < 1 << 26
        return small and json.loads(path.read_text()).get(_JSON_MARK) == f"halo edge {command}"

    return halo_made


def write_result(json_out, result: dict, command: str) -> int:
    """Writes ``result`` (marked as ``halo edge COMMAND``'s) through the checked --json target."""
    result[_JSON_MARK] = f"halo edge {command}"

    def work():
        with json_out.writing():
            json_out.temp.write_text(json.dumps(result))
            json_out.commit()

    return attempt(command, work)[1]


def _json_target(args: argparse.Namespace):
    """--json checked before the run (halo._output): never the model, the plan, its predictor
    or the key file, and it replaces only a result halo edge run wrote."""
    from pathlib import Path

    from .._output import check

    inputs = [(args.model, "model folder"), (args.plan, "plan")]
    try:  # the plan's predictor file, named in the plan (read here only for its name)
        with open(args.plan, encoding="utf-8") as f:
            predictor = json.loads(f.read(1 << 28)).get("predictor")
        if isinstance(predictor, str) and predictor:
            inputs.append((Path(args.plan).with_name(predictor), "plan's predictor file"))
    except (OSError, ValueError, AttributeError):
        pass  # run() reports a bad plan
    key_file = args.key_file or os.environ.get("HALO_EDGE_KEY_FILE")
    if key_file:
        inputs.append((key_file, "key file"))
    return check("edge run", args.json, inputs, "file", True, made_by("run"), flag="--json")
