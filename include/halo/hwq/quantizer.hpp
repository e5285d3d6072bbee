// HALO's quantizer over a 2-D weight matrix (rows = output channels):
//   1. salient weights (top fraction by sensitivity * w^2) and outliers beyond
//      k sigma of their row go, exactly, into a CSR side structure;
//   2. the rest is cut into tiles; each tile wants a rung of the model's
//      ladder (dvfs.hpp): either by the paper's rule, mean sensitivity (e.g.
//      Fisher, mean g^2) with a cumulative-sensitivity split (the most
//      sensitive tiles, holding the first `split[0]` of the layer's
//      sensitivity, stay at the nominal point, and so on), or by how much error
//      each tile saves on the larger code book (`error_gain`, with shares per
//      rung);
//   3. a DVFS plan runs the tiles with at most `max_switches` point changes;
//   4. per rung, the layer's code book: in INT8-subset mode (the paper's
//      setting, the default) at most `book_size` values chosen from those the
//      point admits by a sensitivity-weighted Lloyd-style search (exact best
//      book for the current scales, then the scales for that book, repeated);
//      in the int4 / int8 grid modes, every value the point admits;
//   5. codes and scales (per row inside a tile, or per tile) fitted to
//      minimise sum s * (w - scale * q)^2.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "halo/backend/backend.hpp"
#include "halo/hwq/dvfs.hpp"
#include "halo/hwq/hardware_model.hpp"

namespace halo::hwq {

// subset: INT8 MAC, books of <= book_size admitted INT8 values; int4: a 4-bit MAC, books = admitted 4-bit
// values; int8: INT8 MAC, books = every admitted INT8 value.
enum class GridMode { subset, int4, int8 };
enum class Assign { sensitivity, error_gain };
enum class Preset { performance, balanced, accuracy };

std::string_view grid_mode_name(GridMode grid);
GridMode parse_grid_mode(std::string_view name);  // "subset" | "int4" | "int8"
std::string_view assign_name(Assign assign);
Assign parse_assign(std::string_view name);  // "sensitivity" | "error_gain"
std::string_view preset_name(Preset preset);
Preset parse_preset(std::string_view name);  // "performance" | "balanced" | "accuracy"
int mac_bits(GridMode grid);                 // 8, 4, 8

// Cumulative-sensitivity thresholds for a ladder of `rungs` points: tiles (most sensitive first) whose
// preceding share of the layer's sensitivity is below split[r] want rung r (or a later one only past the
// last threshold). performance {0, 0.5}, balanced {0, 0.8}, accuracy {0.5, 1.0} for three rungs: the
// first value sends tiles to the nominal point, the second to the middle rung, the rest go to the last.
std::vector<double> preset_split(Preset preset, size_t rungs);

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
  GridMode grid = GridMode::subset;
  Mode mode = Mode::performance;
  Assign assign = Assign::sensitivity;
  Preset preset = Preset::balanced;
  // sensitivity: rungs - 1 non-decreasing thresholds in [0, 1]; empty: the preset's.
  std::vector<double> split;
  // error_gain: share of tiles wanting each rung, summing to 1; empty: a quarter the last rung, the rest the
  // one before it.
  std::vector<double> tier_fractions;
  int64_t tile_rows = 128, tile_cols = 128;
  double salient_fraction = 5e-4;
  double outlier_sigma = 3.0;  // <= 0 or inf: no outliers kept
  // Store the side part's values as float16 (the paper's models are FP16; values beyond float16's range are
  // refused), else exactly as float32.
  bool sparse_fp16 = true;
  int max_switches = 3;
  bool channel_scales = true;  // a scale per row inside each tile, else one per tile
  int book_iterations = 4;     // subset mode: rounds of book search + scale fit per rung
  // Subset mode: how much switching activity a book pays for, relative to its error (0: error only; 0.1:
  // halving the book's MAC energy is worth 5 % more weighted error).
  double energy_weight = 0.1;
  int64_t tokens = 128;        // tokens per pass (input columns of the GEMM) the plan and estimate assume
  Backend backend = Backend::automatic;  // scale-search kernel (scalar, avx2, avx512; cuda has none)
};

struct Quantized {
  TileGrid grid;
  GridMode grid_mode = GridMode::subset;
  Mode mode = Mode::performance;
  int bits = 8;  // MAC width: codes are values of the signed `bits` grid
  bool channel_scales = true;
  bool sparse_fp16 = true;
  int64_t tokens = 128;
  std::vector<int> ladder;              // model point of each rung
  std::vector<std::vector<int>> books;  // per rung: the sorted values its tiles use
  std::vector<int8_t> codes;            // rows * cols grid values (0 where the sparse part holds the weight)
  std::vector<float> scales;            // rows * grid_cols: scale of row r inside tile column c
  std::vector<double> tile_score;       // per tile (row-major): mean sensitivity
  std::vector<int> wanted_point;        // per tile: the most aggressive point its sensitivity allows
  Plan plan;                            // per tile: the point it runs at
  std::vector<double> tile_error;       // per tile: sensitivity-weighted squared error of the dense part
  SparsePart sparse;
  // Baselines priced by estimate(): code counts (index value + 2^(bits-1)) of a symmetric round-to-nearest
  // quantizer with `uniform_bits` per code and HALO's scale layout, and of per-channel INT8 (W8A8).
  int uniform_bits = 4;
  std::vector<int64_t> uniform_histogram;  // 2^bits entries
  std::vector<int64_t> w8a8_histogram;     // 256 entries
};

// Throws InvalidArgument on bad shapes/options or non-finite input. `sensitivity` may be null (|w| is used).
Quantized halo_quantize(const float* weights, const float* sensitivity, int64_t rows, int64_t cols,
                        const HardwareModel& model, const QuantizeOptions& options);

void dequantize(const Quantized& q, float* out);  // rows * cols

// Stored bits per weight of the packed layout: ceil(log2 K)-bit code indices, the K-value INT8 tables of the
// subset mode, fp32 scales, CSR with fp16 (or fp32) values, 16-bit columns and per-row counts (32-bit past
// 65,536 columns).
double stored_bits(const Quantized& q);

SparsePart extract_sparse(const float* weights, const float* sensitivity, int64_t rows, int64_t cols,
                          double salient_fraction, double outlier_sigma);

// Index of the nearest value in a sorted code book; ties go to the smaller value.
int nearest_code(float x, const std::vector<float>& book);

// Scale minimising sum s * (x - scale * q(x / scale))^2 over a segment (15 clip factors from the range,
// then two weighted least-squares refits); returns the error too. Books hold integers, sorted.
struct ScaleFit {
  float scale;
  double error;
};
// SIMD kernels sum in another order, so a near-tie between candidate scales may resolve differently.
ScaleFit fit_scale(const float* x, const float* s, int64_t count, const std::vector<float>& book,
                   Backend backend = Backend::automatic);

// Symmetric round-to-nearest baseline: q = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1), scale = absmax / (2^(b-1) - 1)
// per group of `group_size` consecutive weights of a row (group_size <= 0: whole row).
void rtn_quantize(const float* weights, int64_t rows, int64_t cols, int bits, int64_t group_size, int8_t* codes,
                  float* scales);
// Groups per row rtn_quantize writes scales for; InvalidArgument on an empty matrix or bad bits.
int64_t rtn_groups(int64_t rows, int64_t cols, int bits, int64_t group_size);

}  // namespace halo::hwq
