#include "halo/lora/linear.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <vector>

#include "halo/backend/dispatch.hpp"
#include "halo/core/convert.hpp"
#include "halo/core/error.hpp"
#include "halo/core/parallel.hpp"
#include "halo/quant/quant4.hpp"
#include "halo/quant/matmul4.hpp"
#include "src/quant/matmul4_kernels.hpp"

namespace halo::lora {
namespace {

// Tile edges of the base weight: a 4-bit tile of kTileOut x kTileIn floats is
// 256 KiB, small enough to stay in L2 while the GEMM sweeps it.
constexpr int64_t kTileOut = 128;
constexpr int64_t kTileIn = 512;
// The AVX-512 kernel sweeps 32-column panels of a packed tile; a 256-deep panel
// is 32 KiB and stays in L1.
constexpr int64_t kPackedDepth = 256;
// Token columns per kernel call in the transposed forward (a 256 x 128 slice of x^T, 128 KiB).
constexpr int64_t kTokenChunk = 128;
constexpr int64_t kTransposedForwardRows = 256;

template <typename Scalar>
using RowMat = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename Scalar>
using ConstMap = Eigen::Map<const RowMat<Scalar>>;
template <typename Scalar>
using Map = Eigen::Map<RowMat<Scalar>>;
template <typename Scalar>
using StridedBlock = Eigen::Map<const RowMat<Scalar>, 0, Eigen::OuterStride<>>;

uint64_t splitmix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ull;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBull;
  z ^= z >> 31;
  return z;
}

uint32_t keep_threshold(double p) { return static_cast<uint32_t>(std::ceil(p * 16777216.0)); }

void check_inputs(const char* fn, int64_t rows, const BaseWeight& base, const void* x, const void* lora_a,
                  const void* lora_b, const LoraSpec& spec) {
  require(rows >= 0, fn, "rows must be non-negative, got ", rows);
  require(base.out_features > 0 && base.in_features > 0, fn, "base weight shape must be positive, got [",
          base.out_features, ", ", base.in_features, "]");
  require(spec.rank > 0, fn, "rank must be positive, got ", spec.rank);
  require(std::isfinite(spec.scaling), fn, "scaling must be finite, got ", spec.scaling);
  require(spec.dropout >= 0.0 && spec.dropout < 1.0, fn, "dropout must be in [0, 1), got ", spec.dropout);
  require(rows == 0 || x != nullptr, fn, "x is null");
  require(lora_a != nullptr && lora_b != nullptr, fn, "lora_A / lora_B is null");
  if (is_bnb4(base.storage)) {
    require(base.packed != nullptr && base.absmax != nullptr, fn, "4-bit base needs packed codes and absmax");
    check_bnb4(fn, base.storage, base.blocksize);
  } else {
    require(base.storage == Format::f32 || base.storage == Format::f16 || base.storage == Format::bf16 ||
                base.storage == Format::f64,
            fn, "base weight format must be float32, float16, bfloat16, float64, nf4 or fp4, got ",
            format_name(base.storage));
    require(base.data != nullptr, fn, "base weight data is null");
  }
}

// Hands out blocks of the stored base weight as Scalar, row-major with a
// leading dimension: dense storage of the matching type is used in place,
// anything else is converted (or 4-bit dequantized) into a per-thread buffer.
template <typename Scalar>
class TileLoader {
 public:
  TileLoader(const BaseWeight& base, Backend backend) : base_(base), backend_(backend) {
    stored_cols_ = base.fan_in_fan_out ? base.out_features : base.in_features;
  }

  // Logical tile W[o0:o1, k0:k1] as an Eigen expression of shape (o1-o0, k1-k0).
  template <typename Consumer>
  void with_tile(int64_t o0, int64_t o1, int64_t k0, int64_t k1, Consumer&& consume) {
    if (base_.fan_in_fan_out) {
      const StridedBlock<Scalar> block = load(k0, k1, o0, o1);
      consume(block.transpose());
    } else {
      const StridedBlock<Scalar> block = load(o0, o1, k0, k1);
      consume(block);
    }
  }

  // Logical tile W[o0:o1, k0:k1] written contiguously: k_major ? [k, o] : [o, k].
  void pack(int64_t o0, int64_t o1, int64_t k0, int64_t k1, bool k_major, Scalar* out) {
    const bool fan = base_.fan_in_fan_out;
    // stored rows run over o (or k with fan_in_fan_out), stored columns over the other
    const int64_t r0 = fan ? k0 : o0, r1 = fan ? k1 : o1, c0 = fan ? o0 : k0, c1 = fan ? o1 : k1;
    const int64_t cols = c1 - c0, rows = r1 - r0;
    const bool same_orientation = fan == k_major;
    if (is_bnb4(base_.storage) && !std::is_same_v<Scalar, float>)
      scratch_.resize(static_cast<size_t>(cols));
    if (!same_orientation) row_.resize(static_cast<size_t>(cols));
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t begin = (r0 + r) * stored_cols_ + c0;
      if (same_orientation) {
        convert_row(begin, cols, out + r * cols);
      } else {
        convert_row(begin, cols, row_.data());
        for (int64_t c = 0; c < cols; ++c) out[c * rows + r] = row_[c];
      }
    }
  }

 private:
  StridedBlock<Scalar> load(int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    const int64_t rows = r1 - r0, cols = c1 - c0;
    if (native()) {
      const auto* data = static_cast<const Scalar*>(base_.data) + r0 * stored_cols_ + c0;
      return StridedBlock<Scalar>(data, rows, cols, Eigen::OuterStride<>(stored_cols_));
    }
    buffer_.resize(static_cast<size_t>(rows * cols));
    if (is_bnb4(base_.storage) && !std::is_same_v<Scalar, float>)
      scratch_.resize(static_cast<size_t>(cols));
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t begin = (r0 + r) * stored_cols_ + c0;
      Scalar* out = buffer_.data() + r * cols;
      convert_row(begin, cols, out);
    }
    return StridedBlock<Scalar>(buffer_.data(), rows, cols, Eigen::OuterStride<>(cols));
  }

  bool native() const {
    if constexpr (std::is_same_v<Scalar, float>) return base_.storage == Format::f32;
    return base_.storage == Format::f64;
  }

  void convert_row(int64_t begin, int64_t count, Scalar* out) {
    switch (base_.storage) {
      case Format::f32: {
        const float* src = static_cast<const float*>(base_.data) + begin;
        for (int64_t i = 0; i < count; ++i) out[i] = static_cast<Scalar>(src[i]);
        return;
      }
      case Format::f64: {
        const double* src = static_cast<const double*>(base_.data) + begin;
        for (int64_t i = 0; i < count; ++i) out[i] = static_cast<Scalar>(src[i]);
        return;
      }
      case Format::f16: {
        const uint16_t* src = static_cast<const uint16_t*>(base_.data) + begin;
        for (int64_t i = 0; i < count; ++i) out[i] = static_cast<Scalar>(f16_to_float(src[i]));
        return;
      }
      case Format::bf16: {
        const uint16_t* src = static_cast<const uint16_t*>(base_.data) + begin;
        for (int64_t i = 0; i < count; ++i) out[i] = static_cast<Scalar>(bf16_to_float(src[i]));
        return;
      }
      case Format::nf4:
      case Format::fp4: {
        if constexpr (std::is_same_v<Scalar, float>) {
          dequantize_4bit_range(base_.packed, base_.absmax, base_.storage, base_.blocksize, begin, begin + count,
                                out, backend_);
        } else {
          dequantize_4bit_range(base_.packed, base_.absmax, base_.storage, base_.blocksize, begin, begin + count,
                                scratch_.data(), backend_);
          for (int64_t i = 0; i < count; ++i) out[i] = static_cast<Scalar>(scratch_[i]);
        }
        return;
      }
      default: fail("lora", "unsupported base format ", format_name(base_.storage));  // check_inputs refuses it first
    }
  }

  const BaseWeight& base_;
  Backend backend_;
  int64_t stored_cols_ = 0;
  std::vector<Scalar> buffer_;
  std::vector<Scalar> row_;
  std::vector<float> scratch_;
};

// The float GEMM shared with the 4-bit matmul (one template per ISA, src/quant/matmul4_simd.hpp).
using TileGemm = halo::kernels::Gemm;
const KernelTable<TileGemm> kTileGemm{"lora_tile_gemm",
                                      {rung(Backend::scalar, halo::kernels::gemm_scalar),
                                       rung(Backend::avx2, halo::kernels::gemm_avx2),
                                       rung(Backend::avx512, halo::kernels::gemm_avx512)}};
const KernelRegistration kRegTileGemm(kTileGemm);

// The backend picks both the 4-bit tile dequantizer and, for float activations,
// the tile GEMM from the registry (double activations, used by gradient checks, run on Eigen).
Backend tile_backend(const BaseWeight& base) { return dispatch(kTileGemm, base.backend).backend; }

template <typename Scalar>
TileGemm tile_gemm(Backend backend) {
  if (!std::is_same_v<Scalar, float>) return nullptr;
  return dispatch(kTileGemm, backend).kernel;
}

int64_t tiles(int64_t extent, int64_t tile) { return (extent + tile - 1) / tile; }

// drop(x) as a dense matrix (x itself when dropout is off).
template <typename Scalar>
RowMat<Scalar> dropped_input(const Scalar* x, int64_t rows, int64_t in, const LoraSpec& spec) {
  RowMat<Scalar> out = ConstMap<Scalar>(x, rows, in);
  if (spec.dropout > 0.0) {
    const Scalar scale = static_cast<Scalar>(1.0 / (1.0 - spec.dropout));
    Scalar* data = out.data();
    const int64_t count = rows * in;
    for (int64_t i = 0; i < count; ++i) data[i] = dropout_keep(spec.seed, i, spec.dropout) ? data[i] * scale : 0;
  }
  return out;
}

// The stored 4-bit weight as the matmul sees it: [out, in], or [in, out] with fan_in_fan_out.
Quant4Matrix stored_matrix(const BaseWeight& base) {
  Quant4Matrix w;
  w.packed = base.packed;
  w.absmax = base.absmax;
  w.type = base.storage;
  w.blocksize = base.blocksize;
  w.out_features = base.fan_in_fan_out ? base.in_features : base.out_features;
  w.in_features = base.fan_in_fan_out ? base.out_features : base.in_features;
  return w;
}

// y [rows, out] = x W^T over a 4-bit base, through the matmul kernels (decode GEMV for a
// few rows, panel GEMM for many); bias added before the LoRA term, as PEFT orders it.
void base_forward_4bit(const float* x, int64_t rows, const BaseWeight& base, const float* bias, float* y) {
  const Quant4Matrix w = stored_matrix(base);
  if (!base.fan_in_fan_out) {
    matmul_4bit(x, Format::f32, rows, w, bias, y, base.backend);
    return;
  }
  matmul_4bit_transposed(x, Format::f32, rows, w, y, base.backend);
  if (bias != nullptr) Map<float>(y, rows, base.out_features).rowwise() +=
      Eigen::Map<const Eigen::Matrix<float, 1, Eigen::Dynamic>>(bias, base.out_features);
}

// grad_x [rows, in] = grad_y W over a 4-bit base.
void base_backward_4bit(const float* grad_y, int64_t rows, const BaseWeight& base, float* grad_x) {
  const Quant4Matrix w = stored_matrix(base);
  if (!base.fan_in_fan_out)
    matmul_4bit_transposed(grad_y, Format::f32, rows, w, grad_x, base.backend);
  else
    matmul_4bit(grad_y, Format::f32, rows, w, nullptr, grad_x, base.backend);
}

// Gradients over a 4-bit base: grad_x through the matmul kernels, the rank-r products
// with Eigen. scaling is applied after the small products (not to a copy of grad_y).
void backward_4bit(const float* grad_y, const float* x, int64_t rows, const BaseWeight& base, const float* lora_a,
                   const float* lora_b, const LoraSpec& spec, float* grad_x, float* grad_a, float* grad_b) {
  const int64_t in = base.in_features, out = base.out_features, rank = spec.rank;
  const float scaling = static_cast<float>(spec.scaling);
  ConstMap<float> dy(grad_y, rows, out);
  ConstMap<float> a(lora_a, rank, in);
  ConstMap<float> b(lora_b, out, rank);
  const bool dropout = spec.dropout > 0.0;
  RowMat<float> dropped;
  if (dropout) dropped = dropped_input(x, rows, in, spec);
  const ConstMap<float> input(dropout ? dropped.data() : x, rows, in);
  const RowMat<float> t = input * a.transpose();        // [rows, r]
  const RowMat<float> dt = (dy * b) * scaling;           // [rows, r]
  if (grad_b != nullptr) Map<float>(grad_b, out, rank).noalias() = (dy.transpose() * t) * scaling;
  if (grad_a != nullptr) Map<float>(grad_a, rank, in).noalias() = dt.transpose() * input;
  if (grad_x == nullptr) return;
  base_backward_4bit(grad_y, rows, base, grad_x);
  Map<float> dx(grad_x, rows, in);
  if (!dropout) {
    dx.noalias() += dt * a;
    return;
  }
  RowMat<float> lora_dx = dt * a;
  const float keep_scale = static_cast<float>(1.0 / (1.0 - spec.dropout));
  float* values = lora_dx.data();
  for (int64_t i = 0; i < rows * in; ++i) values[i] = dropout_keep(spec.seed, i, spec.dropout) ? values[i] * keep_scale : 0.0f;
  dx += lora_dx;
}

}  // namespace

BaseWeight quant4_base(const Quantized4& tensor, bool fan_in_fan_out, std::vector<float>& absmax_storage,
                       Backend backend) {
  require(tensor.shape.size() == 2, "quant4_base", "the base must be 2-D, got ", tensor.shape.size(),
          " dimensions");
  BaseWeight base;
  base.storage = tensor.type;
  base.fan_in_fan_out = fan_in_fan_out;
  base.out_features = fan_in_fan_out ? tensor.shape[1] : tensor.shape[0];
  base.in_features = fan_in_fan_out ? tensor.shape[0] : tensor.shape[1];
  base.packed = tensor.packed.data();
  base.blocksize = tensor.blocksize;
  base.backend = backend;
  if (tensor.nested) {
    absmax_storage = tensor.block_absmax();
    base.absmax = absmax_storage.data();
  } else {
    base.absmax = tensor.absmax.data();
  }
  return base;
}

double lora_scaling(double alpha, int64_t rank, bool rslora) {
  require(rank > 0, "lora_scaling", "rank must be positive, got ", rank);
  return rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
}

bool dropout_keep(uint64_t seed, int64_t index, double p) {
  const uint64_t bits = splitmix64(seed + static_cast<uint64_t>(index + 1) * 0x9E3779B97F4A7C15ull);
  return static_cast<uint32_t>(bits >> 40) >= keep_threshold(p);
}

void dropout_mask(uint64_t seed, int64_t count, double p, float* mask) {
  require(p >= 0.0 && p < 1.0, "dropout_mask", "p must be in [0, 1), got ", p);
  require(count >= 0, "dropout_mask", "count must be non-negative, got ", count);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  parallel_for(count, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) mask[i] = dropout_keep(seed, i, p) ? scale : 0.0f;
  });
}

template <typename Scalar>
void lora_forward(const Scalar* x, int64_t rows, const BaseWeight& base, const Scalar* lora_a, const Scalar* lora_b,
                  const Scalar* bias, const LoraSpec& spec, Scalar* y) {
  check_inputs("lora_forward", rows, base, x, lora_a, lora_b, spec);
  if (rows == 0) return;
  if constexpr (std::is_same_v<Scalar, float>) {
    if (is_bnb4(base.storage)) {
      const int64_t in = base.in_features, out = base.out_features;
      base_forward_4bit(x, rows, base, bias, y);
      ConstMap<float> a(lora_a, spec.rank, in);
      ConstMap<float> b(lora_b, out, spec.rank);
      const RowMat<float> t = spec.dropout > 0.0 ? RowMat<float>(dropped_input(x, rows, in, spec) * a.transpose())
                                                 : RowMat<float>(ConstMap<float>(x, rows, in) * a.transpose());
      Map<float>(y, rows, out).noalias() += (t * b.transpose()) * static_cast<float>(spec.scaling);
      return;
    }
  }
  const int64_t out = base.out_features, in = base.in_features, rank = spec.rank;
  const Backend backend = tile_backend(base);
  const TileGemm gemm = tile_gemm<Scalar>(backend);
  ConstMap<Scalar> input(x, rows, in);
  ConstMap<Scalar> a(lora_a, rank, in);
  ConstMap<Scalar> b(lora_b, out, rank);
  Map<Scalar> result(y, rows, out);
  // The small LoRA product first: t = drop(x) A^T is [rows, r].
  const RowMat<Scalar> t = dropped_input(x, rows, in, spec) * a.transpose();
  const Scalar scaling = static_cast<Scalar>(spec.scaling);

  // Few rows: transposing W's tiles would dominate, so compute y^T = W x^T from the
  // tiles as stored. Many rows: the per-tile transpose is amortised and the plain
  // order (x W^T, weight tile as the cache-resident operand) is faster.
  const bool transposed_forward = gemm != nullptr && !base.fan_in_fan_out && rows <= kTransposedForwardRows;
  RowMat<Scalar> x_transposed;
  if (transposed_forward) x_transposed = input.transpose();
  parallel_for(tiles(out, kTileOut), 1, [&](int64_t first, int64_t last) {
    TileLoader<Scalar> loader(base, backend);
    std::vector<Scalar> packed, y_transposed;
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t o0 = tile * kTileOut, o1 = std::min(out, o0 + kTileOut);
      auto y_tile = result.middleCols(o0, o1 - o0);
      y_tile.setZero();
      if (transposed_forward) {
        if constexpr (std::is_same_v<Scalar, float>) {
          // W is stored [out, in]: y^T = W x^T takes W's tiles as they are stored
          // (no per-tile transpose); only x and this tile of y are transposed.
          packed.resize(static_cast<size_t>(kPackedDepth * kTileOut));
          y_transposed.assign(static_cast<size_t>((o1 - o0) * rows), 0.0f);
          for (int64_t k0 = 0; k0 < in; k0 += kPackedDepth) {
            const int64_t k1 = std::min(in, k0 + kPackedDepth);
            loader.pack(o0, o1, k0, k1, /*k_major=*/false, packed.data());
            // token columns in chunks so the slice of x^T the kernel sweeps stays in L2
            for (int64_t j0 = 0; j0 < rows; j0 += kTokenChunk) {
              const int64_t width = std::min(rows - j0, kTokenChunk);
              gemm(packed.data(), k1 - k0, x_transposed.data() + k0 * rows + j0, rows, y_transposed.data() + j0,
                   rows, o1 - o0, width, k1 - k0);
            }
          }
          y_tile = ConstMap<Scalar>(y_transposed.data(), o1 - o0, rows).transpose();
        }
      } else if (gemm != nullptr) {
        if constexpr (std::is_same_v<Scalar, float>) {
          packed.resize(static_cast<size_t>(kPackedDepth * kTileOut));
          for (int64_t k0 = 0; k0 < in; k0 += kPackedDepth) {
            const int64_t k1 = std::min(in, k0 + kPackedDepth);
            loader.pack(o0, o1, k0, k1, /*k_major=*/true, packed.data());
            gemm(x + k0, in, packed.data(), o1 - o0, y + o0, out, rows, o1 - o0, k1 - k0);
          }
        }
      } else {
        for (int64_t k0 = 0; k0 < in; k0 += kTileIn) {
          const int64_t k1 = std::min(in, k0 + kTileIn);
          loader.with_tile(o0, o1, k0, k1, [&](const auto& w_tile) {
            y_tile.noalias() += input.middleCols(k0, k1 - k0) * w_tile.transpose();
          });
        }
      }
      // PEFT's order: (x W^T + b) + (t B^T) * scaling.
      if (bias != nullptr) {
        Eigen::Map<const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>> bias_row(bias + o0, o1 - o0);
        y_tile.rowwise() += bias_row;
      }
      const RowMat<Scalar> lora_part = t * b.middleRows(o0, o1 - o0).transpose();
      y_tile += lora_part * scaling;
    }
  });
}

template <typename Scalar>
void lora_backward(const Scalar* grad_y, const Scalar* x, int64_t rows, const BaseWeight& base, const Scalar* lora_a,
                   const Scalar* lora_b, const LoraSpec& spec, Scalar* grad_x, Scalar* grad_a, Scalar* grad_b,
                   Scalar* grad_bias) {
  check_inputs("lora_backward", rows, base, x, lora_a, lora_b, spec);
  require(rows == 0 || grad_y != nullptr, "lora_backward", "grad_y is null");
  const int64_t out = base.out_features, in = base.in_features, rank = spec.rank;
  const Backend backend = tile_backend(base);
  const TileGemm gemm = tile_gemm<Scalar>(backend);
  ConstMap<Scalar> dy(grad_y, rows, out);
  ConstMap<Scalar> a(lora_a, rank, in);
  ConstMap<Scalar> b(lora_b, out, rank);
  const Scalar scaling = static_cast<Scalar>(spec.scaling);

  if (grad_bias != nullptr) {
    Eigen::Map<Eigen::Matrix<Scalar, 1, Eigen::Dynamic>> db(grad_bias, out);
    if (rows == 0)
      db.setZero();
    else
      db = dy.colwise().sum();
  }
  if (rows == 0) {
    if (grad_a != nullptr) Map<Scalar>(grad_a, rank, in).setZero();
    if (grad_b != nullptr) Map<Scalar>(grad_b, out, rank).setZero();
    return;
  }
  if constexpr (std::is_same_v<Scalar, float>) {
    if (is_bnb4(base.storage)) {
      backward_4bit(grad_y, x, rows, base, lora_a, lora_b, spec, grad_x, grad_a, grad_b);
      return;
    }
  }
  const RowMat<Scalar> dropped = dropped_input(x, rows, in, spec);
  const RowMat<Scalar> t = dropped * a.transpose();             // [rows, r]
  const RowMat<Scalar> scaled_dy = dy * scaling;                // gradient of t B^T
  const RowMat<Scalar> dt = scaled_dy * b;                      // [rows, r]
  if (grad_b != nullptr) Map<Scalar>(grad_b, out, rank).noalias() = scaled_dy.transpose() * t;
  if (grad_a != nullptr) Map<Scalar>(grad_a, rank, in).noalias() = dt.transpose() * dropped;
  if (grad_x == nullptr) return;

  Map<Scalar> dx(grad_x, rows, in);
  parallel_for(tiles(in, kTileOut), 1, [&](int64_t first, int64_t last) {
    TileLoader<Scalar> loader(base, backend);
    std::vector<Scalar> packed;
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t k0 = tile * kTileOut, k1 = std::min(in, k0 + kTileOut);
      auto dx_tile = dx.middleCols(k0, k1 - k0);
      dx_tile.setZero();
      if (gemm != nullptr) {
        if constexpr (std::is_same_v<Scalar, float>) {
          packed.resize(static_cast<size_t>(kPackedDepth * kTileOut));
          for (int64_t o0 = 0; o0 < out; o0 += kPackedDepth) {
            const int64_t o1 = std::min(out, o0 + kPackedDepth);
            loader.pack(o0, o1, k0, k1, /*k_major=*/false, packed.data());
            gemm(grad_y + o0, out, packed.data(), k1 - k0, grad_x + k0, in, rows, k1 - k0, o1 - o0);
          }
        }
      } else {
        for (int64_t o0 = 0; o0 < out; o0 += kTileIn) {
          const int64_t o1 = std::min(out, o0 + kTileIn);
          loader.with_tile(o0, o1, k0, k1, [&](const auto& w_tile) {
            dx_tile.noalias() += dy.middleCols(o0, o1 - o0) * w_tile;
          });
        }
      }
      // d drop(x) = dt A; the mask (scaled by 1 / (1 - p)) passes it back to x.
      RowMat<Scalar> lora_dx = dt * a.middleCols(k0, k1 - k0);
      if (spec.dropout > 0.0) {
        const Scalar scale = static_cast<Scalar>(1.0 / (1.0 - spec.dropout));
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t k = k0; k < k1; ++k)
            lora_dx(r, k - k0) = dropout_keep(spec.seed, r * in + k, spec.dropout) ? lora_dx(r, k - k0) * scale : 0;
      }
      dx_tile += lora_dx;
    }
  });
}

template void lora_forward<float>(const float*, int64_t, const BaseWeight&, const float*, const float*, const float*,
                                  const LoraSpec&, float*);
template void lora_forward<double>(const double*, int64_t, const BaseWeight&, const double*, const double*,
                                   const double*, const LoraSpec&, double*);
template void lora_backward<float>(const float*, const float*, int64_t, const BaseWeight&, const float*, const float*,
                                   const LoraSpec&, float*, float*, float*, float*);
template void lora_backward<double>(const double*, const double*, int64_t, const BaseWeight&, const double*,
                                    const double*, const LoraSpec&, double*, double*, double*, double*);

}  // namespace halo::lora
