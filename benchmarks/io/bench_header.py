"""safetensors header parsing: halo's validating C++ parser against the reference reader.

Builds headers of a checkpoint-like shape (names like model.layers.N.mlp.up_proj.weight,
2-D shapes, contiguous offsets) with 300 (one shard), 5,000 and 50,000 tensors, and times,
interleaved in the same run (A, B, C, A, B, C, ...):
  halo      halo._core.io.parse_header (JSON parse + full validation, no file I/O)
  json      Python's json.loads of the same text (parse only, no validation)
  reference safetensors.safe_open on a file with that header (Rust; parse, validation, mmap)

    python benchmarks/io/bench_header.py [--quick]
"""

from __future__ import annotations

import json
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

from halo._core import io as core_io
from safetensors import safe_open


def header(count: int) -> tuple[str, int]:
    entries, offset = {}, 0
    for i in range(count):
        name = f"model.layers.{i // 9}.{('self_attn', 'mlp')[i % 2]}.proj_{i % 9}.weight"
        shape = [1 + i % 7, 1 + i % 5]
        nbytes = shape[0] * shape[1]
        entries[name] = {"dtype": "U8", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    entries["__metadata__"] = {"format": "pt"}
    return json.dumps(entries), offset


def main() -> None:
    quick = "--quick" in sys.argv
    reps = 3 if quick else 7
    print(
        f"{'tensors':>8} {'header KiB':>10} {'halo ms':>18} {'json.loads ms':>18} {'reference ms':>18} "
        f"{'halo/json':>9} {'halo/ref':>9}   (min / median of {reps})"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for count in (300, 5000) if quick else (300, 5000, 50000):
            text, data_size = header(count)
            raw = text.encode()
            path = Path(tmp) / f"h{count}.safetensors"
            path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_size)
            inner = max(1, 20000 // count)

            def halo_parse(text=text, data_size=data_size, inner=inner):
                for _ in range(inner):
                    core_io.parse_header(text, data_size, "<bench>")

            def json_parse(text=text, inner=inner):
                for _ in range(inner):
                    json.loads(text)

            def reference(path=path, inner=inner):
                for _ in range(inner):
                    with safe_open(str(path), "np") as f:
                        f.keys()

            times: dict[str, list[float]] = {"halo": [], "json": [], "ref": []}
            for fn in (halo_parse, json_parse, reference):  # warm-up
                fn()
            for _ in range(reps):
                for key, fn in (("halo", halo_parse), ("json", json_parse), ("ref", reference)):
                    start = time.perf_counter()
                    fn()
                    times[key].append((time.perf_counter() - start) / inner * 1e3)

            def cell(key, times=times):
                return f"{min(times[key]):8.3f} / {statistics.median(times[key]):7.3f}"

            ratio_json = statistics.median(times["halo"]) / statistics.median(times["json"])
            ratio_ref = statistics.median(times["halo"]) / statistics.median(times["ref"])
            print(
                f"{count:>8} {len(raw) / 1024:>10.0f} {cell('halo'):>18} {cell('json'):>18} {cell('ref'):>18} "
                f"{ratio_json:>9.2f} {ratio_ref:>9.2f}"
            )


if __name__ == "__main__":
    main()
