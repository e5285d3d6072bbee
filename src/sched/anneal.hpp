// Simulated annealing over move/swap neighbourhoods for small balancing
// instances (private to src/sched): the greedy starts and the descent of
// balance.cpp stop in local optima a few percent above the exact optimum on
// heterogeneous instances with tight loss budgets; a randomised search that
// also accepts uphill steps gets out of them.
#pragma once

#include <cstdint>
#include <vector>

#include "halo/sched/balance.hpp"

namespace halo::sched {

// Improves `device_of` in place: the result meets the loss budget when the start
// does, and every device's capacity. Deterministic for a seed.
void anneal(const std::vector<Group>& groups, const std::vector<Device>& devices, std::vector<int32_t>& device_of,
            double budget, uint64_t seed, int64_t iterations);

// Exact re-split of the slowest device's groups with one other device at a time
// (every split enumerated when the pair holds at most `max_groups` groups), as
// long as that lowers the step time. Keeps budget and capacities.
void pair_exact(const std::vector<Group>& groups, const std::vector<Device>& devices, std::vector<int32_t>& device_of,
                double budget, int32_t max_groups);

// Branch and bound from the incumbent `device_of` (improved in place when it
// finds better) over the groups in `free` (all when null; the others stay put);
// gives up after `node_cap` nodes. True when the search finished, i.e. the
// result is optimal for the free groups.
bool exact_search(const std::vector<Group>& groups, const std::vector<Device>& devices, std::vector<int32_t>& device_of,
                  double budget, int64_t node_cap, const std::vector<int32_t>* free = nullptr);

// Large-neighbourhood search: `rounds` times, frees `subset` groups (a third from
// the slowest device, a third from the idlest) and re-places them with exact_search.
void large_neighbourhood(const std::vector<Group>& groups, const std::vector<Device>& devices,
                         std::vector<int32_t>& device_of, double budget, uint64_t seed, int32_t rounds,
                         int32_t subset, int64_t node_cap);

}  // namespace halo::sched
