// dagrad's own kernels for sparse cross-entropy on logits (ops/loss.hpp), which the plan's
// fusion pass (runtime/fusion.cpp) runs in place of the small ops the loss is made of; not a
// user API. A classifier's loss is a handful of tiny steps whose cost is the per-step overhead
// (a oneDNN primitive's execute costs a few µs and allocates), not arithmetic:
//   forward   y = log_softmax(z) along the rows of z [N, C], p_i = y[i, label_i], and, where
//             the graph goes on that way, n = −p and m = mean(n): one pass, four steps before;
//   backward  dz = log_softmax_grad(pick_grad(d, labels), y) = d_i ([j = label_i] − e^y_ij),
//             d_i being a vector (± d_i), a broadcast scalar (± s) or the mean's backward
//             (± a / b, both scalars): one pass, up to six steps before.
// f32 only. e^x runs on AVX2 + FMA where the processor has them (a polynomial within 2 ulp of
// std::exp on the range softmax uses) and std::exp elsewhere. Rows are split across the
// threads only for large inputs; every value is computed by one thread in a fixed order, so the
// results are the same bits on any number of threads.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "runtime/kernel.hpp"

namespace dagrad {

// What follows pick in the forward graph and is computed in the same pass.
enum class PickTail {
  none,      // outputs y, p
  neg,       // outputs y, p, n = −p
  neg_mean,  // outputs y, p, n, m = mean(n) (one element; summed in double)
};

// Inputs z [rows, classes] f32 and labels i32 [rows]; outputs as PickTail says. A label
// outside [0, classes) raises an Error naming `site` (the pick node's), as pick does.
std::unique_ptr<Kernel> log_softmax_pick_kernel(std::int64_t rows, std::int64_t classes,
                                                PickTail tail, std::string site);

// Where the backward's row factor d_i comes from: the inputs after y and labels.
enum class RowFactor {
  vector,    // d [rows]
  scalar,    // s, one element, the same for every row
  quotient,  // a / b, two one-element values (mean's backward: the incoming gradient / N)
};

// Inputs y [rows, classes] (log-probabilities), labels i32 [rows], then the factor's inputs;
// output dz [rows, classes] = ±d_i ([j = label_i] − e^y_ij), negated when `negate`. A label out
// of range raises an Error naming `site` (the pick_grad node's).
std::unique_ptr<Kernel> pick_log_softmax_grad_kernel(std::int64_t rows, std::int64_t classes,
                                                     RowFactor factor, bool negate,
                                                     std::string site);

// y[i] = e^x[i] for n floats, the vector kernel where the processor has AVX2 + FMA (within 2 ulp
// of std::exp up to x = 88; 0 below ln(FLT_MIN), +inf above 88.376). Exposed for its test.
void exp_f32(const float* x, float* y, std::int64_t n);

}  // namespace dagrad
