// abs, sign, square, clip and clip_grad. Kernels: oneDNN eltwise (abs, square, clip) and
// eltwise_backward (clip_grad) for f32; plain loops for the reference.
#include "ops/math.hpp"

#include <cmath>

#include "ops/common.hpp"
#include "ops/elementwise.hpp"
#include "ops/shape.hpp"
#include "runtime/primitive_kernel.hpp"

namespace dagrad {

namespace {

std::vector<TensorDesc> same_as_input(const ShapeCall& call) {
  require_floating(call, 0);
  return {call.inputs[0]};
}

// clip's bounds, checked (low <= high, both finite) by the shape rule.
void check_bounds(const ShapeCall& call) {
  const double low = call.attrs.real("low");
  const double high = call.attrs.real("high");
  if (!(low <= high)) call.fail("low {} must not exceed high {}", low, high);
}

std::vector<ErrorSample> integer_input_error() {
  return {{"integer input", {InputSpec{{2}, DType::i32}}, {}, "must be f32 or f64"}};
}

InputSpec away_from_zero(Shape shape, double low, double high, double min_magnitude) {
  InputSpec input = spec(std::move(shape), low, high);
  input.min_magnitude = min_magnitude;
  return input;
}

void register_abs(OpRegistry& registry) {
  OpDef def;
  def.name = "abs";
  def.formula = "y = |x|; dy/dx = sign(x) (the subgradient 0 at x = 0)";
  def.shape = same_as_input;
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    return {mul(c.grad(), sign(c.inputs[0]))};
  };
  def.second_order = true;
  def.reference = unary_reference([](auto x, const Attrs&) { return std::abs(x); });
  def.onednn = eltwise_onednn(dnnl::algorithm::eltwise_abs);
  def.samples = [] {
    return std::vector<Sample>{{"matrix", {away_from_zero({3, 5}, -2, 2, 0.1)}},
                               {"rank 3", {away_from_zero({2, 3, 2}, -2, 2, 0.1)}},
                               {"scalar", {away_from_zero({}, -2, 2, 0.1)}}};
  };
  def.error_samples = integer_input_error;
  registry.add(std::move(def));
}

void register_sign(OpRegistry& registry) {
  OpDef def;
  def.name = "sign";
  def.formula = "y = 1 if x > 0, -1 if x < 0, 0 at 0; dy/dx = 0 (almost everywhere, and at 0)";
  def.shape = same_as_input;
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    return {filled_like(c.inputs[0], 0.0)};
  };
  def.second_order = true;
  def.reference = unary_reference([](auto x, const Attrs&) {
    using T = decltype(x);
    return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0));
  });
  def.samples = [] {
    return std::vector<Sample>{{"matrix", {away_from_zero({3, 4}, -2, 2, 0.1)}}};
  };
  def.error_samples = integer_input_error;
  registry.add(std::move(def));
}

void register_square(OpRegistry& registry) {
  OpDef def;
  def.name = "square";
  def.formula = "y = x²; dy/dx = 2x";
  def.shape = same_as_input;
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    return {mul(c.grad(), c.inputs[0] * 2.0)};
  };
  def.second_order = true;
  def.reference = unary_reference([](auto x, const Attrs&) { return x * x; });
  def.onednn = eltwise_onednn(dnnl::algorithm::eltwise_square);
  def.samples = [] {
    return std::vector<Sample>{{"matrix", {spec({3, 5}, -2, 2)}},
                               {"rank 3", {spec({2, 3, 2}, -2, 2)}},
                               {"scalar", {spec({}, -2, 2)}}};
  };
  def.error_samples = integer_input_error;
  registry.add(std::move(def));
}

template <class T>
T clip_value(T x, const Attrs& attrs) {
  const T low = static_cast<T>(attrs.real("low"));
  const T high = static_cast<T>(attrs.real("high"));
  return x < low ? low : (x > high ? high : x);
}

void register_clip(OpRegistry& registry) {
  OpDef def;
  def.name = "clip";
  def.formula = "y = min(max(x, low), high); dy/dx = 1 if low < x < high else 0";
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    require_floating(call, 0);
    check_bounds(call);
    return {call.inputs[0]};
  };
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    return {clip_grad(c.grad(), c.inputs[0], c.attrs().real("low"), c.attrs().real("high"))};
  };
  def.second_order = true;
  def.reference = unary_reference([](auto x, const Attrs& attrs) { return clip_value(x, attrs); });
  def.onednn = eltwise_onednn(dnnl::algorithm::eltwise_clip_v2, attribute_params("low", "high"));
  def.samples = [] {
    // Values on both sides of the bounds, none within 0.1 of them.
    std::vector<double> values{-2.0, -0.9, -0.3, 0.0, 0.25, 0.4, 0.8, 1.7, -0.65, 3.0};
    InputSpec fixed{{2, 5}, {}, -1, 1, 0, true, values};
    return std::vector<Sample>{
        {"both sides of the bounds", {fixed}, {{"low", -0.5}, {"high", 0.5}}},
        {"all inside", {spec({3, 4}, -0.9, 0.9)}, {{"low", -1.0}, {"high", 1.0}}},
        {"probability clamp", {spec({4}, 0.1, 0.9)}, {{"low", 1e-7}, {"high", 1.0}}}};
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{
        {"integer input",
         {InputSpec{{2}, DType::i32}},
         {{"low", 0.0}, {"high", 1.0}},
         "must be f32 or f64"},
        {"low above high", {spec({2})}, {{"low", 1.0}, {"high", -1.0}}, "must not exceed high"}};
  };
  registry.add(std::move(def));
}

void register_clip_grad(OpRegistry& registry) {
  OpDef def;
  def.name = "clip_grad";
  def.formula = "dx = dy if low < x < high else 0 (clip's backward)";
  def.min_inputs = def.max_inputs = 2;
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    require_floating(call, 0);
    require_same_dtype(call);
    check_bounds(call);
    if (call.inputs[0].shape != call.inputs[1].shape) {
      call.fail("dy {} and x {} must have the same shape", call.inputs[0], call.inputs[1]);
    }
    return {call.inputs[0]};
  };
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    std::optional<Value> ddy;
    if (c.needs[0]) {
      ddy = clip_grad(c.grad(), c.inputs[1], c.attrs().real("low"), c.attrs().real("high"));
    }
    return {ddy, std::nullopt};  // piecewise constant in x: gradient 0
  };
  def.second_order = true;
  def.reference = [](const KernelCall& call) {
    dispatch_floating(call.inputs[0].dtype(), [&](auto zero) {
      using T = decltype(zero);
      const T* diff_dst = call.inputs[0].data<T>();
      const T* src = call.inputs[1].data<T>();
      T* diff_src = call.outputs[0].data<T>();
      const double low = call.attrs().real("low");
      const double high = call.attrs().real("high");
      for (std::int64_t i = 0; i < call.inputs[0].numel(); ++i) {
        const double x = static_cast<double>(src[i]);
        diff_src[i] = (low < x && x < high) ? diff_dst[i] : T(0);
      }
    });
  };
  // eltwise_clip_v2's backward passes dd exactly where alpha < s < beta, as clip_grad does.
  def.onednn = [](const KernelBuild& build) -> std::unique_ptr<Kernel> {
    if (build.inputs[0].dtype != DType::f32 || build.inputs[0].numel() == 0) return nullptr;
    const auto low = static_cast<float>(build.node.attrs.real("low"));
    const auto high = static_cast<float>(build.node.attrs.real("high"));
    auto md = plain_md(build.inputs[0]);
    dnnl::eltwise_forward::primitive_desc hint(
        dnnl::eltwise_forward::desc(dnnl::prop_kind::forward_training,
                                    dnnl::algorithm::eltwise_clip_v2, md, low, high),
        build.engine);
    dnnl::eltwise_backward::primitive_desc pd(
        dnnl::eltwise_backward::desc(dnnl::algorithm::eltwise_clip_v2, md, md, low, high),
        build.engine, hint);
    return std::make_unique<PrimitiveKernel>(
        dnnl::eltwise_backward(pd),
        std::vector<PrimitiveArg>{input_arg(DNNL_ARG_DIFF_DST, 0, md),
                                  input_arg(DNNL_ARG_SRC, 1, md),
                                  output_arg(DNNL_ARG_DIFF_SRC, 0, md)});
  };
  def.samples = [] {
    std::vector<double> values{-2.0, -0.9, -0.3, 0.0, 0.25, 0.4, 0.8, 1.7};
    return std::vector<Sample>{{"both sides of the bounds",
                                {spec({2, 4}), InputSpec{{2, 4}, {}, -1, 1, 0, true, values}},
                                {{"low", -0.5}, {"high", 0.5}}}};
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{{"shapes differ",
                                     {spec({4, 5}), spec({5, 4})},
                                     {{"low", 0.0}, {"high", 1.0}},
                                     "must have the same shape"}};
  };
  registry.add(std::move(def));
}

Value unary(std::string_view op, const Value& x, Attrs attrs, std::source_location where) {
  if (!x.valid()) throw GraphError(fmt::format("{}: the input is an empty Value", op));
  return x.graph().apply(op, {x}, std::move(attrs), where);
}

}  // namespace

Value abs(const Value& x, std::source_location where) {
  return unary("abs", x, {}, where);
}
Value sign(const Value& x, std::source_location where) {
  return unary("sign", x, {}, where);
}
Value square(const Value& x, std::source_location where) {
  return unary("square", x, {}, where);
}
Value clip(const Value& x, double low, double high, std::source_location where) {
  return unary("clip", x, {{"low", low}, {"high", high}}, where);
}
Value clip_grad(const Value& dy, const Value& x, double low, double high,
                std::source_location where) {
  if (!dy.valid() || !x.valid()) throw GraphError("clip_grad: an input is an empty Value");
  return dy.graph().apply("clip_grad", {dy, x}, {{"low", low}, {"high", high}}, where);
}

void register_math_ops(OpRegistry& registry) {
  register_abs(registry);
  register_sign(registry);
  register_square(registry);
  register_clip(registry);
  register_clip_grad(registry);
}

}  // namespace dagrad
