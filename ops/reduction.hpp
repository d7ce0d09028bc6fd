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

}  // namespace dagrad
