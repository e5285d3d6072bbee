"""``halo merge``: stream a LoRA adapter into a Hugging Face model folder."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge a PEFT LoRA adapter into a model folder, tensor by tensor")
    p.add_argument("--base", required=True, help="Hugging Face model folder (safetensors, single or sharded)")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder (adapter_config.json + weights)")
    p.add_argument("--out", required=True, help="output folder (written to a temp folder, then renamed)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="output float dtype")
    p.add_argument("--quantize", choices=("nf4",), default=None, help="write a bitsandbytes NF4 checkpoint")
    p.add_argument(
        "--force", action="store_true", help="replace a non-empty --out (never one holding an input)"
    )
    p.add_argument(
        "--no-fsync",
        action="store_true",
        help="skip fsync of the output before it is swapped in (faster; a power cut may damage it)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(handler=run)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def run(args: argparse.Namespace) -> int:
    from .._output import Interrupted
    from .merge_checkpoint import merge

    try:
        summary = merge(
            args.base,
            args.adapter,
            args.out,
            dtype=args.dtype,
            quantize=args.quantize,
            progress=not args.quiet,
            force=args.force,
            fsync=not args.no_fsync,
        )
    except (ValueError, TypeError, OSError) as exc:
        print(f"halo merge: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"halo merge: {exc}; the output folder was left as it was", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("halo merge: interrupted; the output folder was left as it was", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"halo merge: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(summary)
    return 0
