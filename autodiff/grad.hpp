// Reverse-mode automatic differentiation that builds gradients as graph nodes.
#pragma once

#include <optional>
#include <vector>

#include "graph/graph.hpp"

namespace dagrad {

// Gradients of `loss` with respect to each value in `wrt`, added to loss's graph as nodes
// (so they compile and run like any value, and can be differentiated again).
//
// Walks the nodes between `wrt` and `loss` in reverse topological order, calls each op's
// backward rule, and sums the gradients that fan in to one value. `loss` must be a scalar
// unless `seed` (the gradient of some scalar with respect to loss, of loss's shape) is given.
// A value in `wrt` that `loss` does not depend on gets a zero gradient of its own shape.
// Throws GraphError when the path crosses an op that has no gradient (naming it and why),
// and when a backward rule returns a gradient of the wrong shape or dtype.
std::vector<Value> grad(const Value& loss, const std::vector<Value>& wrt,
                        std::optional<Value> seed = std::nullopt);

// Hessian-vector product: d/dθ ( Σ_i ∇_θi loss · v_i ), one value per parameter.
std::vector<Value> hvp(const Value& loss, const std::vector<Value>& params,
                       const std::vector<Value>& v);

}  // namespace dagrad
