// gradcheck: compares analytic gradients (grad()) with central differences
// (f(x+δ) − f(x−δ)) / 2δ, in f64 on the reference kernels.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "graph/graph.hpp"
#include "runtime/plan.hpp"

namespace dagrad {

struct GradcheckOptions {
  double step = 1e-6;       // δ
  double tolerance = 1e-6;  // pass when |analytic − numeric| ≤ tolerance · (1 + |numeric|)
  std::uint64_t seed = 7;   // for the random projection of non-scalar outputs
  RunOptions run;           // training mode and seed for random ops
};

struct GradcheckResult {
  bool ok = true;
  double worst_error = 0.0;       // the largest |analytic − numeric| / (1 + |numeric|)
  std::string worst_input;        // name of the input holding the worst element
  std::int64_t worst_index = -1;  // its flat row-major index
  double analytic = 0.0;
  double numeric = 0.0;
  std::size_t elements_checked = 0;
  std::string report() const;  // one line: verdict, worst element, both values
};

// Checks d output / d input for every f64 input in `at` (graph inputs fed with these values;
// inputs of other dtypes are fed but not perturbed). A non-scalar output is reduced to the
// scalar Σ output · w with fixed random weights w. Builds its nodes in `graph`.
// Throws Error when an input is not f64 (build the graph in f64 for gradcheck).
GradcheckResult gradcheck(Graph& graph, const Value& output, const Feeds& at,
                          const GradcheckOptions& options = {});

// The same check for the gradient of the gradient: checks d/dx (Σ ∇_x f · u) for a fixed
// random u, i.e. Hessian-vector products, against central differences of the gradient.
GradcheckResult gradgradcheck(Graph& graph, const Value& output, const Feeds& at,
                              const GradcheckOptions& options = {});

}  // namespace dagrad
