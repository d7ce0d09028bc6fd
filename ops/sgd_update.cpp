#include "ops/sgd_update.hpp"

#include <omp.h>

namespace dagrad {

namespace {

// Below this many elements the update runs on the calling thread (as nn::Optimizer::step).
constexpr std::int64_t parallel_elements = 32 * 1024;

class SGDUpdateKernel final : public Kernel {
 public:
  explicit SGDUpdateKernel(double weight_decay) : weight_decay_(weight_decay) {}

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
    const T lambda = static_cast<T>(weight_decay_);
    if (n < parallel_elements || omp_get_max_threads() == 1) {
      sgd_update(w, g, 0, n, eta, lambda);
      return;
    }
#pragma omp parallel
    {
      const std::int64_t team = omp_get_num_threads(), t = omp_get_thread_num();
      const auto boundary = [&](std::int64_t k) { return k == team ? n : k * n / team / 16 * 16; };
      sgd_update(w, g, boundary(t), boundary(t + 1), eta, lambda);
    }
  }

  double weight_decay_;
};

}  // namespace

std::unique_ptr<Kernel> sgd_update_kernel(double weight_decay) {
  return std::make_unique<SGDUpdateKernel>(weight_decay);
}

}  // namespace dagrad
