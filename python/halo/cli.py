"""The ``halo`` command: a dispatcher; each subcommand lives in its own module.

A subcommand module offers ``register(subparsers)``, which adds its parser and
sets ``handler`` (a function of the parsed arguments returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMAND_MODULES = ("halo.hwq.cli", "halo.lora.merge_cli", "halo.gguf.cli", "halo.edge.cli")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="halo", description="halo command-line tools")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_usage(sys.stderr)
        print("halo: error: a command is required", file=sys.stderr)
        return 2
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
