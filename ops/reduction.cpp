// sum and mean over all axes or given axes (keepdims optional).
#include "ops/reduction.hpp"

#include <algorithm>

#include "ops/common.hpp"
#include "ops/elementwise.hpp"
#include "ops/shape.hpp"
#include "runtime/primitive_kernel.hpp"

namespace dagrad {

namespace {

// Sorted, unique, non-negative axes; an empty list means all axes.
std::vector<std::int64_t> normalized_axes(const ShapeCall& call, int rank) {
  std::vector<std::int64_t> axes;
  for (auto axis : call.attrs.integers("axes")) axes.push_back(normalize_axis(axis, rank, call.site));
  if (call.attrs.integers("axes").empty()) {
    for (int i = 0; i < rank; ++i) axes.push_back(i);
  }
  std::sort(axes.begin(), axes.end());
  if (std::adjacent_find(axes.begin(), axes.end()) != axes.end()) {
    call.fail("axis listed twice in {}", Shape(call.attrs.integers("axes")));
  }
  return axes;
}

std::vector<std::int64_t> kept_dims(const Shape& in, const std::vector<std::int64_t>& axes) {
  std::vector<std::int64_t> dims = in.dims();
  for (auto axis : axes) dims[static_cast<std::size_t>(axis)] = 1;
  return dims;
}

std::vector<TensorDesc> reduce_rule(const ShapeCall& call) {
  require_floating(call, 0);
  const auto& in = call.inputs[0];
  auto axes = normalized_axes(call, in.shape.rank());
  if (call.attrs.boolean("keepdims")) return {TensorDesc{in.dtype, Shape(kept_dims(in.shape, axes))}};
  std::vector<std::int64_t> dims;
  for (int i = 0; i < in.shape.rank(); ++i) {
    if (!std::binary_search(axes.begin(), axes.end(), i)) dims.push_back(in.shape[i]);
  }
  return {TensorDesc{in.dtype, Shape(dims)}};
}

// The reduced shape with the kept axes as size 1, whatever keepdims says.
Shape keepdims_shape(const Shape& in, const Attrs& attrs) {
  std::vector<std::int64_t> axes;
  for (auto axis : attrs.integers("axes")) axes.push_back(axis < 0 ? axis + in.rank() : axis);
  if (axes.empty()) {
    for (int i = 0; i < in.rank(); ++i) axes.push_back(i);
  }
  return Shape(kept_dims(in, axes));
}

ReferenceFn reduce_reference(bool average) {
  return [average](const KernelCall& call) {
    const Tensor& x = call.inputs[0];
    Tensor& y = call.outputs[0];
    Shape kept = keepdims_shape(x.shape(), call.attrs());
    dispatch_floating(x.dtype(), [&](auto zero) {
      using T = decltype(zero);
      const T* px = x.data<T>();
      T* py = y.data<T>();
      // Accumulate in double for an obviously right reference.
      std::vector<double> acc(static_cast<std::size_t>(y.numel()), 0.0);
      BroadcastIndex index(x.shape(), broadcast_strides(kept, x.shape()));
      for (std::int64_t i = 0; i < x.numel(); ++i, index.next()) {
        acc[static_cast<std::size_t>(index.offset())] += static_cast<double>(px[i]);
      }
      const double count = y.numel() == 0 ? 1.0 : static_cast<double>(x.numel()) / static_cast<double>(y.numel());
      for (std::int64_t i = 0; i < y.numel(); ++i) {
        py[i] = static_cast<T>(average ? acc[static_cast<std::size_t>(i)] / count : acc[static_cast<std::size_t>(i)]);
      }
    });
  };
}

KernelFactory reduce_onednn(dnnl::algorithm algorithm) {
  return [algorithm](const KernelBuild& build) -> std::unique_ptr<Kernel> {
    const Shape& in = build.inputs[0].shape;
    if (in.rank() == 0) return nullptr;
    Shape kept = keepdims_shape(in, build.node.attrs);
    if (kept == in) return nullptr;  // nothing reduced: a copy, done by the reference
    auto src_md = plain_md(build.inputs[0]);
    auto dst_md = plain_md(kept, build.outputs[0].dtype);
    dnnl::reduction::primitive_desc pd(dnnl::reduction::desc(algorithm, src_md, dst_md, 0.f, 0.f),
                                       build.engine);
    return std::make_unique<PrimitiveKernel>(
        dnnl::reduction(pd), std::vector<PrimitiveArg>{input_arg(DNNL_ARG_SRC, 0, src_md),
                                                       output_arg(DNNL_ARG_DST, 0, dst_md)});
  };
}

std::vector<Sample> reduce_samples() {
  using Axes = std::vector<std::int64_t>;
  return {
      {"all axes", {spec({3, 4})}, {{"axes", Axes{}}, {"keepdims", false}}},
      {"axis 0", {spec({3, 4})}, {{"axes", Axes{0}}, {"keepdims", false}}},
      {"last axis kept", {spec({2, 3, 4})}, {{"axes", Axes{-1}}, {"keepdims", true}}},
      {"two axes", {spec({2, 3, 4})}, {{"axes", Axes{0, 2}}, {"keepdims", false}}},
  };
}

std::vector<ErrorSample> reduce_errors() {
  using Axes = std::vector<std::int64_t>;
  return {{"axis out of range", {spec({3, 4})}, {{"axes", Axes{2}}, {"keepdims", false}}, "out of range"},
          {"axis twice", {spec({3, 4})}, {{"axes", Axes{1, -1}}, {"keepdims", false}}, "listed twice"}};
}

// Gradient of a reduction: reshape to the kept shape, then broadcast back to the input.
// The kept shape marks its first non-reduced axis -1 so that the batch stays symbolic.
Value spread(const Value& grad, const Value& input, const Attrs& attrs) {
  const Shape& in = input.shape();
  std::vector<char> reduced(static_cast<std::size_t>(in.rank()), attrs.integers("axes").empty());
  for (auto axis : attrs.integers("axes")) reduced[static_cast<std::size_t>(axis < 0 ? axis + in.rank() : axis)] = 1;
  Shape kept = keepdims_shape(in, attrs);
  Value reshaped = grad;
  if (grad.shape() != kept) {
    for (int axis = 0; axis < kept.rank(); ++axis) {
      if (!reduced[static_cast<std::size_t>(axis)]) {
        if (kept[axis] > 0) kept[axis] = -1;
        break;
      }
    }
    reshaped = reshape(grad, kept);
  }
  return broadcast_like(reshaped, input);
}

}  // namespace

Value sum(const Value& x, std::source_location where) { return sum(x, {}, false, where); }
Value sum(const Value& x, std::vector<std::int64_t> axes, bool keepdims, std::source_location where) {
  return x.graph().apply("sum", {x}, {{"axes", std::move(axes)}, {"keepdims", keepdims}}, where);
}
Value mean(const Value& x, std::source_location where) { return mean(x, {}, false, where); }
Value mean(const Value& x, std::vector<std::int64_t> axes, bool keepdims, std::source_location where) {
  return x.graph().apply("mean", {x}, {{"axes", std::move(axes)}, {"keepdims", keepdims}}, where);
}

void register_reduction_ops(OpRegistry& registry) {
  {
    OpDef def;
    def.name = "sum";
    def.formula = "y = Σ x over axes (all when none given)";
    def.shape = reduce_rule;
    def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
      return {spread(c.grad(), c.inputs[0], c.attrs())};
    };
    def.second_order = true;
    def.reference = reduce_reference(false);
    def.onednn = reduce_onednn(dnnl::algorithm::reduction_sum);
    def.samples = reduce_samples;
    def.error_samples = reduce_errors;
    registry.add(std::move(def));
  }
  {
    OpDef def;
    def.name = "mean";
    def.formula = "y = (1/n) Σ x over axes (all when none given)";
    def.shape = reduce_rule;
    def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
      const double count = static_cast<double>(c.inputs[0].desc().numel()) /
                           static_cast<double>(std::max<std::int64_t>(c.outputs[0].desc().numel(), 1));
      return {spread(c.grad() / count, c.inputs[0], c.attrs())};
    };
    def.second_order = true;
    def.reference = reduce_reference(true);
    def.onednn = reduce_onednn(dnnl::algorithm::reduction_mean);
    def.samples = reduce_samples;
    def.error_samples = reduce_errors;
    registry.add(std::move(def));
  }
}

}  // namespace dagrad
