// Code-book search for HALO's INT8-subset mode.
//
// With the scales fixed, the weighted error of a layer's tiles at one point is
// sum s * scale^2 * (x / scale - q)^2: a weighted 1-D clustering of the
// normalised weights r = x / scale whose centres must be values the point
// admits. In 1-D the nearest-centre cells are intervals split at midpoints, so
// the best book of at most K admitted values is found exactly by a dynamic
// program over the sorted admitted values (O(K n^2) on a histogram whose bin
// edges are the half-integers, i.e. every possible midpoint). An optional
// energy term mu * (weights mapped to v) * energy(v) is additive per cell too,
// so the same program trades error for switching activity exactly. The
// quantizer alternates it with the per-segment scale search (Lloyd style).
#pragma once

#include <cstdint>
#include <vector>

namespace halo::hwq {

// Sums of w, w r and w r^2 and the number of samples per half-unit bin of r over [-129, 129) (values
// outside land in the edge bins).
struct WeightedHistogram {
  static constexpr double kLow = -129.0, kStep = 0.5;
  static constexpr int kBins = 516;
  std::vector<double> weight = std::vector<double>(kBins, 0.0);
  std::vector<double> first = std::vector<double>(kBins, 0.0);
  std::vector<double> second = std::vector<double>(kBins, 0.0);
  std::vector<double> count = std::vector<double>(kBins, 0.0);

  void add(double r, double w);
  void merge(const WeightedHistogram& other);
};

// Per-value energies for the activity term: energy[v + 128] for v in -128..127, and its weight.
struct EnergyTerm {
  const std::vector<double>* energy = nullptr;  // 256 entries; null: no energy term
  double weight = 0;                            // mu, in error units per (sample * energy unit)
};

// The book of min(size, admitted.size()) values from `admitted` (sorted, distinct, within -128..127)
// minimising the histogram's weighted squared distance to the nearest book value, plus the energy term.
// Sorted ascending.
std::vector<int> best_book(const WeightedHistogram& histogram, const std::vector<int>& admitted, int size,
                           const EnergyTerm& energy = {});

// sum over bins of the weighted squared distance of r to its nearest value of `book` (bins split at
// midpoints between book values, as best_book assumes).
double book_cost(const WeightedHistogram& histogram, const std::vector<int>& book);
// sum over bins of samples * energy of the book value they map to.
double book_energy(const WeightedHistogram& histogram, const std::vector<int>& book, const std::vector<double>& energy);

}  // namespace halo::hwq
