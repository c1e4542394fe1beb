// Column spans of project_points: the union of the points' column ranges as sorted, disjoint
// [start, stop) spans (overlapping or touching ranges merge; reference.column_spans). The product
// e @ B runs once per span, so points that share columns (the shared layout) share it. Plain C++,
// used by the CPU op, the CUDA launchers and the CUDA-on-CPU harness alike.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace dfa_kernels {

// ranges[l] = (offset, width) of point l; empty ranges take no part.
inline std::vector<std::pair<int64_t, int64_t>> column_spans(const std::vector<std::pair<int64_t, int64_t>>& ranges) {
  std::vector<std::pair<int64_t, int64_t>> sorted, spans;
  for (const auto& [offset, width] : ranges) {
    if (width > 0) sorted.emplace_back(offset, offset + width);
  }
  std::sort(sorted.begin(), sorted.end());
  for (const auto& r : sorted) {
    if (!spans.empty() && r.first <= spans.back().second) {
      spans.back().second = std::max(spans.back().second, r.second);
    } else {
      spans.push_back(r);
    }
  }
  return spans;
}

}  // namespace dfa_kernels
