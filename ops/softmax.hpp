// softmax and log_softmax along any axis, numerically stable (the maximum is subtracted).
#pragma once

#include <source_location>

#include "graph/graph.hpp"

namespace dagrad {

// y_i = e^(x_i - max x) / Σ_j e^(x_j - max x) along `axis`.
Value softmax(const Value& x, std::int64_t axis = -1,
              std::source_location where = std::source_location::current());
// y_i = x_i - max x - log Σ_j e^(x_j - max x) along `axis`.
Value log_softmax(const Value& x, std::int64_t axis = -1,
                  std::source_location where = std::source_location::current());
// log_softmax's backward as one op, from its output y: dx = dy − e^y ⊙ Σ_axis dy (one oneDNN
// logsoftmax_backward instead of four steps). dy and y have the same shape.
Value log_softmax_grad(const Value& dy, const Value& y, std::int64_t axis = -1,
                       std::source_location where = std::source_location::current());

}  // namespace dagrad
