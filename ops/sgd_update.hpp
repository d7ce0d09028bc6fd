// Plain SGD's element update, shared by nn::SGD and the plan's fused parameter updates
// (runtime/plan.hpp, SGDUpdate), so both give the same bits.
#pragma once

#include <cstdint>
#include <memory>

#include "runtime/kernel.hpp"

namespace dagrad {

// w[i] ← w[i] − η (g[i] + λ w[i]) for i in [begin, end), computed in T as written (a product,
// a sum, a product and a difference, each rounded; the fused weight-gradient kernel computes
// the same four operations).
template <class T>
void sgd_update(T* w, const T* g, std::int64_t begin, std::int64_t end, T eta, T lambda) {
#pragma omp simd
  for (std::int64_t i = begin; i < end; ++i) w[i] -= eta * (g[i] + lambda * w[i]);
}

// A plan step updating one parameter in place: inputs {parameter, gradient} of the same desc
// (f32 or f64), η from RunContext::learning_rate, λ = weight_decay. Elements are split across
// the step's threads in ranges of multiples of 16 from 32k elements, so the result is the same
// bits on any number of threads.
std::unique_ptr<Kernel> sgd_update_kernel(double weight_decay);

}  // namespace dagrad
