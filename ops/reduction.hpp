// Reductions over all axes or given axes.
#pragma once

#include <source_location>
#include <vector>

#include "graph/graph.hpp"

namespace dagrad {

// Sum of all elements (a scalar).
Value sum(const Value& x, std::source_location where = std::source_location::current());
// Sum over `axes` (negative axes count from the end); keepdims keeps them as size 1.
Value sum(const Value& x, std::vector<std::int64_t> axes, bool keepdims = false,
          std::source_location where = std::source_location::current());
// Mean of all elements, or over `axes`.
Value mean(const Value& x, std::source_location where = std::source_location::current());
Value mean(const Value& x, std::vector<std::int64_t> axes, bool keepdims = false,
           std::source_location where = std::source_location::current());

// numel(a) / numel(b) as a scalar of a's dtype, computed from the shapes the plan runs with
// (the inputs' data is not read; zero gradient): mean's backward divides by it so that its
// gradient follows the batch size. ShapeError when b has no elements or a is not f32/f64.
Value count_ratio(const Value& a, const Value& b,
                  std::source_location where = std::source_location::current());

}  // namespace dagrad
