// Gradient clipping, in place, over the gradient tensors of one step (f32 or f64).
#pragma once

#include <span>

#include "graph/tensor.hpp"

namespace dagrad {

// ‖g‖ = √(Σ over all tensors and elements of g²), accumulated in f64.
double global_norm(std::span<const Tensor> grads);

// Clips by global norm θ > 0: returns ‖g‖ before clipping and, when ‖g‖ > θ, scales every
// gradient by θ / ‖g‖ (so the new global norm is θ). When ‖g‖ is not finite the gradients are
// left unchanged and the NaN/inf is returned, so the caller can skip the step.
// Error when θ is not positive and finite or a gradient is not f32/f64.
double clip_grad_norm(std::span<Tensor> grads, double max_norm);

// Clips each element to [−c, c], c >= 0 (NaN stays NaN). Error when c < 0 or NaN.
void clip_grad_value(std::span<Tensor> grads, double clip_value);

}  // namespace dagrad
