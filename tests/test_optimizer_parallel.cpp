// Optimizer::step splits the update of all parameters across threads. Every element's update
// depends only on that element and per-step scalars, so the parameters and the state after a few
// steps must be bitwise the same on one thread and on several, whatever the parameter sizes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <memory>

#include "nn/optimizer.hpp"
#include "runtime/kernel.hpp"

namespace dagrad {
namespace {

// Sizes that put the thread split inside a parameter and leave ragged SIMD tails; 71,042 elements
// in total, above the threshold under which step() stays on one thread.
const std::vector<std::int64_t> sizes = {1, 7, 33, 1000, 70001};

// Restores the thread count when a test ends, even a failing one.
class ThreadCountGuard {
 public:
  ThreadCountGuard() : saved_(num_threads()) {}
  ~ThreadCountGuard() { set_num_threads(saved_); }
  ThreadCountGuard(const ThreadCountGuard&) = delete;
  ThreadCountGuard& operator=(const ThreadCountGuard&) = delete;

 private:
  int saved_;
};

using MakeOptimizer = std::function<std::unique_ptr<Optimizer>(double weight_decay)>;

struct Trained {
  std::vector<Tensor> params;
  NamedTensors state;
};

// Three steps of `optimizer` on `threads` threads, from the same parameters and gradients each
// time (smooth pseudo-random values of both signs, different at every step).
Trained train_three_steps(Optimizer& optimizer, DType dtype, int threads) {
  set_num_threads(threads);
  Trained result;
  std::vector<Tensor> grads;
  for (std::size_t p = 0; p < sizes.size(); ++p) {
    result.params.emplace_back(Shape{sizes[p]}, dtype);
    grads.emplace_back(Shape{sizes[p]}, dtype);
    for (std::int64_t i = 0; i < sizes[p]; ++i) {
      result.params[p].set(i, std::cos(0.37 * static_cast<double>(i) + static_cast<double>(p)));
    }
  }
  for (int step = 0; step < 3; ++step) {
    for (std::size_t p = 0; p < sizes.size(); ++p) {
      for (std::int64_t i = 0; i < sizes[p]; ++i) {
        grads[p].set(
            i, 0.5 * std::sin(0.11 * static_cast<double>(i) + 1.3 * step + static_cast<double>(p)));
      }
    }
    optimizer.step(result.params, grads);
  }
  result.state = optimizer.state();
  return result;
}

// The index of the first element whose bytes differ, or -1.
std::int64_t first_difference(const Tensor& a, const Tensor& b) {
  const std::size_t element = size_of(a.dtype());
  const auto* x = static_cast<const unsigned char*>(a.raw());
  const auto* y = static_cast<const unsigned char*>(b.raw());
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    const std::size_t at = static_cast<std::size_t>(i) * element;
    if (std::memcmp(x + at, y + at, element) != 0) return i;
  }
  return -1;
}

void expect_same_on_one_and_several_threads(const std::string& label, const MakeOptimizer& make) {
  const ThreadCountGuard guard;
  for (const DType dtype : {DType::f32, DType::f64}) {
    for (const double weight_decay : {0.0, 0.05}) {
      const std::string where = fmt::format("{} {} weight decay {}", label, dtype, weight_decay);
      const Trained serial = train_three_steps(*make(weight_decay), dtype, 1);
      for (const int threads : {2, 3}) {
        const Trained parallel = train_three_steps(*make(weight_decay), dtype, threads);
        for (std::size_t p = 0; p < sizes.size(); ++p) {
          ASSERT_EQ(std::memcmp(serial.params[p].raw(), parallel.params[p].raw(),
                                serial.params[p].bytes()),
                    0)
              << where << ", " << threads << " threads: parameter " << p << " differs first at "
              << first_difference(serial.params[p], parallel.params[p]);
        }
        ASSERT_EQ(serial.state.size(), parallel.state.size()) << where;
        for (std::size_t s = 0; s < serial.state.size(); ++s) {
          const Tensor& a = serial.state[s].second;
          const Tensor& b = parallel.state[s].second;
          ASSERT_EQ(a.desc(), b.desc()) << where << ": " << serial.state[s].first;
          EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.bytes()), 0)
              << where << ", " << threads << " threads: state " << serial.state[s].first
              << " differs first at " << first_difference(a, b);
        }
      }
    }
  }
}

TEST(OptimizerParallel, SGDIsBitwiseTheSameOnOneAndSeveralThreads) {
  expect_same_on_one_and_several_threads("SGD", [](double weight_decay) {
    return std::make_unique<SGD>(SGDOptions{.learning_rate = 0.1, .weight_decay = weight_decay});
  });
}

TEST(OptimizerParallel, MomentumIsBitwiseTheSameOnOneAndSeveralThreads) {
  expect_same_on_one_and_several_threads("Momentum", [](double weight_decay) {
    return std::make_unique<Momentum>(
        MomentumOptions{.learning_rate = 0.1, .momentum = 0.9, .weight_decay = weight_decay});
  });
}

TEST(OptimizerParallel, NesterovIsBitwiseTheSameOnOneAndSeveralThreads) {
  expect_same_on_one_and_several_threads("Nesterov", [](double weight_decay) {
    return std::make_unique<Nesterov>(
        MomentumOptions{.learning_rate = 0.1, .momentum = 0.9, .weight_decay = weight_decay});
  });
}

TEST(OptimizerParallel, AdaGradIsBitwiseTheSameOnOneAndSeveralThreads) {
  expect_same_on_one_and_several_threads("AdaGrad", [](double weight_decay) {
    return std::make_unique<AdaGrad>(
        AdaGradOptions{.learning_rate = 0.1, .weight_decay = weight_decay});
  });
}

TEST(OptimizerParallel, RMSPropIsBitwiseTheSameOnOneAndSeveralThreads) {
  expect_same_on_one_and_several_threads("RMSProp", [](double weight_decay) {
    return std::make_unique<RMSProp>(
        RMSPropOptions{.learning_rate = 0.01, .weight_decay = weight_decay});
  });
}

TEST(OptimizerParallel, AdamIsBitwiseTheSameOnOneAndSeveralThreads) {
  expect_same_on_one_and_several_threads("Adam", [](double weight_decay) {
    return std::make_unique<Adam>(AdamOptions{.learning_rate = 0.01, .weight_decay = weight_decay});
  });
}

TEST(OptimizerParallel, AdamWIsBitwiseTheSameOnOneAndSeveralThreads) {
  expect_same_on_one_and_several_threads("AdamW", [](double weight_decay) {
    return std::make_unique<AdamW>(
        AdamWOptions{.learning_rate = 0.01, .weight_decay = weight_decay});
  });
}

// The update loops run in AVX2 where the processor has it (ops/cpu.hpp run_vectorized), without
// FMA, so each product, sum, quotient and square root is rounded as the formula is written.
// Each optimiser's parameters and state after three steps must be the bits of that formula
// computed one element at a time here (as the baseline SSE code computes it). Contracting an
// operation into an FMA, or reordering one, changes the last bit of many of the 71k elements.
template <class T>
void expect_formula_bits(const std::string& name, DType dtype) {
  const double eta = 0.01, lambda = 0.05, gamma = 0.9, rho = 0.9, beta1 = 0.9, beta2 = 0.999;
  const double eps_adagrad = 1e-10, eps = 1e-8;
  std::unique_ptr<Optimizer> optimizer;
  if (name == "SGD") optimizer = std::make_unique<SGD>(SGDOptions{eta, lambda});
  if (name == "Momentum")
    optimizer = std::make_unique<Momentum>(MomentumOptions{eta, gamma, lambda});
  if (name == "Nesterov")
    optimizer = std::make_unique<Nesterov>(MomentumOptions{eta, gamma, lambda});
  if (name == "AdaGrad")
    optimizer = std::make_unique<AdaGrad>(AdaGradOptions{eta, eps_adagrad, lambda});
  if (name == "RMSProp")
    optimizer = std::make_unique<RMSProp>(RMSPropOptions{eta, rho, eps, lambda});
  if (name == "Adam")
    optimizer = std::make_unique<Adam>(AdamOptions{eta, beta1, beta2, eps, lambda});
  if (name == "AdamW")
    optimizer = std::make_unique<AdamW>(AdamWOptions{eta, beta1, beta2, eps, lambda});
  ASSERT_NE(optimizer, nullptr) << name;
  const Trained trained = train_three_steps(*optimizer, dtype, 2);
  const T e = static_cast<T>(eta), l = static_cast<T>(lambda), y = static_cast<T>(gamma);
  for (std::size_t p = 0; p < sizes.size(); ++p) {
    for (std::int64_t i = 0; i < sizes[p]; ++i) {
      T w = static_cast<T>(std::cos(0.37 * static_cast<double>(i) + static_cast<double>(p)));
      T a = 0, b = 0;  // state: velocity, sum or mean of squares, or Adam's m and v
      for (int step = 0; step < 3; ++step) {
        const T grad = static_cast<T>(
            0.5 * std::sin(0.11 * static_cast<double>(i) + 1.3 * step + static_cast<double>(p)));
        const T g = name == "AdamW" ? grad : grad + l * w;
        if (name == "SGD") {
          w -= e * g;
        } else if (name == "Momentum" || name == "Nesterov") {
          a = y * a - e * g;
          w += name == "Momentum" ? a : y * a - e * g;
        } else if (name == "AdaGrad") {
          a += g * g;
          w -= e * g / (std::sqrt(a) + static_cast<T>(eps_adagrad));
        } else if (name == "RMSProp") {
          a = static_cast<T>(rho) * a + (T(1) - static_cast<T>(rho)) * g * g;
          w -= e * g / (std::sqrt(a) + static_cast<T>(eps));
        } else {
          const T b1 = static_cast<T>(beta1), b2 = static_cast<T>(beta2);
          const T c1 = static_cast<T>(1.0 / (1.0 - std::pow(beta1, step + 1.0)));
          const T c2 = static_cast<T>(1.0 / (1.0 - std::pow(beta2, step + 1.0)));
          const T shrink = static_cast<T>(name == "AdamW" ? 1.0 - eta * lambda : 1.0);
          a = b1 * a + (T(1) - b1) * g;
          b = b2 * b + (T(1) - b2) * g * g;
          w = shrink * w - e * (a * c1) / (std::sqrt(b * c2) + static_cast<T>(eps));
        }
      }
      const T got = trained.params[p].data<T>()[i];
      ASSERT_EQ(std::memcmp(&got, &w, sizeof(T)), 0)
          << name << " " << fmt::format("{}", dtype) << ": parameter " << p << " element " << i
          << " is " << got << ", the formula gives " << w;
    }
  }
}

TEST(OptimizerParallel, EveryUpdateIsItsFormulaRoundedOpByOp) {
  for (const char* name : {"SGD", "Momentum", "Nesterov", "AdaGrad", "RMSProp", "Adam", "AdamW"}) {
    expect_formula_bits<float>(name, DType::f32);
    expect_formula_bits<double>(name, DType::f64);
  }
}

}  // namespace
}  // namespace dagrad
