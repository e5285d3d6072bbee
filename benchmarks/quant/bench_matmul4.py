"""4-bit matmul y = x W^T: halo.matmul_4bit against every CPU baseline on this machine,
measured in one run, interleaved (A, B, C, A, B, C, ...), min and median of several repeats.

halo runs on the best backend here ("halo") and, where that is not already avx2, also
forced onto the AVX2 kernels ("halo-avx2": what an AVX2-only CPU such as AMD Zen 1-3 runs).
With int8 activations (activations="int8": x quantized per 8 elements, integer dot products)
it runs as "int8" (the best entry here, e.g. AVX512-VNNI), "int8-avx2" (the plain AVX2
vpmaddubsw kernel, AVX-VNNI switched off for the call: what AVX2-only CPUs run) and, on a CPU
with AVX-VNNI, "int8-avxvnni" (the AVX2 rung's AVX-VNNI kernel).

Baselines (same shapes, NF4 blocksize 64 with double quantization for the 4-bit ones):
  copy        a torch copy of the bytes halo reads (codes + float32 absmax): the memory bound
  bnb-eval    bitsandbytes Linear4bit in eval mode (its inference path)
  bnb-train   bitsandbytes Linear4bit in train mode (dequantize + matmul, what QLoRA training runs)
  torch-int4  torch's _weight_int4pack_mm_for_cpu (int4, group size 64)
  deq+mm      halo.dequantize_4bit into a reused buffer, then torch.nn.functional.linear
  llama.cpp   (optional group, --llama) decode of one token through a LLaMA-shaped GGUF
              (Q4_0, llama-cpp-python) against halo running the same matrices at 1 row

Weights are rotated through enough copies (--pool MiB per implementation) that each call
reads them from DRAM rather than cache. Ratios are baseline time / halo time (> 1: halo
faster), from the minima and from the medians.

    python benchmarks/quant/bench_matmul4.py [--quick] [--llama] [--reps N] [--pool MIB]
        [--shapes 4096x4096,576x576] [--rows 1,8]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
import halo  # noqa: E402 - after the warning filters

try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None

SHAPES = [(4096, 4096), (11008, 4096), (576, 576), (1536, 576), (576, 1536)]
ROWS = [1, 8, 128, 512]
DTYPES = [torch.bfloat16, torch.float32]
GROUP = 64


def weight_bytes(qt: halo.QuantizedTensor) -> int:
    """What halo's kernel reads: the codes and the (decoded, cached) float32 absmax."""
    packed, absmax = qt.kernel_arrays()
    return packed.nbytes + absmax.nbytes


def copies_for(bytes_each: int, pool_mib: int, cap: int = 4096) -> int:
    return max(2, min(cap, pool_mib * 2**20 // max(bytes_each, 1) + 1))


class Pool:
    """Rotating copies of one implementation's weights and the call that uses them."""

    def __init__(self, name, items, call):
        self.name, self.items, self.call, self.next = name, items, call, 0

    def run(self, x):
        item = self.items[self.next % len(self.items)]
        self.next += 1
        start = time.perf_counter()
        self.call(x, item)
        return time.perf_counter() - start


def plain_avx2_int8(x, q):
    """int8 activations on the plain AVX2 kernel (AVX-VNNI switched off for this call only)."""
    os.environ["HALO_DISABLE_AVX_VNNI"] = "1"
    try:
        halo.matmul_4bit(x, q, backend="avx2", activations="int8")
    finally:
        del os.environ["HALO_DISABLE_AVX_VNNI"]


def int8_entry_runs(name: str) -> bool:
    entries = halo._core.backend.kernel_variants().get("matmul_4bit_int8", [])
    return any(variant == name and not why for variant, _, _, why in entries)


def make_pools(out_features, in_features, dtype, pool_mib, rows):
    gen = torch.Generator().manual_seed(out_features * 7 + in_features)
    dense = torch.randn(out_features, in_features, generator=gen) * 0.02
    qt = halo.quantize_4bit(dense, "nf4", GROUP, double_quant=True)
    count = copies_for(weight_bytes(qt), pool_mib)
    pools = []

    # halo: copies of the quantized tensor (codes and statistics in fresh memory each)
    def copy_qt():
        q = halo.QuantizedTensor(
            qt.packed.copy(),
            qt.absmax.copy(),
            qt.shape,
            qt.dtype,
            qt.blocksize,
            qt.quant_type,
            True,
            qt.nested_absmax.copy(),
            qt.nested_offset,
            qt.nested_blocksize,
            kind="torch",
        )
        q.kernel_arrays()  # decode the statistics once, as a model would
        return q

    halo_items = [copy_qt() for _ in range(count)]
    pools.append(Pool("halo", halo_items, lambda x, q: halo.matmul_4bit(x, q)))
    if halo.resolve_backend() != "avx2" and "avx2" in halo.backends():
        pools.append(Pool("halo-avx2", halo_items, lambda x, q: halo.matmul_4bit(x, q, backend="avx2")))
    pools.append(Pool("int8", halo_items, lambda x, q: halo.matmul_4bit(x, q, activations="int8")))
    if "avx2" in halo.backends():
        pools.append(Pool("int8-avx2", halo_items, plain_avx2_int8))
        if int8_entry_runs("avx2-vnni"):
            pools.append(
                Pool(
                    "int8-avxvnni",
                    halo_items,
                    lambda x, q: halo.matmul_4bit(x, q, backend="avx2", activations="int8"),
                )
            )

    source = torch.from_numpy(
        np.concatenate(
            [np.asarray(qt.kernel_arrays()[0]).view(np.uint8), qt.kernel_arrays()[1].view(np.uint8)]
        )
    )
    copy_items = [source.clone() for _ in range(count)]
    target = torch.empty_like(source)
    pools.append(Pool("copy", copy_items, lambda x, s: target.copy_(s)))

    if bnb is not None:
        layers = []
        for _ in range(count):
            layer = bnb.nn.Linear4bit(
                in_features,
                out_features,
                bias=False,
                compute_dtype=dtype,
                quant_type="nf4",
                compress_statistics=True,
            )
            layer.load_state_dict({"weight": dense})
            layers.append(layer.to("cpu"))
        train = layers  # eval() would make bitsandbytes repack these: the eval layers are separate objects
        for layer in train:
            layer.train()

        def run_train(x, layer):
            with torch.no_grad():
                layer(x)

        pools.append(Pool("bnb-train", train, run_train))
        eval_layers = []
        for _ in range(count):
            layer = bnb.nn.Linear4bit(
                in_features,
                out_features,
                bias=False,
                compute_dtype=dtype,
                quant_type="nf4",
                compress_statistics=True,
            )
            layer.load_state_dict({"weight": dense})
            layer = layer.to("cpu").eval()
            with torch.no_grad():
                layer(torch.zeros(1, in_features, dtype=dtype))  # let bitsandbytes repack for inference once
            eval_layers.append(layer)
        pools.append(Pool("bnb-eval", eval_layers, run_train))

    # torch int4: min/max quantization of the same weights in groups of 64 along K
    if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        groups = dense.reshape(out_features, in_features // GROUP, GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp_min(1e-8)
        codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.reshape(out_features, in_features), 1
        )
        zeros = low + 8 * scale  # torch's convention: w = (q - 8) * scale + zero
        scales_zeros = torch.stack([scale.T, zeros.T], dim=-1).to(dtype).contiguous()
        items = [(packed.clone(), scales_zeros.clone()) for _ in range(count)]
        pools.append(
            Pool(
                "torch-int4",
                items,
                lambda x, it: torch.ops.aten._weight_int4pack_mm_for_cpu(x, it[0], GROUP, it[1]),
            )
        )

    buffer = torch.empty(out_features, in_features, dtype=dtype)

    def deq_mm(x, q):
        halo.dequantize_4bit(q, out=buffer)
        torch.nn.functional.linear(x, buffer)

    pools.append(Pool("deq+mm", halo_items, deq_mm))
    return pools, weight_bytes(qt), count


def measure(pools, x, reps):
    times = {p.name: [] for p in pools}
    for p in pools:  # warm-up (first calls allocate, fault pages, repack)
        p.run(x)
    for _ in range(reps):
        for p in pools:
            times[p.name].append(p.run(x))
    return times


def fmt_ms(values):
    return f"{min(values) * 1e3:8.3f} {statistics.median(values) * 1e3:8.3f}"


CPU_FLAGS = [
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
]


def cpu_summary() -> str:
    """The CPU's model and which of the flags the kernels care about it has (Linux)."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    have = [f for f in CPU_FLAGS if f in flags]
    missing = [f for f in CPU_FLAGS if f not in flags]
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"CPU {model}, {os.cpu_count()} logical CPUs; load average {load}\n"
        f"flags: {' '.join(have) or '-'}; absent: {' '.join(missing) or '-'}"
    )


def main_matmul(args):
    shapes = SHAPES[:1] + SHAPES[2:3] if args.quick else SHAPES
    rows_list = [1, 8, 128] if args.quick else ROWS
    if args.shapes:
        shapes = [tuple(int(d) for d in item.split("x")) for item in args.shapes.split(",")]
    if args.rows:
        rows_list = [int(r) for r in args.rows.split(",")]
    print(
        f"halo {halo._core.backend.num_threads()} threads, backend {halo.resolve_backend()}; torch {torch.__version__}"
        f" with {torch.get_num_threads()} threads; bitsandbytes {getattr(bnb, '__version__', 'absent')}"
    )
    print(cpu_summary())
    print("times in ms as 'min median'; ratio = baseline / halo (min, median); > 1 means halo is faster")
    for out_features, in_features in shapes:
        for dtype in DTYPES:
            name = str(dtype).replace("torch.", "")
            pools, nbytes, count = make_pools(out_features, in_features, dtype, args.pool, max(rows_list))
            for rows in rows_list:
                x = torch.randn(rows, in_features).to(dtype)
                reps = args.reps if rows <= 8 else max(3, args.reps // 3)
                times = measure(pools, x, reps)
                variant = halo._core.quant.matmul_4bit_variant(name, rows, out_features, in_features, GROUP)
                int8 = halo._core.quant.matmul_4bit_variant(
                    name, rows, out_features, in_features, GROUP, activations="int8"
                )
                halo_t = times["halo"]
                print(
                    f"\n[{out_features} x {in_features}] {name} rows {rows}  (halo kernel: {variant}, int8: {int8}; "
                    f"{count} weight copies rotated, {nbytes / 2**20:.1f} MiB each)"
                )
                print(
                    f"  {'impl':<11} {'min ms':>8} {'med ms':>8} {'ratio min':>9} {'ratio med':>9} {'GB/s':>7}"
                )
                for pool in pools:
                    t = times[pool.name]
                    ratio_min = min(t) / min(halo_t)
                    ratio_med = statistics.median(t) / statistics.median(halo_t)
                    gbs = nbytes / min(t) / 1e9
                    extra = ""
                    if pool.name.startswith(("halo", "int8")):
                        copy = min(times["copy"])
                        extra = f"  ({100 * copy / min(t):.0f} % of the copy bound)"
                    print(
                        f"  {pool.name:<11} {fmt_ms(t)} {ratio_min:9.2f} {ratio_med:9.2f} {gbs:7.1f}{extra}"
                    )
            del pools


# -- llama.cpp: decode through a LLaMA-shaped GGUF with the same matrix shapes ----------------------


def write_gguf(path, layers, hidden, ffn, vocab, heads):
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tokens += [f"t{i}".encode() for i in range(vocab - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)

    def q4_0(rows, cols):  # random Q4_0 blocks: float16 scale, 16 bytes of nibbles
        blocks = rows * cols // 32
        raw = np.empty((blocks, 18), np.uint8)
        raw[:, :2] = np.full(blocks, 0.002, np.float16).view(np.uint8).reshape(blocks, 2)
        raw[:, 2:] = rng.integers(0, 256, (blocks, 16), dtype=np.uint8)
        return raw.reshape(rows, cols // 32 * 18)

    def add_q(name, rows, cols):
        writer.add_tensor(name, q4_0(rows, cols), raw_dtype=gguf.GGMLQuantizationType.Q4_0)

    writer.add_tensor("token_embd.weight", rng.standard_normal((vocab, hidden), np.float32) * 0.02)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output.weight", rng.standard_normal((vocab, hidden), np.float32) * 0.02)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add_q(f"blk.{i}.{name}.weight", hidden, hidden)
        add_q(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        add_q(f"blk.{i}.ffn_up.weight", ffn, hidden)
        add_q(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main_llama(args):
    try:
        import llama_cpp
    except ImportError:
        print("\nllama.cpp group skipped: llama-cpp-python is not importable here")
        return
    layers, hidden, ffn, vocab, heads = args.llama_layers, 4096, 11008, 320, 32
    shapes = [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn)]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "llama-shaped.gguf")
        write_gguf(path, layers, hidden, ffn, vocab, heads)
        llm = llama_cpp.Llama(
            path, n_ctx=256, n_threads=halo._core.backend.num_threads(), n_batch=32, verbose=False
        )
        gen = torch.Generator().manual_seed(5)
        halo_layers = [
            [
                halo.quantize_4bit(torch.randn(o, i, generator=gen) * 0.02, "nf4", GROUP, double_quant=True)
                for o, i in shapes
            ]
            for _ in range(layers)
        ]
        for qts in halo_layers:
            for qt in qts:
                qt.kernel_arrays()
        total_bytes = sum(weight_bytes(qt) for qts in halo_layers for qt in qts)

        inputs = {
            dt: (torch.randn(1, hidden).to(dt), torch.randn(1, ffn).to(dt))
            for dt in (torch.bfloat16, torch.float32)
        }

        def halo_token(dtype):
            x, wide = inputs[dtype]
            start = time.perf_counter()
            for qts in halo_layers:
                for qt, (_, i) in zip(qts, shapes):
                    halo.matmul_4bit(x if i == hidden else wide, qt)
            return time.perf_counter() - start

        def llama_token(position):
            start = time.perf_counter()
            llm.eval([3 + position % 200])
            return time.perf_counter() - start

        llm.reset()
        llama_token(0)
        halo_token(torch.bfloat16)
        times = {"llama.cpp": [], "halo bf16": [], "halo f32": []}
        for step in range(args.reps * 2):
            if llm.n_tokens >= 250:
                llm.reset()
            times["llama.cpp"].append(llama_token(step))
            times["halo bf16"].append(halo_token(torch.bfloat16))
            times["halo f32"].append(halo_token(torch.float32))
        print(
            f"\nllama.cpp decode, {layers} LLaMA layers (hidden {hidden}, FFN {ffn}; Q4_0, random weights) vs halo "
            f"running the same 7 x {layers} matrices (NF4, {total_bytes / 2**20:.0f} MiB) at 1 row; "
            f"llama.cpp's time also holds attention, norms and a {vocab}-token output layer"
        )
        for name, t in times.items():
            ratio = (
                min(t) / min(times["halo bf16"]),
                statistics.median(t) / statistics.median(times["halo bf16"]),
            )
            print(f"  {name:<10} {fmt_ms(t)} ms   vs halo bf16: {ratio[0]:.2f} (min) {ratio[1]:.2f} (median)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--llama", action="store_true", help="also the llama.cpp decode group")
    parser.add_argument("--llama-only", action="store_true")
    parser.add_argument("--llama-layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--shapes", help="OUTxIN[,OUTxIN...] instead of the default shapes")
    parser.add_argument("--rows", help="R[,R...] instead of the default row counts")
    parser.add_argument("--pool", type=int, default=400, help="MiB of weight copies per implementation")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.pool = min(args.reps, 5), min(args.pool, 64)
    if not args.llama_only:
        main_matmul(args)
    if args.llama or args.llama_only:
        main_llama(args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
