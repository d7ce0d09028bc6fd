#include "ops/sgd_update.hpp"

#include <omp.h>

namespace dagrad {

namespace {

// Below this many elements the update runs on the calling thread (as nn::Optimizer::step).
constexpr std::int64_t parallel_elements = 32 * 1024;

class SGDUpdateKernel final : public Kernel {
 public:
  SGDUpdateKernel(SGDRule rule, Tensor velocity) : rule_(rule), velocity_(std::move(velocity)) {}

  void run(const KernelCall& call) override {
    if (call.inputs[0].dtype() == DType::f32) {
      update<float>(call);
    } else {
      update<double>(call);
    }
  }

 private:
  template <class T>
  void update(const KernelCall& call) const {
    // The parameter's own storage (a leaf bound at each run), updated in place.
    T* w = const_cast<T*>(call.inputs[0].data<T>());
    const T* g = call.inputs[1].data<T>();
    const std::int64_t n = call.inputs[0].numel();
    const T eta = static_cast<T>(call.context.learning_rate);
    const T lambda = static_cast<T>(rule_.weight_decay);
    const T gamma = static_cast<T>(rule_.momentum);
    Tensor velocity = velocity_;  // a handle on the same storage, written through
    T* v = rule_.momentum > 0 ? velocity.data<T>() : nullptr;
    const auto update_range = [&](std::int64_t begin, std::int64_t end) {
      if (v != nullptr) {
        momentum_update(w, g, v, begin, end, eta, lambda, gamma, rule_.nesterov);
      } else {
        sgd_update(w, g, begin, end, eta, lambda);
      }
    };
    if (n < parallel_elements || omp_get_max_threads() == 1) {
      update_range(0, n);
      return;
    }
#pragma omp parallel
    {
      const std::int64_t team = omp_get_num_threads(), t = omp_get_thread_num();
      const auto boundary = [&](std::int64_t k) { return k == team ? n : k * n / team / 16 * 16; };
      update_range(boundary(t), boundary(t + 1));
    }
  }

  SGDRule rule_;
  Tensor velocity_;  // shares the plan's velocity storage
};

}  // namespace

std::unique_ptr<Kernel> sgd_update_kernel(SGDRule rule, Tensor velocity) {
  return std::make_unique<SGDUpdateKernel>(rule, std::move(velocity));
}

}  // namespace dagrad
