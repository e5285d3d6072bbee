// Exact best-book dynamic program over admitted INT8 values (see codebook.hpp).
#include "halo/hwq/codebook.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "halo/core/error.hpp"

namespace halo::hwq {

namespace {

using H = WeightedHistogram;

// Index of the bin edge at half-integer value v, clamped to [0, kBins].
int edge(double v) {
  const double index = std::round((v - H::kLow) / H::kStep);
  return static_cast<int>(std::clamp(index, 0.0, static_cast<double>(H::kBins)));
}

struct Prefix {
  std::vector<double> w, x, q, n;  // kBins + 1 prefix sums
  EnergyTerm energy;

  Prefix(const H& h, const EnergyTerm& term)
      : w(H::kBins + 1, 0.0), x(H::kBins + 1, 0.0), q(H::kBins + 1, 0.0), n(H::kBins + 1, 0.0), energy(term) {
    for (int b = 0; b < H::kBins; ++b) {
      w[b + 1] = w[b] + h.weight[b];
      x[b + 1] = x[b] + h.first[b];
      q[b + 1] = q[b] + h.second[b];
      n[b + 1] = n[b] + h.count[b];
    }
  }
  // Weighted squared distance of bins [from, to) to centre c (never negative: rounding of the expansion),
  // plus the energy term of the samples there.
  double cost(int from, int to, int c) const {
    if (to <= from) return 0.0;
    const double value = (q[to] - q[from]) - 2.0 * c * (x[to] - x[from]) + double(c) * c * (w[to] - w[from]);
    double total = std::max(value, 0.0);
    if (energy.energy && energy.weight > 0) total += energy.weight * (n[to] - n[from]) * (*energy.energy)[c + 128];
    return total;
  }
};

}  // namespace

void WeightedHistogram::add(double r, double w) {
  if (!(w > 0) || !std::isfinite(r)) return;
  const int bin = static_cast<int>(std::clamp(std::floor((r - kLow) / kStep), 0.0, static_cast<double>(kBins - 1)));
  weight[bin] += w;
  first[bin] += w * r;
  second[bin] += w * r * r;
  count[bin] += 1.0;
}

void WeightedHistogram::merge(const WeightedHistogram& other) {
  for (int b = 0; b < kBins; ++b) {
    weight[b] += other.weight[b];
    first[b] += other.first[b];
    second[b] += other.second[b];
    count[b] += other.count[b];
  }
}

std::vector<int> best_book(const WeightedHistogram& histogram, const std::vector<int>& admitted, int size,
                           const EnergyTerm& energy) {
  const char* fn = "best_book";
  require(size >= 1, fn, "size must be >= 1, got ", size);
  require(!admitted.empty(), fn, "no admitted values");
  for (size_t i = 0; i < admitted.size(); ++i) {
    require(admitted[i] >= -128 && admitted[i] <= 127, fn, "admitted value ", admitted[i], " is outside -128..127");
    require(i == 0 || admitted[i] > admitted[i - 1], fn, "admitted values must be sorted and distinct");
  }
  require(!energy.energy || energy.energy->size() == 256, fn, "the energy table must hold 256 values");
  require(std::isfinite(energy.weight) && energy.weight >= 0, fn, "the energy weight must be >= 0, got ",
          energy.weight);
  const int n = static_cast<int>(admitted.size());
  const int k_max = std::min(size, n);
  if (k_max == n) return admitted;
  const Prefix prefix(histogram, energy);
  const double inf = std::numeric_limits<double>::infinity();
  // best[k][j]: cost of the bins below admitted[j] with k + 1 centres, the largest being admitted[j].
  std::vector<std::vector<double>> best(k_max, std::vector<double>(n, inf));
  std::vector<std::vector<int>> from(k_max, std::vector<int>(n, -1));
  for (int j = 0; j < n; ++j) best[0][j] = prefix.cost(0, edge(admitted[j]), admitted[j]);
  for (int k = 1; k < k_max; ++k) {
    for (int j = k; j < n; ++j) {
      const int right = edge(admitted[j]);
      for (int i = k - 1; i < j; ++i) {
        if (best[k - 1][i] == inf) continue;
        const int left = edge(admitted[i]);
        const int middle = edge(0.5 * (admitted[i] + admitted[j]));
        const double total = best[k - 1][i] + prefix.cost(left, middle, admitted[i]) +
                             prefix.cost(middle, right, admitted[j]);
        if (total < best[k][j]) {
          best[k][j] = total;
          from[k][j] = i;
        }
      }
    }
  }
  int last = -1;
  double lowest = inf;
  for (int j = k_max - 1; j < n; ++j) {
    const double total = best[k_max - 1][j] + prefix.cost(edge(admitted[j]), H::kBins, admitted[j]);
    if (total < lowest) {
      lowest = total;
      last = j;
    }
  }
  std::vector<int> book(k_max);
  for (int k = k_max - 1, j = last; k >= 0; --k) {
    book[k] = admitted[j];
    j = from[k][j];
  }
  return book;
}

namespace {

double cells(const Prefix& prefix, const std::vector<int>& book) {
  double total = prefix.cost(0, edge(book.front()), book.front());
  for (size_t i = 0; i + 1 < book.size(); ++i) {
    const int middle = edge(0.5 * (book[i] + book[i + 1]));
    total += prefix.cost(edge(book[i]), middle, book[i]) + prefix.cost(middle, edge(book[i + 1]), book[i + 1]);
  }
  return total + prefix.cost(edge(book.back()), WeightedHistogram::kBins, book.back());
}

}  // namespace

double book_cost(const WeightedHistogram& histogram, const std::vector<int>& book) {
  require(!book.empty(), "book_cost", "empty book");
  return cells(Prefix(histogram, {}), book);
}

double book_energy(const WeightedHistogram& histogram, const std::vector<int>& book, const std::vector<double>& energy) {
  require(!book.empty(), "book_energy", "empty book");
  require(energy.size() == 256, "book_energy", "the energy table must hold 256 values");
  WeightedHistogram counts_only;
  counts_only.count = histogram.count;  // weights zero: only the energy term remains
  return cells(Prefix(counts_only, {&energy, 1.0}), book);
}

}  // namespace halo::hwq
