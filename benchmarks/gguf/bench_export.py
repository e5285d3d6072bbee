"""`halo export-gguf --adapter --type q4_k_m` against the llama.cpp route users copy today:
PEFT merge_and_unload + save_pretrained, then llama.cpp's convert_hf_to_gguf.py, then
llama_model_quantize (Q4_K_M), on SmolLM2-135M (float32) and on a ~0.5 B LLaMA-shaped model
(bfloat16, SmolLM2's tokenizer, random weights with a fixed seed, saved in 200 MB shards).

Each step runs in its own child process; wall time, the child's peak RSS (wait4) and the bytes
it wrote are measured, halo and the llama.cpp route alternating (A, B, A, B, ...), with min and
median over the repeats. The llama.cpp route needs llama-cpp-python==0.3.36 and its sdist
(for convert_hf_to_gguf.py; found in build/llamacpp or downloaded there with pip).

    .venv/bin/python benchmarks/gguf/bench_export.py [--small] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "bench-gguf"
SMOL = ROOT / "build" / "models" / "smollm2-135m"
SDIST_DIR = ROOT / "build" / "llamacpp"
SDIST = "llama_cpp_python-0.3.36"

PREPARE = """
import shutil, sys, torch, transformers, peft
src, base, adapter, big = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
if big:
    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=34,
        num_attention_heads=16, num_key_value_heads=16, vocab_size=49152, tie_word_embeddings=False,
        max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(base, max_shard_size="200MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(f"{src}/{name}", f"{base}/{name}")
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
torch.manual_seed(1)
pm = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                                 init_lora_weights=False))
pm.save_pretrained(adapter)
"""

PEFT_MERGE = """
import sys, torch, transformers, peft
base, adapter, out, dtype = sys.argv[1:5]
model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out)
transformers.AutoTokenizer.from_pretrained(base).save_pretrained(out)  # the converter needs the tokenizer
"""

QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
p.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def converter() -> Path:
    """convert_hf_to_gguf.py from the llama-cpp-python sdist (downloaded once into build/llamacpp)."""
    script = SDIST_DIR / SDIST / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.exists():
        return script
    SDIST_DIR.mkdir(parents=True, exist_ok=True)
    archive = SDIST_DIR / f"{SDIST}.tar.gz"
    if not archive.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "llama-cpp-python==0.3.36", "-d", str(SDIST_DIR)],
            check=True,
        )  # fmt: skip
    with tarfile.open(archive) as tar:
        tar.extractall(SDIST_DIR, filter="data")
    return script


def prepare(big: bool) -> tuple[Path, Path, str]:
    tag = "0.5b" if big else "smollm2"
    base = CACHE / f"base-{tag}" if big else SMOL
    adapter = CACHE / f"adapter-{tag}"
    stamp = CACHE / f"ready-{tag}"
    if not stamp.exists():
        if not (SMOL / "model.safetensors").exists():
            subprocess.run([sys.executable, str(ROOT / "scripts" / "make_model.py")], check=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        if big:
            shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(adapter, ignore_errors=True)
        cmd = [sys.executable, "-c", PREPARE, str(SMOL), str(base), str(adapter), "1" if big else "0"]
        subprocess.run(cmd, check=True)
        stamp.write_text("ok")
    return base, adapter, "bfloat16" if big else "float32"


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process (spawned from this small parent)."""
    # stderr goes to a file, not a pipe: llama.cpp logs more than a pipe holds while nobody reads it.
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            err = log.read().decode(errors="replace")
            raise SystemExit(f"command failed: {' '.join(cmd[:4])} ...\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 1024.0


def size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_halo(base: Path, adapter: Path, work: Path) -> dict[str, float]:
    out = work / "halo.gguf"
    cmd = [sys.executable, "-m", "halo.cli", "export-gguf", "--model", str(base), "--adapter", str(adapter),
           "--out", str(out), "--type", "q4_k_m", "--force", "--quiet"]  # fmt: skip
    wall, rss = measure(cmd)
    return {"wall": wall, "rss": rss, "written": size(out), "intermediate": 0}


def run_llama(base: Path, adapter: Path, work: Path, dtype: str, script: Path) -> dict[str, float]:
    merged, f_gguf, out = work / "merged", work / "merged.gguf", work / "llama.gguf"
    shutil.rmtree(merged, ignore_errors=True)
    steps = [
        [sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), str(merged), dtype],
        [sys.executable, str(script), str(merged), "--outtype", "f32" if dtype == "float32" else "bf16",
         "--outfile", str(f_gguf)],
        [sys.executable, "-c", QUANTIZE, str(f_gguf), str(out)],
    ]  # fmt: skip
    walls, rsss = [], []
    for cmd in steps:
        wall, rss = measure(cmd)
        walls.append(wall)
        rsss.append(rss)
    intermediate = size(merged) + size(f_gguf)
    result = {
        "wall": sum(walls),
        "rss": max(rsss),
        "written": intermediate + size(out),
        "intermediate": intermediate,
    }
    result.update({f"wall_{i}": w for i, w in enumerate(walls)})
    shutil.rmtree(merged, ignore_errors=True)
    f_gguf.unlink(missing_ok=True)
    return result


COMPARE = """
import sys, numpy as np
from halo import gguf
a, b = gguf.read(sys.argv[1]), gguf.read(sys.argv[2])
if set(a.tensors) != set(b.tensors):
    print("tensor sets differ")
else:
    same_type = all(a.tensors[n].type == b.tensors[n].type for n in a.tensors)
    equal = sum(np.array_equal(a.raw(n), b.raw(n)) for n in a.tensors)
    print(f"same ggml types: {same_type}; byte-identical tensors: {equal}/{len(a.tensors)}")
"""


def compare_outputs(work: Path) -> str:
    """How close the two Q4_K_M files are (they differ only where PEFT's merge rounds differently).
    Run in a child: this parent stays small, since a child's peak RSS starts from its parent's."""
    cmd = [sys.executable, "-c", COMPARE, str(work / "halo.gguf"), str(work / "llama.gguf")]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


def bench(big: bool, repeats: int, script: Path) -> None:
    base, adapter, dtype = prepare(big)
    work = CACHE / ("work-0.5b" if big else "work-smollm2")
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, float]]] = {"halo": [], "llama": []}
    for _ in range(repeats):
        runs["halo"].append(run_halo(base, adapter, work))
        runs["llama"].append(run_llama(base, adapter, work, dtype, script))
    params = size(base / "model.safetensors") if (base / "model.safetensors").exists() else size(base)
    params //= 4 if dtype == "float32" else 2
    name = "0.5 B LLaMA-shaped (bfloat16, 200 MB shards)" if big else "SmolLM2-135M (float32)"
    print(
        f"\nmodel: {name}, {params / 1e9:.2f} B parameters; LoRA r=16 on 7 projections; Q4_K_M; {repeats} runs"
    )
    print(f"{'':34}{'wall s min/med':>18}{'peak RSS MiB':>14}{'written MiB':>13}{'intermediate MiB':>18}")

    def row(label: str, rs: list[dict[str, float]]) -> tuple[float, float, float]:
        walls = [r["wall"] for r in rs]
        rss = max(r["rss"] for r in rs)
        print(
            f"{label:34}{min(walls):>8.1f}/{statistics.median(walls):<9.1f}{rss:>14.0f}"
            f"{rs[0]['written'] / 2**20:>13.0f}{rs[0]['intermediate'] / 2**20:>18.0f}"
        )
        return min(walls), statistics.median(walls), rss

    h = row("halo export-gguf --adapter", runs["halo"])
    ll = row("PEFT merge + convert + quantize", runs["llama"])
    steps = runs["llama"]
    print(
        "  llama.cpp route steps, min s: "
        f"merge+save {min(r['wall_0'] for r in steps):.1f}, convert {min(r['wall_1'] for r in steps):.1f}, "
        f"quantize {min(r['wall_2'] for r in steps):.1f}"
    )
    print(
        f"speed-up {ll[0] / h[0]:.2f}x (min) / {ll[1] / h[1]:.2f}x (median), aim >= 3x; "
        f"peak RSS {h[2] / ll[2]:.2f} of the llama.cpp route, aim <= 0.25; "
        f"disk written {runs['halo'][0]['written'] / runs['llama'][0]['written']:.2f} of it"
    )
    print(f"outputs: {compare_outputs(work)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="SmolLM2 only (skip the 0.5 B model)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        print("skipped: llama-cpp-python==0.3.36 is not installed (pip install llama-cpp-python==0.3.36)")
        return
    script = converter()
    bench(False, args.repeats, script)
    if not args.small:
        bench(True, args.repeats, script)


if __name__ == "__main__":
    main()
