// Losses, and the primitives they need (pick, pick_grad, classification_error).
//
// Conventions shared by every loss:
//   - Dimension 0 is the example axis: y, t of shape [N, ...]. Each loss first computes one
//     value per example, l_i (shape [N]; a rank-0 or rank-1 input is already one value per
//     element), then reduces them with `reduction`:
//       none -> [w_i ·] l_i   (shape [N])
//       sum  -> Σ_i [w_i ·] l_i
//       mean -> Σ_i w_i l_i / Σ_i w_i with weights (a weighted mean: weights need not sum to 1,
//               and doubling every weight changes nothing); (1/N) Σ_i l_i without.
//     Per-example values average over the non-batch axes for mse, mae and the binary
//     cross-entropies (so mean over examples = mean over all elements), and sum over the class
//     axis (the last) for the categorical cross-entropies.
//   - `weights` (optional) has shape [N]: one weight per example.
//   - Probabilities are clamped to [ε, 1] with ε = 1e-7 before a log (clip, so no NaN or
//     infinity for p = 0 or p < 0). The gradient is clip's: 0 where the clamp is active and
//     at the bounds themselves (so also at p = 1 exactly). Prefer the *_with_logits losses
//     for training: they need no clamp.
// Losses are composites of registered ops, so their gradients come from those ops.
#pragma once

#include <optional>
#include <source_location>

#include "graph/graph.hpp"

namespace dagrad {

enum class Reduction { none, mean, sum };

// The clamp applied to probabilities before a log.
inline constexpr double probability_epsilon = 1e-7;

// Mean squared error: l_i = mean over features of (y − t)².
Value mse(const Value& y, const Value& t, Reduction reduction = Reduction::mean,
          std::optional<Value> weights = std::nullopt,
          std::source_location where = std::source_location::current());
// The course's E = ½ Σ (y − t)²: l_i = ½ Σ over features of (y − t)². Its default reduction is
// `sum` (unlike the other losses) so that sum_of_squares(y, t) is exactly E; pass
// Reduction::mean for E / N.
Value sum_of_squares(const Value& y, const Value& t, Reduction reduction = Reduction::sum,
                     std::optional<Value> weights = std::nullopt,
                     std::source_location where = std::source_location::current());
// Mean absolute error: l_i = mean over features of |y − t| (subgradient 0 where y = t).
Value mae(const Value& y, const Value& t, Reduction reduction = Reduction::mean,
          std::optional<Value> weights = std::nullopt,
          std::source_location where = std::source_location::current());
// Binary cross-entropy on probabilities p (targets t in [0, 1]):
// l = −[t log p̂ + (1 − t) log(1 − p)^], with p̂ = clip(p, ε, 1) and (1 − p)^ = clip(1 − p, ε, 1);
// averaged over features.
Value binary_cross_entropy(const Value& p, const Value& t, Reduction reduction = Reduction::mean,
                           std::optional<Value> weights = std::nullopt,
                           std::source_location where = std::source_location::current());
// Binary cross-entropy on logits z: l = max(z, 0) − z·t + log(1 + e^(−|z|)), which equals
// −[t log σ(z) + (1 − t) log(1 − σ(z))] and stays finite and exact for large |z|.
Value binary_cross_entropy_with_logits(
    const Value& z, const Value& t, Reduction reduction = Reduction::mean,
    std::optional<Value> weights = std::nullopt,
    std::source_location where = std::source_location::current());
// Categorical cross-entropy on probabilities p (class axis last) with one-hot or probability
// targets t of p's shape: l_i = −Σ_c t_c log clip(p_c, ε, 1).
Value cross_entropy(const Value& p, const Value& t, Reduction reduction = Reduction::mean,
                    std::optional<Value> weights = std::nullopt,
                    std::source_location where = std::source_location::current());
// Categorical cross-entropy on logits z (class axis last): l_i = −Σ_c t_c log_softmax(z)_c.
Value cross_entropy_with_logits(const Value& z, const Value& t,
                                Reduction reduction = Reduction::mean,
                                std::optional<Value> weights = std::nullopt,
                                std::source_location where = std::source_location::current());
// Cross-entropy on logits z [N, C] with integer labels [N] (i32, in [0, C)):
// l_i = −log_softmax(z)_(i, label_i). A label outside [0, C) raises Error at run time naming
// the label and its position.
Value sparse_cross_entropy(const Value& z, const Value& labels,
                           Reduction reduction = Reduction::mean,
                           std::optional<Value> weights = std::nullopt,
                           std::source_location where = std::source_location::current());

// Fraction of examples whose highest score is not the target class: scores [N, C] against i32
// labels [N] or one-hot (or probability) targets [N, C] (the target class is their argmax).
// Ties go to the lowest class index. A scalar of scores' dtype; it has no gradient.
Value classification_error(const Value& scores, const Value& targets,
                           std::source_location where = std::source_location::current());

// Element-wise binary cross-entropy on logits, the primitive behind
// binary_cross_entropy_with_logits: l = max(z, 0) − z·t + log(1 + e^(−|z|)); dl/dz = σ(z) − t.
Value logistic_loss(const Value& z, const Value& t,
                    std::source_location where = std::source_location::current());
// y_i = x[i, labels_i] for x [N, C] and i32 labels [N]. Gradient: pick_grad.
Value pick(const Value& x, const Value& labels,
           std::source_location where = std::source_location::current());
// pick's backward: dx [N, classes] with dx[i, labels_i] = dy_i and zeros elsewhere.
Value pick_grad(const Value& dy, const Value& labels, std::int64_t classes,
                std::source_location where = std::source_location::current());

}  // namespace dagrad
