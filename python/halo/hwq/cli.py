"""``halo hwq``: HALO-quantize a Hugging Face model folder with calibration text.

    halo hwq --model DIR --calib FILE --out DIR [--hw table.json] [--grid subset|int4|int8]
             [--mode performance|energy] [--preset performance|balanced|accuracy]

FILE holds one calibration text per line. OUT (a new or empty folder; with ``--force``,
one that halo wrote, see ``halo._output``) gets
``quantized.safetensors`` (per layer: int8 codes, scales, CSR part), ``plan.json``
(per layer: tile shape, execution order, point per tile, switches),
``report.json`` / ``report.md`` (per-layer error, bits, estimated speed-up and
energy), ``hardware_model.json``, the model's ``config.json`` and, with ``--plots``,
``plots/`` (a tile clock map per layer and error vs speed-up) and ``.halo-output.json``.
Everything is written to a temporary folder beside OUT and renamed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser("hwq", help="HALO hardware-aware quantization of a model folder")
    parser.add_argument("--model", required=True, help="Hugging Face model folder (config.json + weights)")
    parser.add_argument("--calib", required=True, help="calibration text file, one sample per line")
    parser.add_argument("--out", required=True, help="output folder (new or empty)")
    parser.add_argument(
        "--force", action="store_true", help="replace an output folder halo wrote (nothing else)"
    )
    parser.add_argument("--hw", help="hardware model JSON (default: the built-in structural model)")
    parser.add_argument(
        "--grid",
        choices=("subset", "int4", "int8"),
        help="code books: INT8 subsets of each point's book_size (default), the 4-bit grid, or the INT8 grid",
    )
    parser.add_argument("--bits", type=int, choices=(4, 8), help="the int4 / int8 grid modes (as --grid)")
    parser.add_argument("--mode", default="performance", choices=("performance", "energy"))
    parser.add_argument("--preset", default="balanced", choices=("performance", "balanced", "accuracy"))
    parser.add_argument("--tile", type=int, nargs=2, default=(128, 128), metavar=("ROWS", "COLS"))
    parser.add_argument("--sensitivity", default="activation", choices=("activation", "fisher", "magnitude"))
    parser.add_argument("--max-switches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument(
        "--tile-scale",
        action="store_true",
        help="one scale per tile instead of one per row inside each tile (fewer bits on small tiles)",
    )
    parser.add_argument(
        "--plots", action="store_true", help="also write plots/ (tile clock map per layer; matplotlib)"
    )
    parser.set_defaults(handler=run)


def _fail(message: str) -> int:
    print(f"halo hwq: error: {message}", file=sys.stderr)
    return 2


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        lines = [line.strip() for line in handle if line.strip()]
    if not lines:
        raise ValueError(f"calibration file {path!r} holds no text")
    return lines


def _markdown(report, totals: dict) -> str:
    lines = [
        "# HALO quantization report",
        "",
        (
            f"Layers: {totals['layers']}, average bits {totals['average_bits']:.3f}, estimated speed-up "
            f"{totals['speedup']:.3f}x, energy saving {100 * totals['energy_saving']:.1f} % "
            "(against a uniform quantizer at the nominal point)."
        ),
        "",
        *[
            f"Against {name}: speed-up {totals['speedup_vs'][name]:.3f}x, energy saving "
            f"{100 * totals['energy_saving_vs'][name]:.1f} % ({totals['baseline_bits'][name]:.3f} bits)."
            for name in ("w8a8", "fp16")
            if "speedup_vs" in totals
        ],
        "",
        "| layer | shape | weighted error | bits | speed-up | energy saving | switches | sparse % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report.layers:
        lines.append(
            f"| {r.name} | {r.shape[0]}x{r.shape[1]} | {r.weighted_error:.5f} | {r.average_bits:.3f} | "
            f"{r.speedup:.3f} | {100 * r.energy_saving:.1f} % | {r.switches} | "
            f"{100 * r.sparse_fraction:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _write_plots(folder: str, report) -> None:
    from .plots import plot_error_vs_speedup, plot_tile_frequencies

    plots = os.path.join(folder, "plots")
    os.mkdir(plots)
    for name, q in report.quantized.items():
        plot_tile_frequencies(q, os.path.join(plots, f"{name}.png"), title=name)
    plot_error_vs_speedup(
        [(r.name.split(".")[-1], r.speedup, max(r.weighted_error, 1e-12)) for r in report.layers],
        os.path.join(plots, "error_vs_speedup.png"),
    )


def _write_outputs(folder: str, report, hw, model_dir: str) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    tensors, plan = {}, {}
    for name, q in report.quantized.items():
        tensors[f"{name}.codes"] = q.codes
        tensors[f"{name}.scales"] = q.scales
        tensors[f"{name}.sparse.indptr"] = np.asarray(q.sparse.indptr, np.int64)
        tensors[f"{name}.sparse.indices"] = np.asarray(q.sparse.indices, np.int32)
        tensors[f"{name}.sparse.values"] = np.asarray(q.sparse.values, np.float32)
        plan[name] = {
            "shape": list(q.shape),
            "tile": list(q.tile_shape),
            "bits": q.bits,
            "grid": q.grid_mode,
            "mode": q.mode,
            "books": {str(p): list(b) for p, b in zip(q.ladder, q.books)},
            "order": q.plan.order.tolist(),
            "point": q.plan.point.tolist(),
            "switches": q.plan.switches,
            "segments": [{"voltage": v, "frequency_ghz": f, "tiles": n} for v, f, n in q.plan.segments()],
        }
    save_file(
        tensors,
        os.path.join(folder, "quantized.safetensors"),
        metadata={"format": "halo.hwq", "version": "1"},
    )
    totals = report.totals()
    with open(os.path.join(folder, "plan.json"), "w", encoding="utf-8") as out:
        json.dump(plan, out)
    with open(os.path.join(folder, "report.json"), "w", encoding="utf-8") as out:
        json.dump({"totals": totals, "layers": [r.as_dict() for r in report.layers]}, out, indent=2)
    with open(os.path.join(folder, "report.md"), "w", encoding="utf-8") as out:
        out.write(_markdown(report, totals))
    hw.save(os.path.join(folder, "hardware_model.json"))
    shutil.copy(os.path.join(model_dir, "config.json"), os.path.join(folder, "config.json"))


def run(args: argparse.Namespace) -> int:
    try:
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            return _fail(f"--model {args.model!r} is not a model folder (no config.json)")
        from .._output import check

        inputs = [(args.model, "model folder"), (args.calib, "calibration file")]
        inputs += [(args.hw, "hardware model")] if args.hw else []
        guard = check("hwq", args.out, inputs, "folder", args.force)
        if args.max_switches < 0 or args.batch_size < 1 or args.max_length < 1:
            return _fail("--max-switches must be >= 0 and --batch-size, --max-length >= 1")
        if min(args.tile) < 1:
            return _fail(f"--tile must be two positive sizes, got {args.tile[0]} {args.tile[1]}")
        if args.bits is not None and args.grid is not None and args.grid != f"int{args.bits}":
            return _fail(f"--bits {args.bits} selects grid int{args.bits} but --grid {args.grid} was given")
        lines = _read_lines(args.calib)
        from .hardware import HardwareModel

        hw = HardwareModel.load(args.hw) if args.hw else HardwareModel.default()

        import transformers

        from .hf import halo_quantize_model

        config = transformers.AutoConfig.from_pretrained(args.model)
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        loader = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = loader.from_pretrained(args.model).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batches = []
        for start in range(0, len(lines), args.batch_size):
            batch = dict(
                tokenizer(
                    lines[start : start + args.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=args.max_length,
                    return_tensors="pt",
                )
            )
            if args.sensitivity == "fisher" and causal:
                batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            batches.append(batch)
        report = halo_quantize_model(
            model,
            batches,
            sensitivity=args.sensitivity,
            hw=hw,
            tile=tuple(args.tile),
            max_switches=args.max_switches,
            grid=args.grid,
            bits=args.bits,
            mode=args.mode,
            preset=args.preset,
            channel_scales=not args.tile_scale,
        )
        with guard.writing():
            _write_outputs(str(guard.temp), report, hw, args.model)
            if args.plots:
                _write_plots(str(guard.temp), report)
            guard.commit()
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        return _fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
    except KeyboardInterrupt as error:
        print(f"halo hwq: {str(error) or 'interrupted'}; --out was left as it was", file=sys.stderr)
        return 128 + getattr(error, "signum", 2)
    totals = report.totals()
    print(
        f"halo hwq: {totals['layers']} layers, {totals['average_bits']:.3f} bits, est. speed-up "
        f"{totals['speedup']:.3f}x, energy saving {100 * totals['energy_saving']:.1f} % -> {args.out}"
    )
    return 0
