#include "nn/optimizer.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>

#include "ops/cpu.hpp"
#include "ops/sgd_update.hpp"
#include "runtime/kernel.hpp"

namespace dagrad {

namespace {

// Below this many elements in total, step() updates on the calling thread. Measured with an SGD
// step on one f32 parameter of 4k–1M elements (a google-benchmark sweep like optimizer_step in
// bench/bench_engine.cpp, this threshold set to 0, 2-core KVM guest, idle, default OpenMP wait
// policy): opening the parallel region costs about 2 µs, so 2 threads lose below 16k elements,
// break even between 16k and 32k (32k: 7.3 µs on 1 thread, 6.6–7.1 µs on 2) and win from 64k
// (64k: 14.7 → 11.5 µs; 256k: 57 → 38 µs).
constexpr std::int64_t parallel_threshold = 32 * 1024;

// Calls f(T{}) with T = float or double per `dtype` (callers checked it is floating).
template <class F>
void visit_floating(DType dtype, F&& f) {
  if (dtype == DType::f32) {
    f(float{});
  } else {
    f(double{});
  }
}

std::int64_t to_index(const std::string& text) {
  if (text.empty() || text.size() > 9 ||
      !std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return -1;
  }
  return std::stoll(text);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Optimizer

Optimizer::Optimizer(std::string name, double learning_rate, double weight_decay,
                     std::vector<std::string> slot_names)
    : name_(std::move(name)), weight_decay_(weight_decay), slot_names_(std::move(slot_names)) {
  set_learning_rate(learning_rate);
  check_range("weight decay", weight_decay, 0, HUGE_VAL);
}

void Optimizer::check_range(std::string_view what, double value, double low, double high,
                            bool high_inclusive) const {
  const bool inside =
      std::isfinite(value) && value >= low && (high_inclusive ? value <= high : value < high);
  if (!inside) {
    const std::string upper = std::isinf(high)
                                  ? std::string("inf)")
                                  : fmt::format("{}{}", high, high_inclusive ? "]" : ")");
    throw Error(fmt::format("{}: {} must be finite and in [{}, {}, got {}", name_, what, low, upper,
                            value));
  }
}

void Optimizer::set_learning_rate(double learning_rate) {
  if (!(learning_rate > 0) || !std::isfinite(learning_rate)) {
    throw Error(
        fmt::format("{}: learning rate must be positive and finite, got {}", name_, learning_rate));
  }
  learning_rate_ = learning_rate;
}

void Optimizer::step(std::span<Tensor> params, std::span<const Tensor> grads) {
  if (params.size() != grads.size()) {
    throw Error(
        fmt::format("{}: {} parameters but {} gradients", name_, params.size(), grads.size()));
  }
  for (std::size_t i = 0; i < params.size(); ++i) {
    if (!is_floating(params[i].dtype())) {
      throw Error(fmt::format("{}: parameter {} is {}; only f32 and f64 parameters can be trained",
                              name_, i, params[i].desc()));
    }
    if (params[i].desc() != grads[i].desc()) {
      throw Error(fmt::format("{}: gradient {} is {} but parameter {} is {}", name_, i,
                              grads[i].desc(), i, params[i].desc()));
    }
  }
  if (!slots_.empty() || !descs_.empty()) {
    if (descs_.size() != params.size()) {
      throw Error(
          fmt::format("{}: the state was created for {} parameters, got {}; pass the same "
                      "parameters every step or call reset()",
                      name_, descs_.size(), params.size()));
    }
    for (std::size_t i = 0; i < params.size(); ++i) {
      if (params[i].desc() != descs_[i]) {
        throw Error(
            fmt::format("{}: parameter {} is {} but the state was created for {}; pass the "
                        "same parameters every step or call reset()",
                        name_, i, params[i].desc(), descs_[i]));
      }
    }
  } else {
    // First step: the state buffers, zero-filled.
    descs_.clear();
    slots_.assign(params.size(), {});
    for (std::size_t i = 0; i < params.size(); ++i) {
      descs_.push_back(params[i].desc());
      for (std::size_t s = 0; s < slot_names_.size(); ++s) slots_[i].emplace_back(params[i].desc());
    }
  }
  ++steps_;
  prepare_step();
  std::int64_t total = 0;
  for (const Tensor& param : params) total += param.numel();
  const int threads = num_threads();
  if (threads == 1 || total < parallel_threshold) {
    update_range(params, grads, 0, total);
    return;
  }
  // Thread t of T takes the global elements [t·total/T, (t+1)·total/T), both ends rounded down to
  // a multiple of 16 (the last thread's end is total): whole SIMD vectors, and 64-byte boundaries
  // of f32 parameters whose sizes are multiples of 16, as layer sizes usually are.
#pragma omp parallel num_threads(threads)
  {
    const std::int64_t team = omp_get_num_threads();
    const std::int64_t t = omp_get_thread_num();
    const auto boundary = [&](std::int64_t k) {
      return k == team ? total : k * total / team / 16 * 16;
    };
    update_range(params, grads, boundary(t), boundary(t + 1));
  }
}

void Optimizer::update_range(std::span<Tensor> params, std::span<const Tensor> grads,
                             std::int64_t begin, std::int64_t end) {
  std::int64_t start = 0;  // global index of params[i]'s first element
  for (std::size_t i = 0; i < params.size() && start < end; ++i) {
    const std::int64_t numel = params[i].numel();
    const std::int64_t first = std::max(begin, start);
    const std::int64_t last = std::min(end, start + numel);
    if (first < last) update(params[i], grads[i], slots_[i], first - start, last - start);
    start += numel;
  }
}

NamedTensors Optimizer::state() const {
  NamedTensors result;
  result.emplace_back("step", Tensor::scalar(static_cast<double>(steps_), DType::f64));
  for (std::size_t i = 0; i < slots_.size(); ++i) {
    for (std::size_t s = 0; s < slot_names_.size(); ++s) {
      result.emplace_back(fmt::format("{}.{}", slot_names_[s], i), slots_[i][s]);
    }
  }
  return result;
}

void Optimizer::load_state(const NamedTensors& state) {
  std::optional<std::int64_t> steps;
  std::map<std::int64_t, std::vector<const Tensor*>> by_param;
  for (const auto& [name, tensor] : state) {
    if (name == "step") {
      if (tensor.numel() != 1 || !is_floating(tensor.dtype()) || !(tensor.item() >= 0) ||
          tensor.item() != std::floor(tensor.item())) {
        throw Error(
            fmt::format("{}: state tensor \"step\" must be one non-negative whole number, "
                        "got {}",
                        name_, tensor.desc()));
      }
      steps = static_cast<std::int64_t>(tensor.item());
      continue;
    }
    const auto dot = name.rfind('.');
    const auto slot = std::find(slot_names_.begin(), slot_names_.end(),
                                dot == std::string::npos ? name : name.substr(0, dot));
    const std::int64_t index = dot == std::string::npos ? -1 : to_index(name.substr(dot + 1));
    if (slot == slot_names_.end() || index < 0) {
      throw Error(
          fmt::format("{}: unknown state tensor \"{}\" (expected \"step\"{})", name_, name,
                      slot_names_.empty()
                          ? std::string()
                          : fmt::format(" and \"{}.<i>\"", fmt::join(slot_names_, ".<i>\", \""))));
    }
    auto& entry = by_param[index];
    entry.resize(slot_names_.size(), nullptr);
    entry[static_cast<std::size_t>(slot - slot_names_.begin())] = &tensor;
  }
  if (!steps) throw Error(fmt::format("{}: the state has no \"step\" tensor", name_));

  std::vector<TensorDesc> descs;
  std::vector<std::vector<Tensor>> slots;
  for (std::int64_t i = 0; i < static_cast<std::int64_t>(by_param.size()); ++i) {
    const auto found = by_param.find(i);
    if (found == by_param.end()) {
      throw Error(fmt::format("{}: the state has slots for parameter {} but none for parameter {}",
                              name_, by_param.rbegin()->first, i));
    }
    std::vector<Tensor> copies;
    for (std::size_t s = 0; s < slot_names_.size(); ++s) {
      const Tensor* tensor = found->second[s];
      if (tensor == nullptr) {
        throw Error(fmt::format("{}: state tensor \"{}.{}\" is missing", name_, slot_names_[s], i));
      }
      if (!is_floating(tensor->dtype()) || (s > 0 && tensor->desc() != copies.front().desc())) {
        throw Error(
            fmt::format("{}: state tensor \"{}.{}\" is {}, expected a floating tensor like "
                        "\"{}.{}\"",
                        name_, slot_names_[s], i, tensor->desc(), slot_names_[0], i));
      }
      copies.push_back(tensor->clone());
    }
    if (!copies.empty()) descs.push_back(copies.front().desc());
    slots.push_back(std::move(copies));
  }
  steps_ = *steps;
  descs_ = std::move(descs);
  slots_ = slot_names_.empty() ? std::vector<std::vector<Tensor>>{} : std::move(slots);
}

void Optimizer::reset() {
  steps_ = 0;
  descs_.clear();
  slots_.clear();
}

// ---------------------------------------------------------------------------------------------
// The update rules. Each loop computes in the parameter's own type T.

SGD::SGD(SGDOptions options) : Optimizer("SGD", options.learning_rate, options.weight_decay, {}) {}

void SGD::update(Tensor& param, const Tensor& grad, std::span<Tensor>, std::int64_t begin,
                 std::int64_t end) const {
  visit_floating(param.dtype(), [&](auto zero) {
    using T = decltype(zero);
    sgd_update(param.data<T>(), grad.data<T>(), begin, end, static_cast<T>(learning_rate()),
               static_cast<T>(weight_decay()));
  });
}

Momentum::Momentum(MomentumOptions options) : Momentum("Momentum", options, false) {}

Momentum::Momentum(std::string name, MomentumOptions options, bool nesterov)
    : Optimizer(std::move(name), options.learning_rate, options.weight_decay, {"velocity"}),
      momentum_(options.momentum),
      nesterov_(nesterov) {
  check_range("momentum", momentum_, 0, 1);
}

void Momentum::update(Tensor& param, const Tensor& grad, std::span<Tensor> slots,
                      std::int64_t begin, std::int64_t end) const {
  visit_floating(param.dtype(), [&](auto zero) {
    using T = decltype(zero);
    momentum_update(param.data<T>(), grad.data<T>(), slots[0].data<T>(), begin, end,
                    static_cast<T>(learning_rate()), static_cast<T>(weight_decay()),
                    static_cast<T>(momentum_), nesterov_);
  });
}

Nesterov::Nesterov(MomentumOptions options) : Momentum("Nesterov", options, true) {}

AdaGrad::AdaGrad(AdaGradOptions options)
    : Optimizer("AdaGrad", options.learning_rate, options.weight_decay, {"sum_squares"}),
      epsilon_(options.epsilon) {
  check_range("epsilon", epsilon_, 0, HUGE_VAL);
}

void AdaGrad::update(Tensor& param, const Tensor& grad, std::span<Tensor> slots, std::int64_t begin,
                     std::int64_t end) const {
  visit_floating(param.dtype(), [&](auto zero) {
    using T = decltype(zero);
    T* w = param.data<T>();
    const T* dw = grad.data<T>();
    T* sum_squares = slots[0].data<T>();
    const T eta = static_cast<T>(learning_rate());
    const T lambda = static_cast<T>(weight_decay());
    const T eps = static_cast<T>(epsilon_);
    run_vectorized([&]() __attribute__((always_inline)) {
#pragma omp simd
      for (std::int64_t i = begin; i < end; ++i) {
        const T g = dw[i] + lambda * w[i];
        sum_squares[i] += g * g;
        w[i] -= eta * g / (std::sqrt(sum_squares[i]) + eps);
      }
    });
  });
}

RMSProp::RMSProp(RMSPropOptions options)
    : Optimizer("RMSProp", options.learning_rate, options.weight_decay, {"mean_square"}),
      decay_(options.decay),
      epsilon_(options.epsilon) {
  check_range("decay", decay_, 0, 1);
  check_range("epsilon", epsilon_, 0, HUGE_VAL);
}

void RMSProp::update(Tensor& param, const Tensor& grad, std::span<Tensor> slots, std::int64_t begin,
                     std::int64_t end) const {
  visit_floating(param.dtype(), [&](auto zero) {
    using T = decltype(zero);
    T* w = param.data<T>();
    const T* dw = grad.data<T>();
    T* mean_square = slots[0].data<T>();
    const T eta = static_cast<T>(learning_rate());
    const T lambda = static_cast<T>(weight_decay());
    const T rho = static_cast<T>(decay_);
    const T eps = static_cast<T>(epsilon_);
    run_vectorized([&]() __attribute__((always_inline)) {
#pragma omp simd
      for (std::int64_t i = begin; i < end; ++i) {
        const T g = dw[i] + lambda * w[i];
        mean_square[i] = rho * mean_square[i] + (T(1) - rho) * g * g;
        w[i] -= eta * g / (std::sqrt(mean_square[i]) + eps);
      }
    });
  });
}

Adam::Adam(AdamOptions options) : Adam("Adam", options, false) {}

Adam::Adam(std::string name, AdamOptions options, bool decoupled)
    : Optimizer(std::move(name), options.learning_rate, options.weight_decay, {"m", "v"}),
      beta1_(options.beta1),
      beta2_(options.beta2),
      epsilon_(options.epsilon),
      decoupled_(decoupled) {
  check_range("beta1", beta1_, 0, 1);
  check_range("beta2", beta2_, 0, 1);
  check_range("epsilon", epsilon_, 0, HUGE_VAL);
}

void Adam::prepare_step() {
  // Bias corrections in f64: βᵗ underflows gracefully, and 1 − β2ᵗ is tiny for small t.
  const double t = static_cast<double>(steps());
  inverse_correction1_ = 1.0 / (1.0 - std::pow(beta1_, t));
  inverse_correction2_ = 1.0 / (1.0 - std::pow(beta2_, t));
}

void Adam::update(Tensor& param, const Tensor& grad, std::span<Tensor> slots, std::int64_t begin,
                  std::int64_t end) const {
  visit_floating(param.dtype(), [&](auto zero) {
    using T = decltype(zero);
    T* w = param.data<T>();
    const T* dw = grad.data<T>();
    T* m = slots[0].data<T>();
    T* v = slots[1].data<T>();
    const T eta = static_cast<T>(learning_rate());
    const T l2 = static_cast<T>(decoupled_ ? 0.0 : weight_decay());
    const T shrink = static_cast<T>(decoupled_ ? 1.0 - learning_rate() * weight_decay() : 1.0);
    const T b1 = static_cast<T>(beta1_);
    const T b2 = static_cast<T>(beta2_);
    const T eps = static_cast<T>(epsilon_);
    const T inverse_correction1 = static_cast<T>(inverse_correction1_);
    const T inverse_correction2 = static_cast<T>(inverse_correction2_);
    run_vectorized([&]() __attribute__((always_inline)) {
#pragma omp simd
      for (std::int64_t i = begin; i < end; ++i) {
        const T g = dw[i] + l2 * w[i];
        m[i] = b1 * m[i] + (T(1) - b1) * g;
        v[i] = b2 * v[i] + (T(1) - b2) * g * g;
        const T m_hat = m[i] * inverse_correction1;
        const T v_hat = v[i] * inverse_correction2;
        w[i] = shrink * w[i] - eta * m_hat / (std::sqrt(v_hat) + eps);
      }
    });
  });
}

AdamW::AdamW(AdamWOptions options)
    : Adam("AdamW",
           AdamOptions{.learning_rate = options.learning_rate,
                       .beta1 = options.beta1,
                       .beta2 = options.beta2,
                       .epsilon = options.epsilon,
                       .weight_decay = options.weight_decay},
           true) {}

// ---------------------------------------------------------------------------------------------
// L-BFGS

namespace {

double dot(const std::vector<double>& a, const double* b) {
  double total = 0;
  for (std::size_t i = 0; i < a.size(); ++i) total += a[i] * b[i];
  return total;
}

double max_abs(const std::vector<double>& a) {
  double largest = 0;
  for (double value : a) largest = std::max(largest, std::abs(value));
  return largest;
}

}  // namespace

LBFGS::LBFGS(LBFGSOptions options) : options_(options) {
  const auto check = [](std::string_view what, double value, bool ok) {
    if (!ok || std::isnan(value)) {
      throw Error(fmt::format("LBFGS: {} is out of range, got {}", what, value));
    }
  };
  check("learning rate (must be positive and finite)", options.learning_rate,
        options.learning_rate > 0 && std::isfinite(options.learning_rate));
  check("max_iterations (must be >= 1)", options.max_iterations, options.max_iterations >= 1);
  check("history_size (must be >= 1)", options.history_size, options.history_size >= 1);
  check("tolerance_grad (must be >= 0)", options.tolerance_grad, options.tolerance_grad >= 0);
  check("tolerance_change (must be >= 0)", options.tolerance_change, options.tolerance_change >= 0);
  check("armijo_c1 (must be in (0, 1))", options.armijo_c1,
        options.armijo_c1 > 0 && options.armijo_c1 < 1);
  check("wolfe_c2 (must be in (armijo_c1, 1))", options.wolfe_c2,
        options.wolfe_c2 > options.armijo_c1 && options.wolfe_c2 < 1);
  check("backtrack_factor (must be in (0, 1))", options.backtrack_factor,
        options.backtrack_factor > 0 && options.backtrack_factor < 1);
  check("max_line_search_steps (must be >= 1)", options.max_line_search_steps,
        options.max_line_search_steps >= 1);
}

void LBFGS::reset() {
  history_count_ = 0;
  history_head_ = 0;
  gamma_ = 1;
}

double LBFGS::evaluate(std::span<Tensor> params, const Closure& closure,
                       std::vector<double>& g_out) {
  ++evaluations_;
  const double loss = closure(grads_);
  std::size_t offset = 0;
  for (std::size_t i = 0; i < grads_.size(); ++i) {
    if (grads_[i].desc() != params[i].desc()) {
      throw Error(
          fmt::format("LBFGS: the closure replaced gradient {} by a {} tensor; parameter "
                      "{} is {}",
                      i, grads_[i].desc(), i, params[i].desc()));
    }
    visit_floating(grads_[i].dtype(), [&](auto zero) {
      using T = decltype(zero);
      const T* src = grads_[i].data<T>();
      const std::int64_t n = grads_[i].numel();
      for (std::int64_t k = 0; k < n; ++k) g_out[offset + static_cast<std::size_t>(k)] = src[k];
    });
    offset += static_cast<std::size_t>(grads_[i].numel());
  }
  return loss;
}

// Writes x into the parameters, and then x ← what they hold (x rounded to f32 where a parameter
// is f32), so that s = Δx is the step the closure really saw.
void LBFGS::write_params(std::span<Tensor> params, std::vector<double>& x) const {
  std::size_t offset = 0;
  for (Tensor& param : params) {
    visit_floating(param.dtype(), [&](auto zero) {
      using T = decltype(zero);
      T* dst = param.data<T>();
      const std::int64_t n = param.numel();
      for (std::int64_t k = 0; k < n; ++k) {
        double& value = x[offset + static_cast<std::size_t>(k)];
        dst[k] = static_cast<T>(value);
        value = static_cast<double>(dst[k]);
      }
    });
    offset += static_cast<std::size_t>(param.numel());
  }
}

// d = −H g, H the L-BFGS inverse-Hessian estimate from the stored (s, y) pairs.
void LBFGS::two_loop(const std::vector<double>& g, std::vector<double>& d) {
  const std::size_t n = g.size();
  const int m = options_.history_size;
  for (std::size_t k = 0; k < n; ++k) d[k] = -g[k];
  for (int j = 0; j < history_count_; ++j) {  // newest to oldest
    const int slot = (history_head_ - 1 - j + m) % m;
    const double* s = &s_history_[static_cast<std::size_t>(slot) * n];
    const double* y = &y_history_[static_cast<std::size_t>(slot) * n];
    const double a = rho_[slot] * dot(d, s);
    alpha_[slot] = a;
    for (std::size_t k = 0; k < n; ++k) d[k] -= a * y[k];
  }
  for (std::size_t k = 0; k < n; ++k) d[k] *= gamma_;
  for (int j = history_count_ - 1; j >= 0; --j) {  // oldest to newest
    const int slot = (history_head_ - 1 - j + m) % m;
    const double* s = &s_history_[static_cast<std::size_t>(slot) * n];
    const double* y = &y_history_[static_cast<std::size_t>(slot) * n];
    const double b = rho_[slot] * dot(d, y);
    for (std::size_t k = 0; k < n; ++k) d[k] += s[k] * (alpha_[slot] - b);
  }
}

NamedTensors LBFGS::state() const {
  NamedTensors result;
  result.emplace_back("iterations", Tensor::scalar(static_cast<double>(iterations_), DType::f64));
  result.emplace_back("evaluations", Tensor::scalar(static_cast<double>(evaluations_), DType::f64));
  if (history_count_ == 0) return result;
  const auto m = static_cast<std::int64_t>(options_.history_size);
  const auto n = static_cast<std::int64_t>(x_.size());
  result.emplace_back("history", Tensor::from({static_cast<double>(history_count_),
                                               static_cast<double>(history_head_), gamma_},
                                              {3}, DType::f64));
  result.emplace_back("s", Tensor::from(s_history_, {m, n}, DType::f64));
  result.emplace_back("y", Tensor::from(y_history_, {m, n}, DType::f64));
  result.emplace_back("rho", Tensor::from(rho_, {m}, DType::f64));
  return result;
}

void LBFGS::load_state(const NamedTensors& state) {
  std::map<std::string, const Tensor*> by_name;
  for (const auto& [name, tensor] : state) {
    if (name != "iterations" && name != "evaluations" && name != "history" && name != "s" &&
        name != "y" && name != "rho") {
      throw Error(fmt::format("LBFGS: unknown state tensor \"{}\"", name));
    }
    if (tensor.dtype() != DType::f64) {
      throw Error(
          fmt::format("LBFGS: state tensor \"{}\" is {}, expected f64", name, tensor.desc()));
    }
    by_name[name] = &tensor;
  }
  const auto require = [&](const char* name, const Shape& shape) -> const Tensor& {
    const auto found = by_name.find(name);
    if (found == by_name.end()) {
      throw Error(fmt::format("LBFGS: state tensor \"{}\" is missing", name));
    }
    if (found->second->shape() != shape) {
      throw Error(fmt::format("LBFGS: state tensor \"{}\" has shape {}, expected {}", name,
                              found->second->shape(), shape));
    }
    return *found->second;
  };
  const auto iterations = static_cast<std::int64_t>(require("iterations", {}).item());
  const auto evaluations = static_cast<std::int64_t>(require("evaluations", {}).item());
  if (!by_name.contains("history")) {
    iterations_ = iterations;
    evaluations_ = evaluations;
    reset();
    return;
  }
  const auto m = static_cast<std::int64_t>(options_.history_size);
  const Tensor& history = require("history", {3});
  const auto found_s = by_name.find("s");
  if (found_s == by_name.end() || found_s->second->shape().rank() != 2) {
    throw Error("LBFGS: state tensor \"s\" is missing or not a matrix");
  }
  const std::int64_t n = found_s->second->shape()[1];
  require("s", {m, n});
  const Tensor& y = require("y", {m, n});
  const Tensor& rho = require("rho", {m});
  const double count = history.at(0), head = history.at(1), gamma = history.at(2);
  if (!(count >= 1 && count <= static_cast<double>(m) && head >= 0 &&
        head < static_cast<double>(m) && count == std::floor(count) && head == std::floor(head) &&
        gamma > 0 && std::isfinite(gamma))) {
    throw Error(
        fmt::format("LBFGS: state tensor \"history\" [{}, {}, {}] is not (count in [1, {}], "
                    "head in [0, {}), gamma > 0)",
                    count, head, gamma, m, m));
  }
  if (!descs_.empty() && static_cast<std::int64_t>(x_.size()) != n) {
    throw Error(fmt::format("LBFGS: the state is for {} parameter values, this optimiser has {}", n,
                            x_.size()));
  }
  const auto size = static_cast<std::size_t>(n);
  for (auto* buffer : {&x_, &g_, &x_trial_, &g_trial_, &d_}) buffer->assign(size, 0.0);
  const auto copy = [](const Tensor& tensor, std::vector<double>& into) {
    const std::span<const double> values = tensor.span<double>();
    into.assign(values.begin(), values.end());
  };
  copy(*found_s->second, s_history_);
  copy(y, y_history_);
  copy(rho, rho_);
  alpha_.assign(static_cast<std::size_t>(m), 0.0);
  history_count_ = static_cast<int>(count);
  history_head_ = static_cast<int>(head);
  gamma_ = gamma;
  iterations_ = iterations;
  evaluations_ = evaluations;
}

// x_trial ← x + t d; evaluates there (g_trial ← ∇f) and returns f; `slope` ← g_trialᵀd.
double LBFGS::evaluate_at(std::span<Tensor> params, const Closure& closure, double t,
                          double& slope) {
  for (std::size_t j = 0; j < x_.size(); ++j) x_trial_[j] = x_[j] + t * d_[j];
  write_params(params, x_trial_);
  const double value = evaluate(params, closure, g_trial_);
  slope = dot(d_, g_trial_.data());
  return value;
}

// Backtracking on the Armijo (sufficient decrease) condition: t ← t·factor until
// f(x + t d) <= f(x) + c1 t gᵀd. On success x_trial/g_trial hold the accepted point.
bool LBFGS::backtrack(std::span<Tensor> params, const Closure& closure, double loss, double slope,
                      double& t, double& trial_loss) {
  for (int k = 0; k < options_.max_line_search_steps; ++k) {
    double trial_slope = 0;
    trial_loss = evaluate_at(params, closure, t, trial_slope);
    if (std::isfinite(trial_loss) && trial_loss <= loss + options_.armijo_c1 * t * slope) {
      return true;
    }
    t *= options_.backtrack_factor;
  }
  return false;
}

namespace {

// Minimiser of the cubic through (a, fa, da) and (b, fb, db), kept inside the middle 80% of
// [a, b]; bisection when the cubic has no usable minimiser (Nocedal & Wright, eq. 3.59).
double cubic_step(double a, double fa, double da, double b, double fb, double db) {
  const double low = std::min(a, b), high = std::max(a, b), margin = 0.1 * (high - low);
  const double d1 = da + db - 3 * (fa - fb) / (a - b);
  const double radicand = d1 * d1 - da * db;
  if (radicand >= 0 && std::isfinite(radicand)) {
    const double d2 = std::copysign(std::sqrt(radicand), b - a);
    const double t = b - (b - a) * (db + d2 - d1) / (db - da + 2 * d2);
    if (std::isfinite(t) && t >= low + margin && t <= high - margin) return t;
  }
  return 0.5 * (a + b);
}

}  // namespace

// Strong-Wolfe line search (Nocedal & Wright, algorithms 3.5 and 3.6): finds t with
//   f(x + t d) <= f(x) + c1 t gᵀd   and   |∇f(x + t d)ᵀd| <= c2 |gᵀd|,
// doubling t while the slope stays negative, then zooming into the bracket by safeguarded cubic
// interpolation. On success x_trial/g_trial hold the accepted point.
bool LBFGS::strong_wolfe(std::span<Tensor> params, const Closure& closure, double loss,
                         double slope, double& t, double& trial_loss) {
  const double c1 = options_.armijo_c1, c2 = options_.wolfe_c2;
  const auto sufficient = [&](double step, double value) {
    return std::isfinite(value) && value <= loss + c1 * step * slope;
  };
  int budget = options_.max_line_search_steps;
  double previous_t = 0, previous_loss = loss, previous_slope = slope;
  double low = 0, low_loss = 0, low_slope = 0, high = 0, high_loss = 0, high_slope = 0;
  bool bracketed = false;
  while (budget-- > 0) {
    double trial_slope = 0;
    trial_loss = evaluate_at(params, closure, t, trial_slope);
    if (!sufficient(t, trial_loss) || (previous_t > 0 && trial_loss >= previous_loss)) {
      low = previous_t, low_loss = previous_loss, low_slope = previous_slope;
      high = t, high_loss = trial_loss, high_slope = trial_slope;
      bracketed = true;
      break;
    }
    if (std::abs(trial_slope) <= -c2 * slope) return true;
    if (trial_slope >= 0) {
      low = t, low_loss = trial_loss, low_slope = trial_slope;
      high = previous_t, high_loss = previous_loss, high_slope = previous_slope;
      bracketed = true;
      break;
    }
    previous_t = t, previous_loss = trial_loss, previous_slope = trial_slope;
    t *= 2;
  }
  if (bracketed) {
    while (budget-- > 0) {
      // A non-finite end of the bracket has no usable slope: bisect.
      t = std::isfinite(high_loss) && std::isfinite(high_slope)
              ? cubic_step(low, low_loss, low_slope, high, high_loss, high_slope)
              : 0.5 * (low + high);
      double trial_slope = 0;
      trial_loss = evaluate_at(params, closure, t, trial_slope);
      if (!sufficient(t, trial_loss) || trial_loss >= low_loss) {
        high = t, high_loss = trial_loss, high_slope = trial_slope;
      } else {
        if (std::abs(trial_slope) <= -c2 * slope) return true;
        if (trial_slope * (high - low) >= 0) {
          high = low, high_loss = low_loss, high_slope = low_slope;
        }
        low = t, low_loss = trial_loss, low_slope = trial_slope;
      }
    }
  }
  // Out of evaluations: settle for the best point that decreases f enough, if any.
  if (low > 0 || previous_t > 0) {
    t = low > 0 ? low : previous_t;
    double trial_slope = 0;
    trial_loss = evaluate_at(params, closure, t, trial_slope);
    return sufficient(t, trial_loss);
  }
  return false;
}

double LBFGS::step(std::span<Tensor> params, const Closure& closure) {
  if (!closure) throw Error("LBFGS: step() needs a closure that computes the loss and gradients");
  for (std::size_t i = 0; i < params.size(); ++i) {
    if (!is_floating(params[i].dtype())) {
      throw Error(
          fmt::format("LBFGS: parameter {} is {}; only f32 and f64 parameters can be trained", i,
                      params[i].desc()));
    }
  }
  if (descs_.empty()) {
    std::size_t n = 0;
    for (const Tensor& param : params) {
      descs_.push_back(param.desc());
      grads_.emplace_back(param.desc());
      n += static_cast<std::size_t>(param.numel());
    }
    if (x_.size() != n || history_count_ == 0) {
      // No history loaded by load_state() for parameters of this size: start afresh.
      const auto m = static_cast<std::size_t>(options_.history_size);
      for (auto* buffer : {&x_, &g_, &x_trial_, &g_trial_, &d_}) buffer->assign(n, 0.0);
      s_history_.assign(m * n, 0.0);
      y_history_.assign(m * n, 0.0);
      rho_.assign(m, 0.0);
      alpha_.assign(m, 0.0);
      reset();
    }
  } else {
    if (params.size() != descs_.size()) {
      throw Error(
          fmt::format("LBFGS: created for {} parameters, got {}", descs_.size(), params.size()));
    }
    for (std::size_t i = 0; i < params.size(); ++i) {
      if (params[i].desc() != descs_[i]) {
        throw Error(fmt::format("LBFGS: parameter {} is {} but the optimiser was created for {}", i,
                                params[i].desc(), descs_[i]));
      }
    }
  }
  // x ← the current parameters.
  {
    std::size_t offset = 0;
    for (const Tensor& param : params) {
      visit_floating(param.dtype(), [&](auto zero) {
        using T = decltype(zero);
        const T* src = param.data<T>();
        for (std::int64_t k = 0; k < param.numel(); ++k) {
          x_[offset + static_cast<std::size_t>(k)] = static_cast<double>(src[k]);
        }
      });
      offset += static_cast<std::size_t>(param.numel());
    }
  }
  double loss = evaluate(params, closure, g_);
  if (!std::isfinite(loss)) {
    throw Error(
        fmt::format("LBFGS: the closure returned a non-finite loss ({}) at the starting "
                    "point",
                    loss));
  }
  const std::size_t n = x_.size();
  const int m = options_.history_size;
  for (int iteration = 0; iteration < options_.max_iterations; ++iteration) {
    if (max_abs(g_) <= options_.tolerance_grad) break;
    ++iterations_;
    two_loop(g_, d_);
    double slope = dot(d_, g_.data());
    double t = options_.learning_rate;
    if (history_count_ == 0 || !(slope < 0)) {
      // Steepest descent, with a first step no longer than η in the ℓ1 sense.
      reset();
      double l1 = 0;
      for (std::size_t k = 0; k < n; ++k) {
        d_[k] = -g_[k];
        l1 += std::abs(g_[k]);
      }
      slope = -dot(g_, g_.data());
      t = options_.learning_rate * std::min(1.0, 1.0 / l1);
    }
    double trial_loss = loss;
    const bool accepted = options_.line_search == LineSearch::strong_wolfe
                              ? strong_wolfe(params, closure, loss, slope, t, trial_loss)
                              : backtrack(params, closure, loss, slope, t, trial_loss);
    if (!accepted) {
      write_params(params, x_);  // stay at the best point found
      break;
    }
    // Curvature pair s = x_trial − x, y = g_trial − g, stored only when sᵀy > 0 (a full ring's
    // oldest pair must survive a rejected one).
    double sy = 0, yy = 0, step_size = 0;
    for (std::size_t j = 0; j < n; ++j) {
      const double s = x_trial_[j] - x_[j];
      const double y = g_trial_[j] - g_[j];
      sy += s * y;
      yy += y * y;
      step_size = std::max(step_size, std::abs(s));
    }
    if (sy > 1e-10) {
      double* s = &s_history_[static_cast<std::size_t>(history_head_) * n];
      double* y = &y_history_[static_cast<std::size_t>(history_head_) * n];
      for (std::size_t j = 0; j < n; ++j) {
        s[j] = x_trial_[j] - x_[j];
        y[j] = g_trial_[j] - g_[j];
      }
      rho_[history_head_] = 1.0 / sy;
      gamma_ = sy / yy;
      history_head_ = (history_head_ + 1) % m;
      history_count_ = std::min(history_count_ + 1, m);
    }
    std::swap(x_, x_trial_);
    std::swap(g_, g_trial_);
    const double change = std::abs(trial_loss - loss);
    loss = trial_loss;
    if (change < options_.tolerance_change || step_size < options_.tolerance_change) break;
  }
  return loss;
}

}  // namespace dagrad
