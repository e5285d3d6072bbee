"""``halo export-gguf`` and ``halo import-gguf``: llama.cpp GGUF files from and to
Hugging Face folders (see ``halo.gguf.export`` and ``halo.gguf.importer``)."""

from __future__ import annotations

import argparse
import sys

from .arch import FILE_TYPES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export-gguf",
        help="write a model folder (+ optional LoRA adapter) as a llama.cpp GGUF file, streaming",
    )
    p.add_argument(
        "--model", required=True, help="Hugging Face model folder (safetensors, single or sharded)"
    )
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder to merge on the fly")
    p.add_argument("--out", required=True, help="output .gguf file (written to a temp file, then renamed)")
    p.add_argument("--type", default="q4_k_m", choices=tuple(FILE_TYPES), help="llama.cpp file type")
    p.add_argument(
        "--pre-tokenizer", default=None, help="llama.cpp pre-tokenizer name when it cannot be detected"
    )
    p.add_argument("--name", default=None, help="general.name (default: the model folder's name)")
    p.add_argument("--force", action="store_true", help="replace a GGUF file halo wrote (nothing else)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(handler=run_export)

    q = subparsers.add_parser("import-gguf", help="convert a GGUF model to a Hugging Face safetensors folder")
    q.add_argument("file", help="GGUF file (LLaMA / Mistral / Qwen2 architecture)")
    q.add_argument("--out", required=True, help="output folder (written to a temp folder, then renamed)")
    q.add_argument(
        "--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="weight dtype"
    )
    q.add_argument("--force", action="store_true", help="replace an output folder halo wrote (nothing else)")
    q.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    q.set_defaults(handler=run_import)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _run(command: str, call) -> int:
    try:
        summary = call()
    except (ValueError, TypeError, OSError, KeyError) as exc:
        print(f"halo {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM / SIGHUP as halo._output.Interrupted
        print(f"halo {command}: {str(exc) or 'interrupted'}; --out was left as it was", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)
    except Exception as exc:
        print(f"halo {command}: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1
    return summary


def run_export(args: argparse.Namespace) -> int:
    from .export import export_gguf

    summary = _run(
        "export-gguf",
        lambda: export_gguf(
            args.model,
            args.out,
            type=args.type,
            adapter=args.adapter,
            progress=not args.quiet,
            force=args.force,
            pre_tokenizer=args.pre_tokenizer,
            name=args.name,
        ),
    )
    if isinstance(summary, int):
        return summary
    if not args.quiet:
        print(summary)
    return 0


def run_import(args: argparse.Namespace) -> int:
    from .importer import import_gguf

    summary = _run(
        "import-gguf",
        lambda: import_gguf(args.file, args.out, dtype=args.dtype, force=args.force, progress=not args.quiet),
    )
    if isinstance(summary, int):
        return summary
    if not args.quiet:
        print(summary)
    return 0
