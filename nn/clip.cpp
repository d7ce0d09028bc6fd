#include "nn/clip.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace dagrad {

namespace {

template <class F>
void visit_floating(const Tensor& tensor, std::size_t index, std::string_view what, F&& f) {
  if (tensor.dtype() == DType::f32) {
    f(float{});
  } else if (tensor.dtype() == DType::f64) {
    f(double{});
  } else {
    throw Error(fmt::format("{}: gradient {} is {}; only f32 and f64 gradients can be clipped",
                            what, index, tensor.desc()));
  }
}

double norm_of(std::span<const Tensor> grads, std::string_view what) {
  double sum_squares = 0;
  for (std::size_t i = 0; i < grads.size(); ++i) {
    visit_floating(grads[i], i, what, [&](auto zero) {
      using T = decltype(zero);
      const T* g = grads[i].data<T>();
      const std::int64_t n = grads[i].numel();
      double partial = 0;
#pragma omp simd reduction(+ : partial)
      for (std::int64_t k = 0; k < n; ++k) partial += static_cast<double>(g[k]) * g[k];
      sum_squares += partial;
    });
  }
  return std::sqrt(sum_squares);
}

}  // namespace

double global_norm(std::span<const Tensor> grads) {
  return norm_of(grads, "global_norm");
}

double clip_grad_norm(std::span<Tensor> grads, double max_norm) {
  if (!(max_norm > 0) || !std::isfinite(max_norm)) {
    throw Error(fmt::format("clip_grad_norm: the maximum norm must be positive and finite, got {}",
                            max_norm));
  }
  const double norm = norm_of(grads, "clip_grad_norm");
  if (!std::isfinite(norm) || norm <= max_norm) return norm;
  const double scale = max_norm / norm;
  for (Tensor& grad : grads) {
    visit_floating(grad, 0, "clip_grad_norm", [&](auto zero) {
      using T = decltype(zero);
      T* g = grad.data<T>();
      const T factor = static_cast<T>(scale);
      const std::int64_t n = grad.numel();
#pragma omp simd
      for (std::int64_t k = 0; k < n; ++k) g[k] *= factor;
    });
  }
  return norm;
}

void clip_grad_value(std::span<Tensor> grads, double clip_value) {
  if (!(clip_value >= 0)) {
    throw Error(fmt::format("clip_grad_value: the clip value must be >= 0, got {}", clip_value));
  }
  for (std::size_t i = 0; i < grads.size(); ++i) {
    visit_floating(grads[i], i, "clip_grad_value", [&](auto zero) {
      using T = decltype(zero);
      T* g = grads[i].data<T>();
      const T high = static_cast<T>(clip_value);
      const std::int64_t n = grads[i].numel();
      for (std::int64_t k = 0; k < n; ++k) {
        if (g[k] > high) g[k] = high;
        if (g[k] < -high) g[k] = -high;
      }
    });
  }
}

}  // namespace dagrad
