// add, sub, mul, div (NumPy broadcasting), neg, exp, log, sigmoid, tanh, relu, positive_mask.
// Kernels: oneDNN binary and eltwise primitives for f32; plain loops for the reference.
#include "ops/elementwise.hpp"

#include <omp.h>

#include <cmath>

#include "ops/common.hpp"
#include "ops/reduction.hpp"
#include "ops/shape.hpp"
#include "runtime/primitive_kernel.hpp"

namespace dagrad {

namespace {

// ---- binary ops ---------------------------------------------------------------------------

std::vector<Sample> binary_samples(double low_b = -1.0, double high_b = 1.0) {
  return {
      Sample{"same shape", {spec({3, 4}), spec({3, 4}, low_b, high_b)}},
      Sample{"row broadcast", {spec({3, 4}), spec({4}, low_b, high_b)}},
      Sample{"column broadcast", {spec({3, 1}), spec({3, 4}, low_b, high_b)}},
      Sample{"both broadcast", {spec({2, 1, 4}), spec({3, 1}, low_b, high_b)}},
      Sample{"scalar", {spec({2, 3}), spec({}, low_b, high_b)}},
  };
}

std::vector<ErrorSample> binary_errors() {
  return {
      ErrorSample{"incompatible shapes", {spec({3, 4}), spec({5})}, {}, "cannot broadcast"},
      ErrorSample{"integer input",
                  {InputSpec{{2}, DType::i32}, InputSpec{{2}, DType::i32}},
                  {},
                  "must be f32 or f64"},
  };
}

void register_binary(OpRegistry& registry, std::string name, std::string formula,
                     dnnl::algorithm algorithm, SwappedBinary swapped, auto op, BackwardFn backward,
                     std::vector<Sample> samples) {
  OpDef def;
  def.name = std::move(name);
  def.formula = std::move(formula);
  def.min_inputs = def.max_inputs = 2;
  def.shape = broadcast_rule;
  def.backward = std::move(backward);
  def.second_order = true;
  def.reference = binary_reference(op);
  def.onednn = binary_onednn(algorithm, swapped);
  def.in_place = true;  // oneDNN binary writes dst over src0; the reference reads before writing
  def.samples = [samples] { return samples; };
  def.error_samples = binary_errors;
  registry.add(std::move(def));
}

// ---- unary ops ----------------------------------------------------------------------------

struct UnarySpec {
  std::string name;
  std::string formula;
  std::optional<dnnl::algorithm> algorithm;
  float alpha = 0.f;
  float beta = 0.f;
  BackwardFn backward;
  std::string no_gradient;
  bool second_order = true;
  double low = -2.0, high = 2.0, min_magnitude = 0.0;
};

template <class Op>
void register_unary(OpRegistry& registry, UnarySpec u, Op op) {
  OpDef def;
  def.name = u.name;
  def.formula = u.formula;
  def.shape = same_as_input;
  def.backward = u.backward;
  def.no_gradient = u.no_gradient;
  def.second_order = u.second_order;
  def.reference = unary_reference([op](auto x, const Attrs&) { return op(x); });
  if (u.algorithm) def.onednn = eltwise_onednn(*u.algorithm, constant_params(u.alpha, u.beta));
  def.in_place = true;
  InputSpec a = spec({3, 5}, u.low, u.high);
  a.min_magnitude = u.min_magnitude;
  InputSpec b = spec({2, 3, 2}, u.low, u.high);
  b.min_magnitude = u.min_magnitude;
  InputSpec c = spec({}, u.low, u.high);
  c.min_magnitude = u.min_magnitude;
  def.samples = [a, b, c] {
    return std::vector<Sample>{{"matrix", {a}}, {"rank 3", {b}}, {"scalar", {c}}};
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{
        {"integer input", {InputSpec{{2}, DType::i32}}, {}, "must be f32 or f64"}};
  };
  registry.add(std::move(def));
}

Value binary(std::string_view op, const Value& a, const Value& b, Where where) {
  if (!a.valid() || !b.valid()) throw GraphError(fmt::format("{}: an input is an empty Value", op));
  return a.graph().apply(op, {a, b}, {}, where);
}

Value unary(std::string_view op, const Value& x, Where where) {
  if (!x.valid()) throw GraphError(fmt::format("{}: the input is an empty Value", op));
  return x.graph().apply(op, {x}, {}, where);
}

}  // namespace

Value add(const Value& a, const Value& b, Where where) {
  return binary("add", a, b, where);
}
Value sub(const Value& a, const Value& b, Where where) {
  return binary("sub", a, b, where);
}
Value mul(const Value& a, const Value& b, Where where) {
  return binary("mul", a, b, where);
}
Value div(const Value& a, const Value& b, Where where) {
  return binary("div", a, b, where);
}
Value neg(const Value& x, Where where) {
  return unary("neg", x, where);
}
Value exp(const Value& x, Where where) {
  return unary("exp", x, where);
}
Value log(const Value& x, Where where) {
  return unary("log", x, where);
}
Value sigmoid(const Value& x, Where where) {
  return unary("sigmoid", x, where);
}
Value tanh(const Value& x, Where where) {
  return unary("tanh", x, where);
}
Value relu(const Value& x, Where where) {
  return unary("relu", x, where);
}
Value relu_grad(const Value& dy, const Value& x, Where where) {
  return binary("relu_grad", dy, x, where);
}

Value scalar_like(const Value& x, double value) {
  return x.graph().scalar(value, x.dtype());
}

Value operator+(const Value& a, const Value& b) {
  return add(a, b);
}
Value operator-(const Value& a, const Value& b) {
  return sub(a, b);
}
Value operator*(const Value& a, const Value& b) {
  return mul(a, b);
}
Value operator/(const Value& a, const Value& b) {
  return div(a, b);
}
Value operator-(const Value& x) {
  return neg(x);
}
Value operator+(const Value& a, double b) {
  return add(a, scalar_like(a, b));
}
Value operator-(const Value& a, double b) {
  return sub(a, scalar_like(a, b));
}
Value operator*(const Value& a, double b) {
  return mul(a, scalar_like(a, b));
}
Value operator/(const Value& a, double b) {
  return div(a, scalar_like(a, b));
}
Value operator+(double a, const Value& b) {
  return add(scalar_like(b, a), b);
}
Value operator-(double a, const Value& b) {
  return sub(scalar_like(b, a), b);
}
Value operator*(double a, const Value& b) {
  return mul(scalar_like(b, a), b);
}
Value operator/(double a, const Value& b) {
  return div(scalar_like(b, a), b);
}

namespace {
// relu_grad's fast kernel (f32) is dagrad's own loop, not oneDNN's eltwise_backward: one pass
// reading dy and x, as fast, without a primitive's execute (a few µs and 4-5 heap allocations
// per call: the MLP step has two). It keeps the reference's rule for NaN (x NaN gives 0, where
// oneDNN's 0·dy can give NaN). Split across the threads from 32k elements (MLP step, 2 threads:
// 128 × 256 in 7–15 µs against 14–19 on one thread; 128 × 128 in 3–6 µs on one, 4–6 on two).
class ReluGradKernel final : public Kernel {
 public:
  explicit ReluGradKernel(std::int64_t n) : n_(n) {}
  // Inputs dy, x; output dx (may be dy's buffer: each element is read before it is written).
  void run(const KernelCall& call) override {
    const float* dy = call.inputs[0].data<float>();
    const float* x = call.inputs[1].data<float>();
    float* dx = call.outputs[0].data<float>();
    if (n_ < 32 * 1024 || omp_get_max_threads() == 1) {
      mask(dy, x, dx, 0, n_);
      return;
    }
#pragma omp parallel
    {
      const std::int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
      mask(dy, x, dx, n_ * t / threads, n_ * (t + 1) / threads);
    }
  }

 private:
  static void mask(const float* dy, const float* x, float* dx, std::int64_t first,
                   std::int64_t last) {
#pragma omp simd
    for (std::int64_t i = first; i < last; ++i) {
      const float d = dy[i];  // loaded unconditionally: the select vectorises, no branch
      dx[i] = x[i] > 0.f ? d : 0.f;
    }
  }

  std::int64_t n_;
};

// relu's backward as one op (one pass instead of a mask and a multiply). Its gradient:
// d/d(dy) = relu_grad(g, x); d/dx = 0 almost everywhere.
void register_relu_grad(OpRegistry& registry) {
  OpDef def;
  def.name = "relu_grad";
  def.formula = "dx = dy if x > 0 else 0 (relu's backward)";
  def.min_inputs = def.max_inputs = 2;
  def.shape = activation_grad_rule;
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    return {relu_grad(c.grad(), c.inputs[1]), std::nullopt};
  };
  def.second_order = true;
  def.reference = binary_reference([](auto dy, auto x) { return x > 0 ? dy : decltype(dy)(0); });
  def.in_place = true;  // dx may be written over dy
  def.onednn = [](const KernelBuild& build) -> std::unique_ptr<Kernel> {
    if (build.inputs[0].dtype != DType::f32 || build.inputs[0].numel() == 0) return nullptr;
    return std::make_unique<ReluGradKernel>(build.inputs[0].numel());
  };
  def.samples = [] {
    InputSpec x = spec({4, 5});
    x.min_magnitude = 0.1;
    return std::vector<Sample>{{"matrix", {spec({4, 5}), x}}};
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{
        {"shapes differ", {spec({4, 5}), spec({5, 4})}, {}, "must have the same shape"}};
  };
  registry.add(std::move(def));
}
}  // namespace

void register_elementwise_ops(OpRegistry& registry) {
  using A = dnnl::algorithm;
  // add is the distributor: the same gradient to both inputs (summed over broadcast axes).
  register_binary(
      registry, "add", "y = a + b", A::binary_add, {A::binary_add},
      [](auto a, auto b) { return a + b; },
      [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
        Value g = c.grad();
        return {unbroadcast(g, c.inputs[0].shape()), unbroadcast(g, c.inputs[1].shape())};
      },
      binary_samples());
  register_binary(
      registry, "sub", "y = a - b", A::binary_sub, {A::binary_sub, /*negate=*/true},
      [](auto a, auto b) { return a - b; },
      [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
        Value g = c.grad();
        std::optional<Value> db;
        if (c.needs[1]) db = unbroadcast(neg(g), c.inputs[1].shape());
        return {unbroadcast(g, c.inputs[0].shape()), db};
      },
      binary_samples());
  // mul is the switch: each input's gradient is the gradient times the other input.
  register_binary(
      registry, "mul", "y = a * b", A::binary_mul, {A::binary_mul},
      [](auto a, auto b) { return a * b; },
      [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
        Value g = c.grad();
        std::optional<Value> da, db;
        if (c.needs[0]) da = unbroadcast(mul(g, c.inputs[1]), c.inputs[0].shape());
        if (c.needs[1]) db = unbroadcast(mul(g, c.inputs[0]), c.inputs[1].shape());
        return {da, db};
      },
      binary_samples());
  register_binary(
      registry, "div", "y = a / b", A::binary_div, {}, [](auto a, auto b) { return a / b; },
      [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
        Value g = c.grad();
        std::optional<Value> da, db;
        if (c.needs[0]) da = unbroadcast(div(g, c.inputs[1]), c.inputs[0].shape());
        // d(a/b)/db = -a/b² = -y/b
        if (c.needs[1])
          db = unbroadcast(neg(div(mul(g, c.outputs[0]), c.inputs[1])), c.inputs[1].shape());
        return {da, db};
      },
      binary_samples(0.5, 2.0));

  register_unary(registry,
                 {.name = "neg",
                  .formula = "y = -x",
                  .algorithm = A::eltwise_linear,
                  .alpha = -1.f,
                  .backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
                    return {neg(c.grad())};
                  }},
                 [](auto x) { return -x; });
  register_unary(registry,
                 {.name = "exp",
                  .formula = "y = e^x",
                  .algorithm = A::eltwise_exp,
                  .backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
                    return {mul(c.grad(), c.outputs[0])};  // saves the output: dy/dx = y
                  }},
                 [](auto x) { return std::exp(x); });
  register_unary(registry,
                 {.name = "log",
                  .formula = "y = ln x (x > 0)",
                  .algorithm = A::eltwise_log,
                  .backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
                    return {div(c.grad(), c.inputs[0])};
                  },
                  .low = 0.2,
                  .high = 3.0},
                 [](auto x) { return std::log(x); });
  register_unary(registry,
                 {.name = "sigmoid",
                  .formula = "y = 1 / (1 + e^-x)",
                  .algorithm = A::eltwise_logistic,
                  .backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
                    const Value& y = c.outputs[0];  // dy/dx = y (1 - y)
                    return {mul(c.grad(), mul(y, 1.0 - y))};
                  }},
                 [](auto x) { return decltype(x)(1) / (decltype(x)(1) + std::exp(-x)); });
  register_unary(registry,
                 {.name = "tanh",
                  .formula = "y = tanh x",
                  .algorithm = A::eltwise_tanh,
                  .backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
                    const Value& y = c.outputs[0];  // dy/dx = 1 - y²
                    return {mul(c.grad(), 1.0 - mul(y, y))};
                  }},
                 [](auto x) { return std::tanh(x); });
  register_unary(registry,
                 {.name = "relu",
                  .formula = "y = max(x, 0); dy/dx = 1 if x > 0 else 0 (0 at the kink)",
                  .algorithm = A::eltwise_relu,
                  .backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
                    // The mask is taken from the output (y > 0 exactly where x > 0), so the
                    // pre-activation is not kept alive and matmul + bias + relu can fuse.
                    return {relu_grad(c.grad(), c.outputs[0])};
                  },
                  .min_magnitude = 0.1},
                 [](auto x) { return x > 0 ? x : decltype(x)(0); });
  register_relu_grad(registry);
}

}  // namespace dagrad
