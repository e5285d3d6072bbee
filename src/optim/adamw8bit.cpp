// The dispatch point for AdamW8bit: validates the settings, builds the code
// books' midpoints once, picks the kernel from the registry and splits the
// work over the thread pool in whole 256-element blocks.
#include "halo/optim/adamw8bit.hpp"

#include <algorithm>
#include <cmath>

#include "halo/backend/dispatch.hpp"
#include "halo/core/codebooks.hpp"
#include "halo/core/error.hpp"
#include "halo/core/parallel.hpp"
#include "src/cuda/cuda_api.hpp"
#include "src/optim/adamw8bit_kernels.hpp"

namespace halo {
namespace {

constexpr std::array<float, 256> kDynamicMapUnsigned = {
    0.0f, 0x1.5cf7540000000p-22f, 0x1.a013300000000p-21f, 0x1.1d36700000000p-19f,
    0x1.2599ec0000000p-18f, 0x1.bc98a20000000p-18f, 0x1.29cbaa0000000p-17f, 0x1.0624dc0000000p-16f,
    0x1.c2e3400000000p-16f, 0x1.3fd0d00000000p-15f, 0x1.9e30000000000p-15f, 0x1.fc8f340000000p-15f,
    0x1.2d77320000000p-14f, 0x1.5ca6c80000000p-14f, 0x1.8bd6620000000p-14f, 0x1.0cb2960000000p-13f,
    0x1.82a9940000000p-13f, 0x1.f8a0920000000p-13f, 0x1.374bc80000000p-12f, 0x1.7247440000000p-12f,
    0x1.ad42c60000000p-12f, 0x1.e83e440000000p-12f, 0x1.119ce20000000p-11f, 0x1.2f1aa00000000p-11f,
    0x1.4c98600000000p-11f, 0x1.6a16200000000p-11f, 0x1.8793de0000000p-11f, 0x1.a511a00000000p-11f,
    0x1.c28f5e0000000p-11f, 0x1.e00d1c0000000p-11f, 0x1.fd8adc0000000p-11f, 0x1.2b020c0000000p-10f,
    0x1.74bc6a0000000p-10f, 0x1.be76c80000000p-10f, 0x1.0418940000000p-9f, 0x1.28f5c20000000p-9f,
    0x1.4dd2f00000000p-9f, 0x1.72b0200000000p-9f, 0x1.978d4e0000000p-9f, 0x1.bc6a800000000p-9f,
    0x1.e147ae0000000p-9f, 0x1.03126e0000000p-8f, 0x1.1581040000000p-8f, 0x1.27ef9e0000000p-8f,
    0x1.3a5e340000000p-8f, 0x1.4ccccc0000000p-8f, 0x1.5f3b640000000p-8f, 0x1.71a9fa0000000p-8f,
    0x1.8418940000000p-8f, 0x1.96872a0000000p-8f, 0x1.a8f5c20000000p-8f, 0x1.bb645c0000000p-8f,
    0x1.cdd2f00000000p-8f, 0x1.e0418a0000000p-8f, 0x1.f2b01e0000000p-8f, 0x1.028f5c0000000p-7f,
    0x1.0bc6a80000000p-7f, 0x1.14fdf20000000p-7f, 0x1.1e35400000000p-7f, 0x1.276c8a0000000p-7f,
    0x1.30a3d60000000p-7f, 0x1.39db240000000p-7f, 0x1.43126e0000000p-7f, 0x1.5eb8540000000p-7f,
    0x1.8cccce0000000p-7f, 0x1.bae1460000000p-7f, 0x1.e8f5c40000000p-7f, 0x1.0b851e0000000p-6f,
    0x1.228f5e0000000p-6f, 0x1.39999a0000000p-6f, 0x1.50a3d60000000p-6f, 0x1.67ae160000000p-6f,
    0x1.7eb8520000000p-6f, 0x1.95c28e0000000p-6f, 0x1.acccce0000000p-6f, 0x1.c3d70e0000000p-6f,
    0x1.dae1460000000p-6f, 0x1.f1eb860000000p-6f, 0x1.047ae00000000p-5f, 0x1.1000000000000p-5f,
    0x1.1b851e0000000p-5f, 0x1.270a3e0000000p-5f, 0x1.328f5e0000000p-5f, 0x1.3e147a0000000p-5f,
    0x1.49999a0000000p-5f, 0x1.551eb80000000p-5f, 0x1.60a3d60000000p-5f, 0x1.6c28f60000000p-5f,
    0x1.77ae140000000p-5f, 0x1.8333340000000p-5f, 0x1.8eb8500000000p-5f, 0x1.9a3d700000000p-5f,
    0x1.a5c28e0000000p-5f, 0x1.b147ae0000000p-5f, 0x1.bcccce0000000p-5f, 0x1.c851ee0000000p-5f,
    0x1.d3d70e0000000p-5f, 0x1.df5c2a0000000p-5f, 0x1.eae1460000000p-5f, 0x1.f666660000000p-5f,
    0x1.00f5c40000000p-4f, 0x1.06b8540000000p-4f, 0x1.0c7ae20000000p-4f, 0x1.123d700000000p-4f,
    0x1.1800000000000p-4f, 0x1.1dc2900000000p-4f, 0x1.2385200000000p-4f, 0x1.2947ae0000000p-4f,
    0x1.2f0a3e0000000p-4f, 0x1.34ccce0000000p-4f, 0x1.3a8f5e0000000p-4f, 0x1.4051ec0000000p-4f,
    0x1.46147c0000000p-4f, 0x1.4bd70a0000000p-4f, 0x1.51999a0000000p-4f, 0x1.575c2a0000000p-4f,
    0x1.5d1eb80000000p-4f, 0x1.62e1480000000p-4f, 0x1.68a3d60000000p-4f, 0x1.6e66660000000p-4f,
    0x1.7428f60000000p-4f, 0x1.79eb860000000p-4f, 0x1.7fae160000000p-4f, 0x1.8570a40000000p-4f,
    0x1.8b33340000000p-4f, 0x1.90f5c40000000p-4f, 0x1.96b8520000000p-4f, 0x1.a800000000000p-4f,
    0x1.c4cccc0000000p-4f, 0x1.e1999a0000000p-4f, 0x1.fe66660000000p-4f, 0x1.0d99980000000p-3f,
    0x1.1c00000000000p-3f, 0x1.2a66680000000p-3f, 0x1.38cccc0000000p-3f, 0x1.4733340000000p-3f,
    0x1.5599980000000p-3f, 0x1.6400000000000p-3f, 0x1.7266680000000p-3f, 0x1.80cccc0000000p-3f,
    0x1.8f33340000000p-3f, 0x1.9d99980000000p-3f, 0x1.ac00000000000p-3f, 0x1.ba66680000000p-3f,
    0x1.c8cccc0000000p-3f, 0x1.d733340000000p-3f, 0x1.e599980000000p-3f, 0x1.f400000000000p-3f,
    0x1.0133320000000p-2f, 0x1.0866660000000p-2f, 0x1.0f999a0000000p-2f, 0x1.16cccc0000000p-2f,
    0x1.1e00000000000p-2f, 0x1.2533340000000p-2f, 0x1.2c66660000000p-2f, 0x1.3399980000000p-2f,
    0x1.3acccc0000000p-2f, 0x1.4200000000000p-2f, 0x1.4933340000000p-2f, 0x1.5066660000000p-2f,
    0x1.5799980000000p-2f, 0x1.5ecccc0000000p-2f, 0x1.6600000000000p-2f, 0x1.6d33340000000p-2f,
    0x1.7466660000000p-2f, 0x1.7b99980000000p-2f, 0x1.82cccc0000000p-2f, 0x1.8a00000000000p-2f,
    0x1.9133340000000p-2f, 0x1.9866660000000p-2f, 0x1.9f99980000000p-2f, 0x1.a6cccc0000000p-2f,
    0x1.ae00000000000p-2f, 0x1.b533340000000p-2f, 0x1.bc66660000000p-2f, 0x1.c399980000000p-2f,
    0x1.cacccc0000000p-2f, 0x1.d200000000000p-2f, 0x1.d933340000000p-2f, 0x1.e066660000000p-2f,
    0x1.e799980000000p-2f, 0x1.eecccc0000000p-2f, 0x1.f600000000000p-2f, 0x1.fd33320000000p-2f,
    0x1.0233340000000p-1f, 0x1.05cccc0000000p-1f, 0x1.0966660000000p-1f, 0x1.0d00000000000p-1f,
    0x1.1099980000000p-1f, 0x1.1433340000000p-1f, 0x1.17cccc0000000p-1f, 0x1.1b66680000000p-1f,
    0x1.1f00000000000p-1f, 0x1.22999a0000000p-1f, 0x1.2633340000000p-1f, 0x1.29cccc0000000p-1f,
    0x1.2d66680000000p-1f, 0x1.3100000000000p-1f, 0x1.34999a0000000p-1f, 0x1.3833340000000p-1f,
    0x1.3bcccc0000000p-1f, 0x1.3f66680000000p-1f, 0x1.4300000000000p-1f, 0x1.46999a0000000p-1f,
    0x1.4a33340000000p-1f, 0x1.4dcccc0000000p-1f, 0x1.5166680000000p-1f, 0x1.5500000000000p-1f,
    0x1.58999a0000000p-1f, 0x1.5c33340000000p-1f, 0x1.5fcccc0000000p-1f, 0x1.6366680000000p-1f,
    0x1.6700000000000p-1f, 0x1.6a999a0000000p-1f, 0x1.6e33340000000p-1f, 0x1.71cccc0000000p-1f,
    0x1.7566680000000p-1f, 0x1.7900000000000p-1f, 0x1.7c999a0000000p-1f, 0x1.8033340000000p-1f,
    0x1.83cccc0000000p-1f, 0x1.8766680000000p-1f, 0x1.8b00000000000p-1f, 0x1.8e99980000000p-1f,
    0x1.9233340000000p-1f, 0x1.95cccc0000000p-1f, 0x1.9966680000000p-1f, 0x1.9d00000000000p-1f,
    0x1.a099980000000p-1f, 0x1.a433340000000p-1f, 0x1.a7cccc0000000p-1f, 0x1.ab66680000000p-1f,
    0x1.af00000000000p-1f, 0x1.b299980000000p-1f, 0x1.b633340000000p-1f, 0x1.b9cccc0000000p-1f,
    0x1.bd66680000000p-1f, 0x1.c100000000000p-1f, 0x1.c499980000000p-1f, 0x1.c833340000000p-1f,
    0x1.cbcccc0000000p-1f, 0x1.cf66680000000p-1f, 0x1.d300000000000p-1f, 0x1.d699980000000p-1f,
    0x1.da33340000000p-1f, 0x1.ddcccc0000000p-1f, 0x1.e166680000000p-1f, 0x1.e500000000000p-1f,
    0x1.e899980000000p-1f, 0x1.ec33340000000p-1f, 0x1.efcccc0000000p-1f, 0x1.f366680000000p-1f,
    0x1.f700000000000p-1f, 0x1.fa99980000000p-1f, 0x1.fe33340000000p-1f, 0x1.0000000000000p+0f,
};

struct Midpoints {
  std::array<float, 255> signed_map;
  std::array<float, 255> unsigned_map;
};

const Midpoints& midpoints() {
  static const Midpoints table = [] {
    Midpoints m{};
    for (int i = 0; i < 255; ++i) {
      m.signed_map[i] = (kDynamicMapSigned[i] + kDynamicMapSigned[i + 1]) * 0.5f;
      m.unsigned_map[i] = (kDynamicMapUnsigned[i] + kDynamicMapUnsigned[i + 1]) * 0.5f;
    }
    return m;
  }();
  return table;
}

using StepKernel = void (*)(const kernels::AdamW8bitJob&, int64_t, int64_t);

const KernelTable<StepKernel> kAdamW8bit{"adamw8bit_step",
                                         {rung(Backend::scalar, kernels::adamw8bit_scalar),
                                          rung(Backend::avx2, kernels::adamw8bit_avx2),
                                          rung(Backend::avx512, kernels::adamw8bit_avx512)}};
const KernelRegistration kRegAdamW8bit(kAdamW8bit);

using DeviceStep = void (*)(void*, const void*, Format, int64_t, uint8_t*, uint8_t*, float*, float*,
                            const AdamW8bitSettings&, uintptr_t);
const KernelTable<DeviceStep> kAdamW8bitDevice{"adamw8bit_step_device",
                                               {rung(Backend::cuda, cuda::adamw8bit_step_device)}};
const KernelRegistration kRegAdamW8bitDevice(kAdamW8bitDevice);

// About 64 Ki elements per chunk: a thread's share is worth its start-up.
constexpr int64_t kBlocksPerChunk = 256;

}  // namespace

const std::array<float, 256>& dynamic_map_unsigned() { return kDynamicMapUnsigned; }

void check_adamw8bit(const char* function, Format dtype, int64_t n, const AdamW8bitSettings& s) {
  require<TypeMismatch>(is_kernel_float(dtype), function, "param/grad dtype must be float32, float16 or bfloat16, got ",
                        format_name(dtype));
  require(n > 0, function, "the parameter is empty (n = ", n, ")");
  require(std::isfinite(s.lr) && s.lr >= 0.0f, function, "lr must be a finite number >= 0, got ", s.lr);
  require(s.beta1 >= 0.0f && s.beta1 < 1.0f, function, "beta1 must be in [0, 1), got ", s.beta1);
  require(s.beta2 >= 0.0f && s.beta2 < 1.0f, function, "beta2 must be in [0, 1), got ", s.beta2);
  require(std::isfinite(s.eps) && s.eps > 0.0f, function, "eps must be a finite number > 0, got ", s.eps);
  require(std::isfinite(s.weight_decay) && s.weight_decay >= 0.0f, function,
          "weight_decay must be a finite number >= 0, got ", s.weight_decay);
  require(s.step >= 1, function, "step must be >= 1 (the first update is step 1), got ", s.step);
  require(std::isfinite(s.gnorm_scale), function, "gnorm_scale must be finite, got ", s.gnorm_scale);
}

void adamw8bit_step(void* param, const void* grad, Format dtype, int64_t n, uint8_t* state1, uint8_t* state2,
                    float* absmax1, float* absmax2, const AdamW8bitSettings& s, Backend backend) {
  const char* fn = "adamw8bit_step";
  check_adamw8bit(fn, dtype, n, s);
  const Dispatched<StepKernel> chosen = dispatch(kAdamW8bit, backend);
  const Midpoints& mid = midpoints();
  // Bias corrections in double, rounded once (bitsandbytes computes them in Python floats).
  const double correction1 = 1.0 - std::pow(double(s.beta1), double(s.step));
  const double correction2 = std::sqrt(1.0 - std::pow(double(s.beta2), double(s.step)));
  const kernels::AdamW8bitJob job{param,
                                  grad,
                                  dtype,
                                  n,
                                  state1,
                                  state2,
                                  absmax1,
                                  absmax2,
                                  kDynamicMapSigned.data(),
                                  kDynamicMapUnsigned.data(),
                                  mid.signed_map.data(),
                                  mid.unsigned_map.data(),
                                  s.lr,
                                  s.beta1,
                                  s.beta2,
                                  s.eps,
                                  float(1.0 - double(s.lr) * double(s.weight_decay)),
                                  float(double(s.lr) / correction1),
                                  float(correction2),
                                  s.gnorm_scale};
  const int64_t blocks = (n + kOptimizerBlocksize - 1) / kOptimizerBlocksize;
  parallel_for(blocks, kBlocksPerChunk, [&](int64_t first, int64_t last) { chosen.kernel(job, first, last); });
}

void adamw8bit_step_device(void* param, const void* grad, Format dtype, int64_t n, uint8_t* state1, uint8_t* state2,
                           float* absmax1, float* absmax2, const AdamW8bitSettings& s, uintptr_t stream) {
  check_adamw8bit("adamw8bit_step_device", dtype, n, s);
  dispatch(kAdamW8bitDevice, Backend::cuda).kernel(param, grad, dtype, n, state1, state2, absmax1, absmax2, s, stream);
}

}  // namespace halo
