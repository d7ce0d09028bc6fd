// Element-wise math: abs, sign, square, clip (and clip's backward).
#pragma once

#include <source_location>

#include "graph/graph.hpp"

namespace dagrad {

// |x|. Gradient sign(x): 1 for x > 0, -1 for x < 0, and the subgradient 0 at x = 0.
Value abs(const Value& x, std::source_location where = std::source_location::current());
// sign(x): 1 for x > 0, -1 for x < 0, 0 at 0. Its gradient is 0 (the derivative almost
// everywhere; 0 is also the value chosen at the jump).
Value sign(const Value& x, std::source_location where = std::source_location::current());
// x². Gradient 2x.
Value square(const Value& x, std::source_location where = std::source_location::current());
// min(max(x, low), high), low <= high. Gradient 1 strictly inside (low < x < high), 0 elsewhere
// (0 at the bounds themselves).
Value clip(const Value& x, double low, double high,
           std::source_location where = std::source_location::current());
// clip's backward: dy where low < x < high, else 0. Differentiable in dy; its gradient in x is 0.
Value clip_grad(const Value& dy, const Value& x, double low, double high,
                std::source_location where = std::source_location::current());

}  // namespace dagrad
