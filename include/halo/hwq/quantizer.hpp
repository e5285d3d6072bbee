// HALO's quantizer over a 2-D weight matrix (rows = output channels):
//   1. salient weights (top fraction by sensitivity * w^2) and outliers beyond
//      k sigma of their row go, exactly, into a CSR side structure;
//   2. the rest is cut into tiles; each tile's sensitivity-weighted error is
//      measured with every frequency tier's code book, and tiles are ranked by
//      how much the larger (slower) code book saves: the least-gaining tiles
//      get the fastest clock;
//   3. a DVFS plan (dvfs.hpp) runs the tiles in row-major order with at most
//      `max_switches` clock changes, and each tile is finally quantized with
//      the code book of the clock it actually runs at, with scales (per row
//      inside the tile, or per tile) fitted to minimise sum s * (w - scale*q)^2.
#pragma once

#include <cstdint>
#include <vector>

#include "halo/backend/backend.hpp"
#include "halo/hwq/dvfs.hpp"
#include "halo/hwq/hardware_model.hpp"

namespace halo::hwq {

struct SparsePart {  // CSR over output channels; values are the original weights
  int64_t rows = 0, cols = 0;
  std::vector<int64_t> indptr;   // rows + 1
  std::vector<int32_t> indices;  // column of each kept weight
  std::vector<float> values;
};

struct TileGrid {
  int64_t rows = 0, cols = 0;
  int64_t tile_rows = 0, tile_cols = 0;
  int64_t grid_rows() const { return (rows + tile_rows - 1) / tile_rows; }
  int64_t grid_cols() const { return (cols + tile_cols - 1) / tile_cols; }
  int64_t count() const { return grid_rows() * grid_cols(); }
  int64_t tile_size(int64_t tile) const;  // elements of a (possibly clipped edge) tile
};

struct QuantizeOptions {
  int bits = 4;
  int64_t tile_rows = 128, tile_cols = 128;
  double salient_fraction = 5e-4;
  double outlier_sigma = 3.0;  // <= 0 or inf: no outliers kept
  int max_switches = 3;
  bool channel_scales = true;  // a scale per row inside each tile, else one per tile
  // Share of tiles wanting each operating point, in the model's (ascending frequency) order; sums to 1.
  // Empty: a quarter of the tiles the fastest point, the rest the next slower one.
  std::vector<double> tier_fractions;
  int64_t tokens = 128;  // tokens per pass (input columns of the GEMM) the plan and estimate assume
  // Scale-search kernel: avx512 when resolved to it, scalar otherwise (avx2 has no kernel of its own).
  Backend backend = Backend::automatic;
};

struct Quantized {
  TileGrid grid;
  int bits = 4;
  bool channel_scales = true;
  int64_t tokens = 128;
  std::vector<int8_t> codes;   // rows * cols grid values (0 where the sparse part holds the weight)
  std::vector<float> scales;   // rows * grid_cols: scale of row r inside tile column c
  std::vector<int> wanted_point;  // per tile (row-major): the fastest point its sensitivity allows
  Plan plan;                      // per tile: the point it runs at
  std::vector<double> tile_error;  // per tile: sensitivity-weighted squared error of the dense part
  SparsePart sparse;
};

// Throws InvalidArgument on bad shapes/options or non-finite input. `sensitivity` may be null (|w| is used).
Quantized halo_quantize(const float* weights, const float* sensitivity, int64_t rows, int64_t cols,
                        const HardwareModel& model, const QuantizeOptions& options);

void dequantize(const Quantized& q, float* out);  // rows * cols

SparsePart extract_sparse(const float* weights, const float* sensitivity, int64_t rows, int64_t cols,
                          double salient_fraction, double outlier_sigma);

// Index of the nearest value in a sorted code book; ties go to the smaller value.
int nearest_code(float x, const std::vector<float>& book);

// Scale minimising sum s * (x - scale * q(x / scale))^2 over a segment; returns the error too.
struct ScaleFit {
  float scale;
  double error;
};
// The AVX-512 kernel sums in another order, so a near-tie between candidate scales may resolve differently.
ScaleFit fit_scale(const float* x, const float* s, int64_t count, const std::vector<float>& book,
                   Backend backend = Backend::automatic);
ScaleFit fit_scale_with(const float* x, const float* s, int64_t count, const std::vector<float>& book, bool simd);

Estimate estimate(const Quantized& q, const HardwareModel& model);

// Symmetric round-to-nearest baseline: q = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1), scale = absmax / (2^(b-1) - 1)
// per group of `group_size` consecutive weights of a row (group_size <= 0: whole row).
void rtn_quantize(const float* weights, int64_t rows, int64_t cols, int bits, int64_t group_size, int8_t* codes,
                  float* scales);

}  // namespace halo::hwq
