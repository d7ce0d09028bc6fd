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
  for (auto axis : call.attrs.integers("axes"))
    axes.push_back(normalize_axis(axis, rank, call.site));
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
  if (call.attrs.boolean("keepdims"))
    return {TensorDesc{in.dtype, Shape(kept_dims(in.shape, axes))}};
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
      const double count =
          y.numel() == 0 ? 1.0 : static_cast<double>(x.numel()) / static_cast<double>(y.numel());
      for (std::int64_t i = 0; i < y.numel(); ++i) {
        py[i] = static_cast<T>(average ? acc[static_cast<std::size_t>(i)] / count
                                       : acc[static_cast<std::size_t>(i)]);
      }
    });
  };
}

// A fast f32 kernel for the reductions training needs (bias gradients over N or N,H,W; row
// sums; totals): the input is viewed as [P, K, S] reducing P and S, or [A, B, C] reducing B,
// after merging neighbouring axes of the same kind. Plain vectorisable loops over contiguous
// memory, threaded over the kept elements. oneDNN's reduction handles every other pattern.
class BlockReduceKernel final : public Kernel {
 public:
  BlockReduceKernel(bool outer_kept, std::int64_t first, std::int64_t middle, std::int64_t last,
                    float scale)
      : outer_kept_(outer_kept), first_(first), middle_(middle), last_(last), scale_(scale) {}

  void run(const KernelCall& call) override {
    const float* x = call.inputs[0].data<float>();
    float* y = call.outputs[0].data<float>();
    if (outer_kept_) {
      // [A, B, C] reducing B.
      const std::int64_t A = first_, B = middle_, C = last_;
#pragma omp parallel for schedule(static)
      for (std::int64_t a = 0; a < A; ++a) {
        float* out = y + a * C;
        for (std::int64_t c = 0; c < C; ++c) out[c] = 0.f;
        for (std::int64_t b = 0; b < B; ++b) {
          const float* row = x + (a * B + b) * C;
#pragma omp simd
          for (std::int64_t c = 0; c < C; ++c) out[c] += row[c];
        }
        for (std::int64_t c = 0; c < C; ++c) out[c] *= scale_;
      }
      return;
    }
    // [P, K, S] reducing P and S.
    const std::int64_t P = first_, K = middle_, S = last_;
    if (S == 1) {
      constexpr std::int64_t chunk = 256;
      const std::int64_t chunks = (K + chunk - 1) / chunk;
#pragma omp parallel for schedule(static)
      for (std::int64_t block = 0; block < chunks; ++block) {
        const std::int64_t begin = block * chunk;
        const std::int64_t end = std::min(K, begin + chunk);
        float acc[chunk] = {};
        for (std::int64_t p = 0; p < P; ++p) {
          const float* row = x + p * K;
#pragma omp simd
          for (std::int64_t k = begin; k < end; ++k) acc[k - begin] += row[k];
        }
        for (std::int64_t k = begin; k < end; ++k) y[k] = acc[k - begin] * scale_;
      }
      return;
    }
#pragma omp parallel for schedule(static)
    for (std::int64_t k = 0; k < K; ++k) {
      float total = 0.f;
      for (std::int64_t p = 0; p < P; ++p) {
        const float* block = x + (p * K + k) * S;
        float partial = 0.f;
#pragma omp simd reduction(+ : partial)
        for (std::int64_t i = 0; i < S; ++i) partial += block[i];
        total += partial;
      }
      y[k] = total * scale_;
    }
  }

 private:
  bool outer_kept_;
  std::int64_t first_, middle_, last_;
  float scale_;
};

// The sum of every element (a loss, a penalty Σw²): fixed chunks reduced as vectors in
// parallel, then the chunk totals added in order, so the result does not depend on the thread
// count. (Through BlockReduceKernel's [P, 1, 1] view this was one scalar dependency chain:
// 0.32 ms for 131,072 elements.)
class TotalKernel final : public Kernel {
 public:
  TotalKernel(std::int64_t count, float scale)
      : count_(count),
        scale_(scale),
        partials_(static_cast<std::size_t>((count + chunk - 1) / chunk)) {}

  void run(const KernelCall& call) override {
    const float* x = call.inputs[0].data<float>();
    const auto chunks = static_cast<std::int64_t>(partials_.size());
#pragma omp parallel for schedule(static)
    for (std::int64_t c = 0; c < chunks; ++c) {
      const std::int64_t begin = c * chunk, end = std::min(count_, begin + chunk);
      float partial = 0.f;
#pragma omp simd reduction(+ : partial)
      for (std::int64_t i = begin; i < end; ++i) partial += x[i];
      partials_[static_cast<std::size_t>(c)] = partial;
    }
    float total = 0.f;
    for (float partial : partials_) total += partial;
    call.outputs[0].data<float>()[0] = total * scale_;
  }

 private:
  static constexpr std::int64_t chunk = 16384;
  std::int64_t count_;
  float scale_;
  std::vector<float> partials_;
};

std::unique_ptr<Kernel> block_reduce(const Shape& in, const Shape& kept, bool average) {
  // Merge axes into runs of reduced (R) and kept (K) axes, ignoring axes of size 1.
  std::vector<std::pair<bool, std::int64_t>> runs;  // reduced?, size
  for (int axis = 0; axis < in.rank(); ++axis) {
    if (in[axis] == 1) continue;
    const bool reduced = kept[axis] == 1;
    if (!runs.empty() && runs.back().first == reduced) {
      runs.back().second *= in[axis];
    } else {
      runs.emplace_back(reduced, in[axis]);
    }
  }
  const float scale =
      average ? static_cast<float>(static_cast<double>(kept.numel()) /
                                   static_cast<double>(std::max<std::int64_t>(in.numel(), 1)))
              : 1.f;
  auto size = [&](std::size_t i) { return runs[i].second; };
  if (runs.empty() || in.numel() == 0) return nullptr;
  // R | K R | R K | R K R  -> [P, K, S]
  if (runs.size() == 1 && runs[0].first) return std::make_unique<TotalKernel>(size(0), scale);
  if (runs.size() == 2 && !runs[0].first)
    return std::make_unique<BlockReduceKernel>(false, 1, size(0), size(1), scale);
  if (runs.size() == 2 && runs[0].first)
    return std::make_unique<BlockReduceKernel>(false, size(0), size(1), 1, scale);
  if (runs.size() == 3 && runs[0].first) {
    return std::make_unique<BlockReduceKernel>(false, size(0), size(1), size(2), scale);
  }
  // K R K -> [A, B, C]
  if (runs.size() == 3 && !runs[0].first) {
    return std::make_unique<BlockReduceKernel>(true, size(0), size(1), size(2), scale);
  }
  return nullptr;
}

KernelFactory reduce_onednn(dnnl::algorithm algorithm) {
  return [algorithm](const KernelBuild& build) -> std::unique_ptr<Kernel> {
    const Shape& in = build.inputs[0].shape;
    if (in.rank() == 0) return nullptr;
    Shape kept = keepdims_shape(in, build.node.attrs);
    if (kept == in) return nullptr;  // nothing reduced: a copy, done by the reference
    if (auto fast = block_reduce(in, kept, algorithm == dnnl::algorithm::reduction_mean))
      return fast;
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
      {"middle axis", {spec({2, 3, 4})}, {{"axes", Axes{1}}, {"keepdims", false}}},
      {"bias gradient N,H,W", {spec({3, 4, 5, 6})}, {{"axes", Axes{0, 2, 3}}, {"keepdims", false}}},
      {"rows of a wide matrix", {spec({5, 300})}, {{"axes", Axes{0}}, {"keepdims", true}}},
      {"alternating axes", {spec({2, 3, 2, 3, 2})}, {{"axes", Axes{0, 2, 4}}, {"keepdims", false}}},
  };
}

std::vector<ErrorSample> reduce_errors() {
  using Axes = std::vector<std::int64_t>;
  return {
      {"axis out of range",
       {spec({3, 4})},
       {{"axes", Axes{2}}, {"keepdims", false}},
       "out of range"},
      {"axis twice", {spec({3, 4})}, {{"axes", Axes{1, -1}}, {"keepdims", false}}, "listed twice"}};
}

// Gradient of a reduction: reshape to the kept shape, then broadcast back to the input.
// The kept shape marks its first non-reduced axis -1 so that the batch stays symbolic.
Value spread(const Value& grad, const Value& input, const Attrs& attrs) {
  const Shape& in = input.shape();
  std::vector<char> reduced(static_cast<std::size_t>(in.rank()), attrs.integers("axes").empty());
  for (auto axis : attrs.integers("axes"))
    reduced[static_cast<std::size_t>(axis < 0 ? axis + in.rank() : axis)] = 1;
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

void register_count_ratio(OpRegistry& registry) {
  OpDef def;
  def.name = "count_ratio";
  def.formula = "y = numel(a) / numel(b), a scalar of a's dtype (the inputs' data is not read)";
  def.min_inputs = 2;
  def.max_inputs = 2;
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    require_floating(call, 0);
    if (call.inputs[1].shape.numel() == 0) {
      call.fail("b {} has no elements, so the ratio is undefined", call.inputs[1]);
    }
    return {TensorDesc{call.inputs[0].dtype, Shape{}}};
  };
  // Depends on shapes only: zero gradient for both inputs.
  def.backward = [](const BackwardCall&) -> std::vector<std::optional<Value>> {
    return {std::nullopt, std::nullopt};
  };
  def.second_order = true;
  def.reference = [](const KernelCall& call) {
    const double ratio =
        static_cast<double>(call.inputs[0].numel()) / static_cast<double>(call.inputs[1].numel());
    dispatch_floating(call.outputs[0].dtype(), [&](auto zero) {
      call.outputs[0].data<decltype(zero)>()[0] = static_cast<decltype(zero)>(ratio);
    });
  };
  def.samples = [] {
    auto shape_only = [](Shape shape) {
      return InputSpec{std::move(shape), std::nullopt, -1, 1, 0, false};
    };
    return std::vector<Sample>{{"per example", {shape_only({6, 4}), shape_only({6})}, {}},
                               {"all", {shape_only({3, 5}), shape_only({})}, {}}};
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{
        {"b empty", {spec({2, 3}), spec({0})}, {}, "has no elements"},
        {"integer a", {InputSpec{{2}, DType::i32, 0, 3, 0, false}, spec({2})}, {}, "f32 or f64"}};
  };
  registry.add(std::move(def));
}

}  // namespace

Value count_ratio(const Value& a, const Value& b, std::source_location where) {
  if (!a.valid() || !b.valid()) throw GraphError("count_ratio: an input is an empty Value");
  return a.graph().apply("count_ratio", {a, b}, {}, where);
}

Value sum(const Value& x, std::source_location where) {
  return sum(x, {}, false, where);
}
Value sum(const Value& x, std::vector<std::int64_t> axes, bool keepdims,
          std::source_location where) {
  return x.graph().apply("sum", {x}, {{"axes", std::move(axes)}, {"keepdims", keepdims}}, where);
}
Value mean(const Value& x, std::source_location where) {
  return mean(x, {}, false, where);
}
Value mean(const Value& x, std::vector<std::int64_t> axes, bool keepdims,
           std::source_location where) {
  return x.graph().apply("mean", {x}, {{"axes", std::move(axes)}, {"keepdims", keepdims}}, where);
}

void register_reduction_ops(OpRegistry& registry) {
  register_count_ratio(registry);
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
    // dx = dy / n spread over the reduced axes, n the number of elements each output averages.
    // When axis 0 is reduced, n is taken from x's shape when the plan runs (count_ratio), so
    // that the gradient stays right when a plan runs with another batch size (an input declared
    // batch_dynamic): the declared size would scale it by declared / actual.
    def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
      const Value& x = c.inputs[0];
      const std::vector<std::int64_t>& axes = c.attrs().integers("axes");
      const bool batch_reduced = axes.empty() || std::any_of(axes.begin(), axes.end(), [&](auto a) {
                                   return a == 0 || a == -x.rank();
                                 });
      if (x.rank() > 0 && batch_reduced) {
        return {spread(c.grad() / count_ratio(x, c.grad()), x, c.attrs())};
      }
      const double count =
          static_cast<double>(x.desc().numel()) /
          static_cast<double>(std::max<std::int64_t>(c.outputs[0].desc().numel(), 1));
      return {spread(c.grad() / count, x, c.attrs())};
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
