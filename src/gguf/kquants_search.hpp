// Private to src/gguf: the per-group scale searches of ggml's K-quant reference
// quantizers (no importance matrix), shared by the scalar row functions and by
// the SIMD kernels for the blocks they hand back to the scalar path.
#pragma once

#include <cstdint>

namespace halo::gguf::search {

// Asymmetric codes 0..nmax with a scale and a (non-positive) min, chosen by a
// weighted least-squares search over nstep + 1 trial scales (ggml's
// make_qkx2_quants). Returns the scale; *the_min receives -min.
float min_scale_quants(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* the_min,
                       uint8_t* Laux, float rmin, float rdelta, int nstep, bool use_mad);

// Symmetric codes in [-nmax, nmax - 1] (stored + nmax), weights x^2, 19 trial
// scales (ggml's make_qx_quants with rmse_type 1 and no importance weights).
float symmetric_rmse_quants(int n, int nmax, const float* x, int8_t* L);

// Symmetric codes for Q3_K with the iterative refinement (ggml's make_q3_quants, do_rmse).
float symmetric_rmse_quants_q3(int n, int nmax, const float* x, int8_t* L);

// Q4_K / Q5_K's second half, given the 8 sub-block scales and mins and the codes L from the
// search: super-block scales, 6-bit sub-block scales, final codes, packing into `block`.
void finish_q4_k(const float* x, const float* scales, const float* mins, uint8_t* L, void* block);
void finish_q5_k(const float* x, const float* scales, const float* mins, uint8_t* L, void* block);

// Q6_K's second half: super-block scale, 8-bit sub-block scales, final codes and packing.
void finish_q6_k(const float* x, const float* scales, int8_t* L, void* block);

}  // namespace halo::gguf::search
