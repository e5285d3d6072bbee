// Quantizes a random weight matrix to NF4 with double quantization using the
// installed halo package, dequantizes it, and checks the error bound.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <halo/quant/quant4.hpp>

int main() {
  const int64_t rows = 256, cols = 384;
  std::vector<float> weight(rows * cols);
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  for (float& w : weight) w = normal(rng);

  halo::Quantized4 q = halo::quantize_4bit(weight.data(), halo::Format::f32, {rows, cols}, halo::Format::nf4,
                                           64, /*double_quant=*/true);
  std::vector<float> restored(weight.size());
  halo::dequantize_4bit(q, restored.data(), halo::Format::f32);

  const std::vector<float> absmax = q.block_absmax();
  double worst = 0.0;
  for (size_t i = 0; i < weight.size(); ++i)
    worst = std::max(worst, std::fabs(double(restored[i]) - weight[i]) / absmax[i / 64]);
  const double bytes = double(q.packed.size() + q.nested->codes.size() + 4 * q.nested->absmax.size() + 4);
  std::printf("backend %s: %lld weights -> %.0f bytes (%.3f bits/weight), worst error %.4f x absmax\n",
              std::string(halo::backend_name(halo::resolve(halo::Backend::automatic))).c_str(),
              static_cast<long long>(weight.size()), bytes, 8.0 * bytes / double(weight.size()), worst);
  if (worst > 0.16) {
    std::fprintf(stderr, "error above the NF4 bound\n");
    return 1;
  }
  return 0;
}
