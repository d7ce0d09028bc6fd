// SGD's element updates (plain, momentum, Nesterov), shared by nn::SGD, nn::Momentum and the
// plan's own parameter updates (runtime/plan.hpp, SGDUpdate), so all give the same bits.
#pragma once

#include <cstdint>
#include <memory>

#include "ops/cpu.hpp"
#include "runtime/kernel.hpp"

namespace dagrad {

// w[i] ← w[i] − η (g[i] + λ w[i]) for i in [begin, end), computed in T as written (a product,
// a sum, a product and a difference, each rounded; the fused weight-gradient kernel computes
// the same four operations).
// (Both loops run in AVX2 where the processor has it, without FMA: the same bits.)
template <class T>
void sgd_update(T* w, const T* g, std::int64_t begin, std::int64_t end, T eta, T lambda) {
  run_vectorized([&]() __attribute__((always_inline)) {
#pragma omp simd
    for (std::int64_t i = begin; i < end; ++i) w[i] -= eta * (g[i] + lambda * w[i]);
  });
}

// SGD with momentum γ (nn::Momentum and nn::Nesterov, and the plan's fused updates), for i in
// [begin, end), with d = g[i] + λ w[i]:
//   v[i] ← γ v[i] − η d;  w[i] ← w[i] + v[i]            (heavy ball)
//   v[i] ← γ v[i] − η d;  w[i] ← w[i] + (γ v[i] − η d)  (Nesterov's look-ahead step)
// each product, sum and difference rounded in T as written.
template <class T>
void momentum_update(T* w, const T* g, T* v, std::int64_t begin, std::int64_t end, T eta, T lambda,
                     T gamma, bool nesterov) {
  run_vectorized([&]() __attribute__((always_inline)) {
    if (nesterov) {
#pragma omp simd
      for (std::int64_t i = begin; i < end; ++i) {
        const T d = g[i] + lambda * w[i];
        v[i] = gamma * v[i] - eta * d;
        w[i] += gamma * v[i] - eta * d;
      }
    } else {
#pragma omp simd
      for (std::int64_t i = begin; i < end; ++i) {
        const T d = g[i] + lambda * w[i];
        v[i] = gamma * v[i] - eta * d;
        w[i] += v[i];
      }
    }
  });
}

// The update rule of a plan's SGDUpdate: plain SGD when momentum is 0, else momentum_update.
struct SGDRule {
  double weight_decay = 0;
  double momentum = 0;
  bool nesterov = false;
};

// A plan step updating one parameter in place: inputs {parameter, gradient} of the same desc
// (f32 or f64), η from RunContext::learning_rate; with momentum, `velocity` (the parameter's
// desc) holds v between runs. Elements are split across the step's threads in ranges of
// multiples of 16 from 32k elements, so the result is the same bits on any number of threads.
std::unique_ptr<Kernel> sgd_update_kernel(SGDRule rule, Tensor velocity = {});

}  // namespace dagrad
