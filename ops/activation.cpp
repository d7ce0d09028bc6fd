// Activations (step, identity, leaky_relu, elu, softplus, normal_cdf, gelu, maxout), powers
// (pow, sqrt), selections (maximum, minimum, where) and comparisons.
// Kernels: oneDNN eltwise, binary and pooling primitives for f32; plain loops for the reference.
#include "ops/activation.hpp"

#include <cmath>
#include <limits>
#include <numbers>

#include "ops/common.hpp"
#include "ops/elementwise.hpp"
#include "ops/reduction.hpp"
#include "ops/shape.hpp"
#include "runtime/primitive_kernel.hpp"

namespace dagrad {

namespace {

using Grads = std::vector<std::optional<Value>>;
using A = dnnl::algorithm;

Value checked_apply(std::string_view op, std::vector<Value> inputs, Attrs attrs,
                    std::source_location where) {
  for (const Value& v : inputs) {
    if (!v.valid()) throw GraphError(fmt::format("{}: an input is an empty Value", op));
  }
  Graph& graph = inputs[0].graph();
  return graph.apply(op, std::move(inputs), std::move(attrs), where);
}

void require_finite_attr(const ShapeCall& call, const std::string& key) {
  const double value = call.attrs.real(key);
  if (!std::isfinite(value)) call.fail("{} must be finite, got {}", key, value);
}

Value zero_like(const Value& x) {
  return scalar_like(x, 0.0);
}

// φ(x) = e^(−x²/2) / √(2π), built from ops (differentiable to any order).
Value gaussian_pdf(const Value& x) {
  const double inv_sqrt_2pi = 1.0 / std::sqrt(2.0 * std::numbers::pi);
  return exp(mul(x, x) * -0.5) * inv_sqrt_2pi;
}

// ---- unary ops ----------------------------------------------------------------------------

std::vector<Sample> unary_samples(double low, double high, double min_magnitude = 0.0,
                                  const Attrs& attrs = {}) {
  std::vector<Sample> samples;
  for (auto [label, shape] :
       {std::pair<const char*, Shape>{"matrix", {3, 5}}, {"rank 3", {2, 3, 2}}, {"scalar", {}}}) {
    InputSpec x = spec(shape, low, high);
    x.min_magnitude = min_magnitude;
    samples.push_back(Sample{label, {x}, attrs});
  }
  return samples;
}

// An input with exact values instead of random ones.
InputSpec exact(Shape shape, std::vector<double> values) {
  InputSpec x = spec(std::move(shape));
  x.values = std::move(values);
  return x;
}

Sample exact_sample(std::string label, Shape shape, std::vector<double> values,
                    const Attrs& attrs = {}) {
  return Sample{std::move(label), {exact(std::move(shape), std::move(values))}, attrs};
}

std::vector<ErrorSample> unary_errors(const Attrs& attrs = {}) {
  return {ErrorSample{"integer input", {InputSpec{{2}, DType::i32}}, attrs, "must be f32 or f64"}};
}

struct UnaryOp {
  std::string name;
  std::string formula;
  std::optional<dnnl::algorithm> algorithm;
  EltwiseParams params;
  std::vector<std::string> finite_attrs;  // real attributes the shape rule checks
  BackwardFn backward;
  std::string no_gradient;
  std::vector<Sample> samples;
  std::vector<ErrorSample> errors;
};

template <class Op>
void register_unary(OpRegistry& registry, UnaryOp u, Op op) {
  OpDef def;
  def.name = u.name;
  def.formula = u.formula;
  def.shape = [keys = u.finite_attrs](const ShapeCall& call) {
    for (const auto& key : keys) require_finite_attr(call, key);
    return same_as_input(call);
  };
  def.backward = u.backward;
  def.no_gradient = u.no_gradient;
  def.second_order = static_cast<bool>(u.backward);
  def.reference = unary_reference(op);
  if (u.algorithm) def.onednn = eltwise_onednn(*u.algorithm, u.params);
  def.in_place = true;  // element-wise: both kernels read x[i] before writing y[i]
  def.samples = [samples = u.samples] { return samples; };
  def.error_samples = [errors = u.errors] { return errors; };
  registry.add(std::move(def));
}

// ---- binary ops with broadcasting ---------------------------------------------------------

std::vector<ErrorSample> binary_errors() {
  return {
      ErrorSample{"incompatible shapes", {spec({3, 4}), spec({5})}, {}, "cannot broadcast"},
      ErrorSample{"integer inputs",
                  {InputSpec{{2}, DType::i32}, InputSpec{{2}, DType::i32}},
                  {},
                  "must be f32 or f64"},
      ErrorSample{"mixed dtypes",
                  {InputSpec{{2}, DType::f32}, InputSpec{{2}, DType::f64}},
                  {},
                  "different dtypes"},
  };
}

template <class Op>
void register_comparison(OpRegistry& registry, std::string name, std::string relation,
                         dnnl::algorithm algorithm, dnnl::algorithm swapped, Op op) {
  OpDef def;
  def.name = name;
  def.formula =
      fmt::format("y = 1 if a {} b else 0 (broadcasting; same dtype as a and b)", relation);
  def.min_inputs = def.max_inputs = 2;
  def.shape = broadcast_rule;
  def.no_gradient = fmt::format(
      "{} is piecewise constant (0 or 1): its derivative is 0 wherever it exists and undefined "
      "where a {} b switches, so no useful gradient flows through a comparison",
      name, relation);
  def.reference = binary_reference([op](auto a, auto b) { return op(a, b) ? 1.0 : 0.0; });
  def.onednn = binary_onednn(algorithm, {swapped});
  def.samples = [] {
    // Exact values with equal elements, so every relation is both true and false somewhere.
    return std::vector<Sample>{
        {"same shape", {exact({2, 3}, {1, 2, 3, -1, 0, 5}), exact({2, 3}, {1, 3, 2, -1, 1, 5})}},
        {"row broadcast", {exact({2, 3}, {1, 2, 3, 4, 5, 6}), exact({3}, {1, 5, 3})}},
        {"first input broadcast", {exact({3}, {1, 5, 3}), exact({2, 3}, {1, 2, 3, 4, 5, 6})}},
        {"scalar", {spec({3, 4}), exact({}, {0})}},
        {"random", {spec({4, 5}), spec({4, 5})}},
    };
  };
  def.error_samples = binary_errors;
  registry.add(std::move(def));
}

// ---- maxout -------------------------------------------------------------------------------

// x viewed as [outer, features, inner] around the maxout axis.
struct MaxoutGeometry {
  std::int64_t outer = 1, features = 1, inner = 1, pieces = 1, groups = 1;
  int axis = 0;
};

MaxoutGeometry maxout_geometry(const Shape& x, const Attrs& attrs) {
  MaxoutGeometry m;
  const std::int64_t axis = attrs.integer("axis");
  m.axis = static_cast<int>(axis < 0 ? axis + x.rank() : axis);
  for (int i = 0; i < m.axis; ++i) m.outer *= x[i];
  m.features = x[m.axis];
  for (int i = m.axis + 1; i < x.rank(); ++i) m.inner *= x[i];
  m.pieces = attrs.integer("pieces");
  m.groups = m.features / m.pieces;
  return m;
}

// Validates the attributes against x and returns y's desc.
TensorDesc maxout_output(const ShapeCall& call, const TensorDesc& x) {
  if (x.shape.rank() == 0) call.fail("needs at least one axis, got a scalar {}", x);
  const int axis = normalize_axis(call.attrs.integer("axis"), x.shape.rank(), call.site);
  const std::int64_t pieces = call.attrs.integer("pieces");
  if (pieces < 1) call.fail("pieces must be >= 1, got {}", pieces);
  const std::int64_t features = x.shape[axis];
  if (features % pieces != 0) {
    call.fail("axis {} of {} has {} features, which is not divisible by pieces = {}", axis, x.shape,
              features, pieces);
  }
  Shape out = x.shape;
  out[axis] = features / pieces;
  return TensorDesc{x.dtype, out};
}

// x viewed as NCHW [outer, 1, F, inner] (plain row-major x is exactly that layout) and maxout
// as max pooling with a (pieces x 1) window and stride.
struct MaxoutPooling {
  dnnl::memory::desc src_md, dst_md;
  dnnl::memory::dims window;
  explicit MaxoutPooling(const MaxoutGeometry& m)
      : src_md({m.outer, 1, m.features, m.inner}, dnnl::memory::data_type::f32,
               dnnl::memory::format_tag::nchw),
        dst_md({m.outer, 1, m.groups, m.inner}, dnnl::memory::data_type::f32,
               dnnl::memory::format_tag::nchw),
        window{m.pieces, 1} {}
  dnnl::pooling_forward::desc forward(dnnl::prop_kind prop_kind) const {
    return dnnl::pooling_forward::desc(prop_kind, dnnl::algorithm::pooling_max, src_md, dst_md,
                                       window, window, {0, 0}, {0, 0});
  }
};

// maxout_grad on oneDNN: max pooling backward needs the arg-max workspace of a training-mode
// forward pass, so each run recomputes the forward (dst and workspace in the kernel's scratch)
// and then scatters dy. Primitives are created once per plan.
class MaxoutGradKernel final : public Kernel {
 public:
  MaxoutGradKernel(const MaxoutGeometry& m, dnnl::engine& engine) {
    MaxoutPooling pooling(m);
    dnnl::pooling_forward::primitive_desc forward_pd(
        pooling.forward(dnnl::prop_kind::forward_training), engine);
    dnnl::pooling_backward::primitive_desc backward_pd(
        dnnl::pooling_backward::desc(dnnl::algorithm::pooling_max, pooling.src_md, pooling.dst_md,
                                     pooling.window, pooling.window, {0, 0}, {0, 0}),
        engine, forward_pd);
    forward_ = dnnl::pooling_forward(forward_pd);
    backward_ = dnnl::pooling_backward(backward_pd);
    src_mem_ = dnnl::memory(pooling.src_md, engine, nullptr);
    diff_src_mem_ = dnnl::memory(pooling.src_md, engine, nullptr);
    diff_dst_mem_ = dnnl::memory(pooling.dst_md, engine, nullptr);
    dst_scratch_mem_ = dnnl::memory(forward_pd.dst_desc(), engine, nullptr);
    workspace_mem_ = dnnl::memory(forward_pd.workspace_desc(), engine, nullptr);
    dst_at_ = scratch_.reserve(forward_pd.dst_desc().get_size());
    workspace_at_ = scratch_.reserve(forward_pd.workspace_desc().get_size());
  }

  std::size_t scratch_bytes() const override { return scratch_.bytes(); }

  const char* library() const override { return "oneDNN"; }
  void run(const KernelCall& call) override {
    std::byte* scratch = scratch_.base(call.context, "maxout_grad");
    dst_scratch_mem_.set_data_handle(scratch + dst_at_);
    workspace_mem_.set_data_handle(scratch + workspace_at_);
    diff_dst_mem_.set_data_handle(const_cast<void*>(call.inputs[0].raw()));
    src_mem_.set_data_handle(const_cast<void*>(call.inputs[1].raw()));
    diff_src_mem_.set_data_handle(call.outputs[0].raw());
    dnnl::stream& stream = *call.context.stream;
    forward_.execute(stream, {{DNNL_ARG_SRC, src_mem_},
                              {DNNL_ARG_DST, dst_scratch_mem_},
                              {DNNL_ARG_WORKSPACE, workspace_mem_}});
    backward_.execute(stream, {{DNNL_ARG_DIFF_DST, diff_dst_mem_},
                               {DNNL_ARG_WORKSPACE, workspace_mem_},
                               {DNNL_ARG_DIFF_SRC, diff_src_mem_}});
  }

 private:
  dnnl::pooling_forward forward_;
  dnnl::pooling_backward backward_;
  dnnl::memory src_mem_, diff_src_mem_, diff_dst_mem_, dst_scratch_mem_, workspace_mem_;
  ScratchLayout scratch_;
  std::size_t dst_at_ = 0, workspace_at_ = 0;
};

// Index (within its group) of the first maximum of group j at (o, i).
template <class T>
std::int64_t group_argmax(const T* src, const MaxoutGeometry& m, std::int64_t o, std::int64_t j,
                          std::int64_t i) {
  std::int64_t best = 0;
  T best_value = src[(o * m.features + j * m.pieces) * m.inner + i];
  for (std::int64_t k = 1; k < m.pieces; ++k) {
    const T value = src[(o * m.features + j * m.pieces + k) * m.inner + i];
    if (value > best_value) {  // strict: ties keep the first
      best_value = value;
      best = k;
    }
  }
  return best;
}

// x's shape with the maxout axis split into [groups, pieces].
Shape split_groups(const Shape& x, const Attrs& attrs) {
  const MaxoutGeometry m = maxout_geometry(x, attrs);
  std::vector<std::int64_t> dims;
  for (int i = 0; i < x.rank(); ++i) {
    if (i == m.axis) {
      dims.push_back(m.groups);
      dims.push_back(m.pieces);
    } else {
      dims.push_back(x[i]);
    }
  }
  return Shape(dims);
}

std::vector<Sample> maxout_samples() {
  auto attrs = [](std::int64_t pieces, std::int64_t axis) {
    return Attrs{{"pieces", pieces}, {"axis", axis}};
  };
  return {
      {"features last", {spec({2, 6})}, attrs(3, -1)},
      {"middle axis", {spec({2, 4, 3})}, attrs(2, 1)},
      {"first axis", {spec({6, 2})}, attrs(2, 0)},
      {"one piece", {spec({3, 4})}, attrs(1, 1)},
      {"one group", {spec({5})}, attrs(5, 0)},
  };
}

std::vector<ErrorSample> maxout_errors(bool with_dy) {
  auto inputs = [with_dy](Shape x, Shape y) {
    return with_dy ? std::vector<InputSpec>{spec(std::move(y)), spec(std::move(x))}
                   : std::vector<InputSpec>{spec(std::move(x))};
  };
  std::vector<ErrorSample> errors{
      {"not divisible",
       inputs({2, 5}, {2, 2}),
       {{"pieces", std::int64_t{2}}, {"axis", std::int64_t{1}}},
       "not divisible by pieces = 2"},
      {"zero pieces",
       inputs({2, 4}, {2, 2}),
       {{"pieces", std::int64_t{0}}, {"axis", std::int64_t{1}}},
       "pieces must be >= 1"},
      {"axis out of range",
       inputs({2, 4}, {2, 2}),
       {{"pieces", std::int64_t{2}}, {"axis", std::int64_t{2}}},
       "out of range"},
  };
  if (with_dy) {
    errors.push_back({"dy of the wrong shape",
                      {spec({2, 3}), spec({2, 4})},
                      {{"pieces", std::int64_t{2}}, {"axis", std::int64_t{1}}},
                      "must be maxout's output shape [2,2]"});
  } else {
    errors.push_back({"integer input",
                      {InputSpec{{2, 4}, DType::i32}},
                      {{"pieces", std::int64_t{2}}, {"axis", std::int64_t{1}}},
                      "must be f32 or f64"});
  }
  return errors;
}

void register_maxout(OpRegistry& registry) {
  {
    OpDef def;
    def.name = "maxout";
    def.formula =
        "y[..., j, ...] = max_{k < pieces} x[..., j*pieces + k, ...] along axis (size F/pieces); "
        "the gradient goes to each group's first arg-max";
    def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
      require_floating(call, 0);
      return {maxout_output(call, call.inputs[0])};
    };
    def.backward = [](const BackwardCall& c) -> Grads {
      return {maxout_grad(c.grad(), c.inputs[0], c.attrs().integer("pieces"),
                          c.attrs().integer("axis"))};
    };
    def.second_order = true;
    def.reference = [](const KernelCall& call) {
      const MaxoutGeometry m = maxout_geometry(call.inputs[0].shape(), call.attrs());
      dispatch_floating(call.inputs[0].dtype(), [&](auto zero) {
        using T = decltype(zero);
        const T* src = call.inputs[0].data<T>();
        T* dst = call.outputs[0].data<T>();
        for (std::int64_t o = 0; o < m.outer; ++o) {
          for (std::int64_t j = 0; j < m.groups; ++j) {
            for (std::int64_t i = 0; i < m.inner; ++i) {
              const std::int64_t k = group_argmax(src, m, o, j, i);
              dst[(o * m.groups + j) * m.inner + i] =
                  src[(o * m.features + j * m.pieces + k) * m.inner + i];
            }
          }
        }
      });
    };
    def.onednn = [](const KernelBuild& build) -> std::unique_ptr<Kernel> {
      if (build.inputs[0].dtype != DType::f32 || build.outputs[0].numel() == 0) return nullptr;
      MaxoutPooling pooling(maxout_geometry(build.inputs[0].shape, build.node.attrs));
      dnnl::pooling_forward::primitive_desc pd(pooling.forward(dnnl::prop_kind::forward_inference),
                                               build.engine);
      return std::make_unique<PrimitiveKernel>(
          dnnl::pooling_forward(pd),
          std::vector<PrimitiveArg>{input_arg(DNNL_ARG_SRC, 0, pooling.src_md),
                                    output_arg(DNNL_ARG_DST, 0, pooling.dst_md)});
    };
    def.samples = maxout_samples;
    def.error_samples = [] { return maxout_errors(false); };
    registry.add(std::move(def));
  }
  {
    OpDef def;
    def.name = "maxout_grad";
    def.formula =
        "dx[..., j*pieces + k, ...] = dy[..., j, ...] if k is the first arg-max of group j of x, "
        "else 0 (maxout's backward)";
    def.min_inputs = def.max_inputs = 2;
    def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
      require_floating(call, 0);
      require_same_dtype(call);
      const TensorDesc& dy = call.inputs[0];
      const TensorDesc& x = call.inputs[1];
      const TensorDesc y = maxout_output(call, x);
      if (dy.shape != y.shape) {
        call.fail("dy {} must be maxout's output shape {} for x {}", dy, y.shape, x);
      }
      return {x};
    };
    // Linear in dy: its adjoint gathers the incoming gradient at the same arg-maxes, i.e. sums
    // each group of g masked by the one-hot arg-max mask maxout_grad(1, x). In x the result is
    // piecewise constant: gradient 0 (nullopt).
    def.backward = [](const BackwardCall& c) -> Grads {
      if (!c.needs[0]) return {std::nullopt, std::nullopt};
      const Value& dy = c.inputs[0];
      const Value& x = c.inputs[1];
      const auto pieces = c.attrs().integer("pieces");
      const auto axis = c.attrs().integer("axis");
      Value mask = maxout_grad(filled_like(dy, 1.0), x, pieces, axis);
      Value grouped = reshape(mul(c.grad(), mask), split_groups(x.shape(), c.attrs()));
      const auto group_axis = maxout_geometry(x.shape(), c.attrs()).axis;
      return {sum(grouped, {group_axis + 1}), std::nullopt};
    };
    def.second_order = true;
    def.reference = [](const KernelCall& call) {
      const MaxoutGeometry m = maxout_geometry(call.inputs[1].shape(), call.attrs());
      dispatch_floating(call.inputs[1].dtype(), [&](auto zero) {
        using T = decltype(zero);
        const T* diff_dst = call.inputs[0].data<T>();
        const T* src = call.inputs[1].data<T>();
        T* diff_src = call.outputs[0].data<T>();
        std::fill(diff_src, diff_src + call.outputs[0].numel(), T(0));
        for (std::int64_t o = 0; o < m.outer; ++o) {
          for (std::int64_t j = 0; j < m.groups; ++j) {
            for (std::int64_t i = 0; i < m.inner; ++i) {
              const std::int64_t k = group_argmax(src, m, o, j, i);
              diff_src[(o * m.features + j * m.pieces + k) * m.inner + i] =
                  diff_dst[(o * m.groups + j) * m.inner + i];
            }
          }
        }
      });
    };
    def.samples = [] {
      std::vector<Sample> samples;
      for (Sample s : maxout_samples()) {
        const Shape x = s.inputs[0].shape;
        // dy has maxout's output shape.
        const MaxoutGeometry m = maxout_geometry(x, s.attrs);
        Shape y = x;
        y[m.axis] = m.groups;
        s.inputs.insert(s.inputs.begin(), spec(y));
        samples.push_back(std::move(s));
      }
      return samples;
    };
    def.onednn = [](const KernelBuild& build) -> std::unique_ptr<Kernel> {
      if (build.inputs[1].dtype != DType::f32 || build.inputs[0].numel() == 0) return nullptr;
      return std::make_unique<MaxoutGradKernel>(
          maxout_geometry(build.inputs[1].shape, build.node.attrs), build.engine);
    };
    def.error_samples = [] { return maxout_errors(true); };
    registry.add(std::move(def));
  }
}

// ---- where --------------------------------------------------------------------------------

void register_where(OpRegistry& registry) {
  OpDef def;
  def.name = "where";
  def.formula =
      "y = a where cond != 0 else b (cond, a, b broadcast); the gradient flows to a where cond "
      "holds and to b elsewhere, none to cond";
  def.min_inputs = def.max_inputs = 3;
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    const TensorDesc& cond = call.inputs[0];
    const TensorDesc& a = call.inputs[1];
    const TensorDesc& b = call.inputs[2];
    require_floating(call, 1);
    if (a.dtype != b.dtype) {
      call.fail("a {} and b {} have different dtypes (convert one with cast())", a, b);
    }
    if (is_floating(cond.dtype) && cond.dtype != a.dtype) {
      call.fail("cond {} must be i32 or of a's dtype {}", cond, a.dtype);
    }
    Shape out =
        broadcast_shapes(broadcast_shapes(cond.shape, a.shape, call.site), b.shape, call.site);
    return {TensorDesc{a.dtype, out}};
  };
  def.backward = [](const BackwardCall& c) -> Grads {
    const Value& cond = c.inputs[0];
    Value g = c.grad();
    std::optional<Value> da, db;
    if (c.needs[1]) da = unbroadcast(where(cond, g, zero_like(g)), c.inputs[1].shape());
    if (c.needs[2]) db = unbroadcast(where(cond, zero_like(g), g), c.inputs[2].shape());
    return {std::nullopt, da, db};
  };
  def.second_order = true;
  def.reference = [](const KernelCall& call) {
    const Tensor& cond = call.inputs[0];
    const Tensor& a = call.inputs[1];
    const Tensor& b = call.inputs[2];
    Tensor& y = call.outputs[0];
    dispatch_floating(y.dtype(), [&](auto zero) {
      using T = decltype(zero);
      dispatch_any(cond.dtype(), [&](auto cond_zero) {
        using C = decltype(cond_zero);
        const C* select = cond.data<C>();
        const T* src0 = a.data<T>();
        const T* src1 = b.data<T>();
        T* dst = y.data<T>();
        BroadcastIndex ic(y.shape(), broadcast_strides(cond.shape(), y.shape()));
        BroadcastIndex ia(y.shape(), broadcast_strides(a.shape(), y.shape()));
        BroadcastIndex ib(y.shape(), broadcast_strides(b.shape(), y.shape()));
        for (std::int64_t i = 0; i < y.numel(); ++i, ic.next(), ia.next(), ib.next()) {
          dst[i] = select[ic.offset()] != C(0) ? src0[ia.offset()] : src1[ib.offset()];
        }
      });
    });
  };
  def.samples = [] {
    InputSpec mask = exact({2, 3}, {1, 0, 1, 0, 0, 1});
    mask.differentiable = false;
    InputSpec column_mask = exact({3, 1}, {0, 1, 1});
    column_mask.differentiable = false;
    return std::vector<Sample>{
        {"float mask", {mask, spec({2, 3}), spec({2, 3})}},
        {"i32 mask, broadcast values", {labels({2, 3}, 2), spec({3}), spec({})}},
        {"all broadcast", {column_mask, spec({1, 4}), spec({3, 4})}},
    };
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{
        {"incompatible shapes", {spec({2, 3}), spec({2, 3}), spec({4})}, {}, "cannot broadcast"},
        {"integer values",
         {InputSpec{{2}, DType::i32}, InputSpec{{2}, DType::i32}, InputSpec{{2}, DType::i32}},
         {},
         "must be f32 or f64"},
        {"cond of another floating dtype",
         {InputSpec{{2}, DType::f64}, InputSpec{{2}, DType::f32}, InputSpec{{2}, DType::f32}},
         {},
         "must be i32 or of a's dtype"},
        {"values of different dtypes",
         {spec({2}), InputSpec{{2}, DType::f32}, InputSpec{{2}, DType::f64}},
         {},
         "different dtypes"},
    };
  };
  registry.add(std::move(def));
}

// ---- maximum and minimum ------------------------------------------------------------------

template <class Op>
void register_extremum(OpRegistry& registry, std::string name, std::string formula,
                       dnnl::algorithm algorithm, bool is_max, Op op) {
  OpDef def;
  def.name = std::move(name);
  def.formula = std::move(formula);
  def.min_inputs = def.max_inputs = 2;
  def.shape = broadcast_rule;
  // The gradient follows the selected input; ties go to a. The mask is a comparison, which
  // only reaches where's condition, so no gradient is asked of it.
  def.backward = [is_max](const BackwardCall& c) -> Grads {
    const Value& a = c.inputs[0];
    const Value& b = c.inputs[1];
    Value g = c.grad();
    Value a_selected = is_max ? greater_equal(a, b) : less_equal(a, b);
    std::optional<Value> da, db;
    if (c.needs[0]) da = unbroadcast(where(a_selected, g, zero_like(g)), a.shape());
    if (c.needs[1]) db = unbroadcast(where(a_selected, zero_like(g), g), b.shape());
    return {da, db};
  };
  def.second_order = true;
  def.reference = binary_reference(op);
  def.onednn = binary_onednn(algorithm, {algorithm});
  def.samples = [] {
    InputSpec away_from_zero = spec({3, 4});
    away_from_zero.min_magnitude = 0.1;
    return std::vector<Sample>{
        {"same shape", {spec({3, 4}), spec({3, 4})}},
        {"against zeros, broadcast", {away_from_zero, exact({4}, {0, 0, 0, 0})}},
        {"first input broadcast", {spec({4}), spec({3, 4})}},
        {"both broadcast", {spec({2, 1, 4}), spec({3, 1})}},
        {"scalar", {spec({2, 3}), exact({}, {0.05})}},
    };
  };
  def.error_samples = binary_errors;
  registry.add(std::move(def));
}

}  // namespace

// ---- builders -----------------------------------------------------------------------------

Value step(const Value& x, std::source_location where) {
  return checked_apply("step", {x}, {}, where);
}
Value identity(const Value& x, std::source_location where) {
  return checked_apply("identity", {x}, {}, where);
}
Value leaky_relu(const Value& x, double alpha, std::source_location where) {
  return checked_apply("leaky_relu", {x}, {{"alpha", alpha}}, where);
}
Value elu(const Value& x, double alpha, std::source_location where) {
  return checked_apply("elu", {x}, {{"alpha", alpha}}, where);
}
Value softplus(const Value& x, std::source_location where) {
  return checked_apply("softplus", {x}, {}, where);
}
Value normal_cdf(const Value& x, std::source_location where) {
  return checked_apply("normal_cdf", {x}, {}, where);
}
Value gelu(const Value& x, std::source_location where) {
  return checked_apply("gelu", {x}, {}, where);
}
Value gelu_grad(const Value& dy, const Value& x, std::source_location where) {
  return checked_apply("gelu_grad", {dy, x}, {}, where);
}
Value maxout(const Value& x, std::int64_t pieces, std::int64_t axis, std::source_location where) {
  return checked_apply("maxout", {x}, {{"pieces", pieces}, {"axis", axis}}, where);
}
Value maxout_grad(const Value& dy, const Value& x, std::int64_t pieces, std::int64_t axis,
                  std::source_location where) {
  return checked_apply("maxout_grad", {dy, x}, {{"pieces", pieces}, {"axis", axis}}, where);
}
Value pow(const Value& x, double exponent, std::source_location where) {
  return checked_apply("pow", {x}, {{"exponent", exponent}}, where);
}
Value sqrt(const Value& x, std::source_location where) {
  return checked_apply("sqrt", {x}, {}, where);
}
Value maximum(const Value& a, const Value& b, std::source_location where) {
  return checked_apply("maximum", {a, b}, {}, where);
}
Value minimum(const Value& a, const Value& b, std::source_location where) {
  return checked_apply("minimum", {a, b}, {}, where);
}
Value where(const Value& cond, const Value& a, const Value& b, std::source_location location) {
  return checked_apply("where", {cond, a, b}, {}, location);
}
Value greater(const Value& a, const Value& b, std::source_location where) {
  return checked_apply("greater", {a, b}, {}, where);
}
Value greater_equal(const Value& a, const Value& b, std::source_location where) {
  return checked_apply("greater_equal", {a, b}, {}, where);
}
Value less(const Value& a, const Value& b, std::source_location where) {
  return checked_apply("less", {a, b}, {}, where);
}
Value less_equal(const Value& a, const Value& b, std::source_location where) {
  return checked_apply("less_equal", {a, b}, {}, where);
}
Value equal(const Value& a, const Value& b, std::source_location where) {
  return checked_apply("equal", {a, b}, {}, where);
}
Value not_equal(const Value& a, const Value& b, std::source_location where) {
  return checked_apply("not_equal", {a, b}, {}, where);
}

// gelu's backward as one op. Measured (bench_ops op_backward/gelu/128x1024, 2 threads): 2.4 ms
// with Φ on the reference kernel and four element-wise steps. Its gradient, from ops:
// d/d(dy) = gelu_grad(g, x); d/dx = g·dy·φ(x)·(2 − x²), since (Φ + xφ)' = 2φ + xφ' = φ·(2 − x²).
void register_gelu_grad(OpRegistry& registry) {
  OpDef def;
  def.name = "gelu_grad";
  def.formula = "dx = dy * (Phi(x) + x phi(x)) (gelu's backward)";
  def.min_inputs = def.max_inputs = 2;
  def.shape = activation_grad_rule;
  def.backward = [](const BackwardCall& c) -> Grads {
    const Value& dy = c.inputs[0];
    const Value& x = c.inputs[1];
    Grads grads(2);
    if (c.needs[0]) grads[0] = gelu_grad(c.grad(), x);
    if (c.needs[1]) grads[1] = mul(mul(c.grad(), dy), mul(gaussian_pdf(x), 2.0 - mul(x, x)));
    return grads;
  };
  def.second_order = true;
  def.reference = binary_reference([](auto dy, auto x) {
    using T = decltype(x);
    const T cdf = T(0.5) * std::erfc(-x / std::numbers::sqrt2_v<T>);
    const T pdf = std::exp(T(-0.5) * x * x) / std::sqrt(T(2) * std::numbers::pi_v<T>);
    return dy * (cdf + x * pdf);
  });
  def.in_place = true;  // eltwise_backward writes diff_src over diff_dst
  def.onednn = eltwise_backward_onednn(dnnl::algorithm::eltwise_gelu_erf);
  def.samples = [] {
    return std::vector<Sample>{{"matrix", {spec({4, 5}), spec({4, 5}, -3.0, 3.0)}},
                               {"rank 3", {spec({2, 3, 2}), spec({2, 3, 2}, -3.0, 3.0)}}};
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{
        {"shapes differ", {spec({4, 5}), spec({5, 4})}, {}, "must have the same shape"}};
  };
  registry.add(std::move(def));
}

// ---- registrations ------------------------------------------------------------------------

void register_activation_ops(OpRegistry& registry) {
  const auto alpha_param = [](const Attrs& attrs) {
    return std::pair{static_cast<float>(attrs.real("alpha")), 0.f};
  };

  {
    std::vector<Sample> samples = unary_samples(-2.0, 2.0);
    samples.push_back(exact_sample("both sides of 0, and 0 itself", {7},
                                   {-2.0, -1e-30, 0.0, 1e-30, 0.5, 3.0, -0.0}));
    register_unary(
        registry,
        {.name = "step",
         .formula = "y = 1 if x > 0 else 0 (step(0) = 0); no gradient",
         .no_gradient =
             "step is piecewise constant: its derivative is 0 wherever it exists and undefined "
             "at 0, so no gradient can train through it (the perceptron rule does not use one; "
             "use sigmoid or another smooth function to train by gradient)",
         .samples = samples,
         .errors = unary_errors()},
        [](auto x, const Attrs&) { return x > 0 ? 1.0 : 0.0; });
  }

  register_unary(registry,
                 {.name = "identity",
                  .formula = "y = x",
                  .algorithm = A::eltwise_linear,
                  .params =
                      [](const Attrs&) {
                        return std::pair{1.f, 0.f};
                      },
                  .backward = [](const BackwardCall& c) -> Grads { return {c.grad()}; },
                  .samples = unary_samples(-2.0, 2.0),
                  .errors = unary_errors()},
                 [](auto x, const Attrs&) { return x; });

  {
    std::vector<Sample> samples = unary_samples(-2.0, 2.0, 0.1, {{"alpha", 0.1}});
    samples.push_back(Sample{"alpha 0.3", {spec({4, 3}, -3.0, 3.0)}, {{"alpha", 0.3}}});
    samples.back().inputs[0].min_magnitude = 0.1;
    register_unary(
        registry,
        {.name = "leaky_relu",
         .formula = "y = x if x > 0 else alpha*x; dy/dx = 1 if x > 0 else alpha (alpha at 0)",
         .algorithm = A::eltwise_relu,
         .params = alpha_param,
         .finite_attrs = {"alpha"},
         .backward = [](const BackwardCall& c) -> Grads {
           const Value& x = c.inputs[0];
           Value g = c.grad();
           return {where(greater(x, zero_like(x)), g, g * c.attrs().real("alpha"))};
         },
         .samples = samples,
         .errors = {ErrorSample{"integer input",
                                {InputSpec{{2}, DType::i32}},
                                {{"alpha", 0.1}},
                                "must be f32 or f64"},
                    ErrorSample{"infinite alpha",
                                {spec({2})},
                                {{"alpha", std::numeric_limits<double>::infinity()}},
                                "alpha must be finite"}}},
        [](auto x, const Attrs& attrs) {
          using T = decltype(x);
          return x > 0 ? x : static_cast<T>(attrs.real("alpha")) * x;
        });
  }

  {
    std::vector<Sample> samples = unary_samples(-3.0, 2.0, 0.1, {{"alpha", 1.0}});
    samples.push_back(Sample{"alpha 0.5", {spec({4, 3}, -3.0, 3.0)}, {{"alpha", 0.5}}});
    samples.back().inputs[0].min_magnitude = 0.1;
    register_unary(
        registry,
        {.name = "elu",
         .formula = "y = x if x > 0 else alpha*(e^x - 1); dy/dx = 1 if x > 0 else y + alpha "
                    "(alpha at 0)",
         .algorithm = A::eltwise_elu,
         .params = alpha_param,
         .finite_attrs = {"alpha"},
         .backward = [](const BackwardCall& c) -> Grads {
           const Value& x = c.inputs[0];
           const Value& y = c.outputs[0];  // left slope alpha*e^x = y + alpha, from the output
           Value g = c.grad();
           return {where(greater(x, zero_like(x)), g, g * (y + c.attrs().real("alpha")))};
         },
         .samples = samples,
         .errors = {ErrorSample{"integer input",
                                {InputSpec{{2}, DType::i32}},
                                {{"alpha", 1.0}},
                                "must be f32 or f64"},
                    ErrorSample{"NaN alpha",
                                {spec({2})},
                                {{"alpha", std::numeric_limits<double>::quiet_NaN()}},
                                "alpha must be finite"}}},
        [](auto x, const Attrs& attrs) {
          using T = decltype(x);
          return x > 0 ? x : static_cast<T>(attrs.real("alpha")) * std::expm1(x);
        });
  }

  {
    std::vector<Sample> samples = unary_samples(-5.0, 5.0);
    samples.push_back(exact_sample("far tails", {6}, {-100.0, -30.0, -1.0, 1.0, 30.0, 100.0}));
    register_unary(
        registry,
        {.name = "softplus",
         .formula = "y = ln(1 + e^x) = max(x, 0) + ln(1 + e^-|x|) (stable); dy/dx = sigmoid(x)",
         .algorithm = A::eltwise_soft_relu,
         .backward = [](const BackwardCall& c) -> Grads {
           return {mul(c.grad(), sigmoid(c.inputs[0]))};
         },
         .samples = samples,
         .errors = unary_errors()},
        [](auto x, const Attrs&) {
          using T = decltype(x);
          return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
        });
  }

  // Φ(x) through erfc, which keeps its relative accuracy in the left tail.
  register_unary(registry,
                 {.name = "normal_cdf",
                  .formula = "y = Phi(x) = (1 + erf(x / sqrt 2)) / 2; dy/dx = phi(x) = "
                             "e^(-x^2/2) / sqrt(2 pi)",
                  .backward = [](const BackwardCall& c) -> Grads {
                    return {mul(c.grad(), gaussian_pdf(c.inputs[0]))};
                  },
                  .samples = unary_samples(-3.0, 3.0),
                  .errors = unary_errors()},
                 [](auto x, const Attrs&) {
                   using T = decltype(x);
                   return T(0.5) * std::erfc(-x / std::numbers::sqrt2_v<T>);
                 });

  register_unary(registry,
                 {.name = "gelu",
                  .formula = "y = x * Phi(x) = x (1 + erf(x / sqrt 2)) / 2; dy/dx = Phi(x) + x "
                             "phi(x)",
                  .algorithm = A::eltwise_gelu_erf,
                  .backward = [](const BackwardCall& c) -> Grads {
                    return {gelu_grad(c.grad(), c.inputs[0])};
                  },
                  .samples = unary_samples(-3.0, 3.0),
                  .errors = unary_errors()},
                 [](auto x, const Attrs&) {
                   using T = decltype(x);
                   return x * T(0.5) * std::erfc(-x / std::numbers::sqrt2_v<T>);
                 });

  {
    auto exponent = [](double p) { return Attrs{{"exponent", p}}; };
    std::vector<Sample> samples = unary_samples(-2.0, 2.0, 0.0, exponent(2.0));
    samples.push_back(Sample{"cube", {spec({3, 4}, -2.0, 2.0)}, exponent(3.0)});
    samples.push_back(Sample{"square root", {spec({3, 4}, 0.2, 3.0)}, exponent(0.5)});
    samples.push_back(Sample{"fractional", {spec({3, 4}, 0.2, 3.0)}, exponent(2.5)});
    samples.push_back(Sample{"reciprocal", {spec({3, 4}, 0.5, 2.0)}, exponent(-1.0)});
    samples.push_back(Sample{"power 1", {spec({5}, -2.0, 2.0)}, exponent(1.0)});
    samples.push_back(Sample{"power 0", {spec({5}, -2.0, 2.0)}, exponent(0.0)});
    register_unary(registry,
                   {.name = "pow",
                    .formula = "y = x^exponent; dy/dx = exponent * x^(exponent - 1) (x >= 0 for a "
                               "non-integer exponent)",
                    .algorithm = A::eltwise_pow,
                    .params =
                        [](const Attrs& attrs) {
                          return std::pair{1.f, static_cast<float>(attrs.real("exponent"))};
                        },
                    .finite_attrs = {"exponent"},
                    .backward = [](const BackwardCall& c) -> Grads {
                      const double p = c.attrs().real("exponent");
                      Value g = c.grad();
                      // x^0 is constant; p * x^-1 would give 0 * inf = NaN at x = 0.
                      if (p == 0.0) return {mul(g, zero_like(g))};
                      return {mul(g, pow(c.inputs[0], p - 1.0) * p)};
                    },
                    .samples = samples,
                    .errors = {ErrorSample{"integer input",
                                           {InputSpec{{2}, DType::i32}},
                                           exponent(2.0),
                                           "must be f32 or f64"},
                               ErrorSample{"infinite exponent",
                                           {spec({2})},
                                           exponent(std::numeric_limits<double>::infinity()),
                                           "exponent must be finite"}}},
                   [](auto x, const Attrs& attrs) {
                     using T = decltype(x);
                     return std::pow(x, static_cast<T>(attrs.real("exponent")));
                   });
  }

  register_unary(registry,
                 {.name = "sqrt",
                  .formula = "y = sqrt(x) (x >= 0); dy/dx = 1 / (2 y)",
                  .algorithm = A::eltwise_sqrt,
                  .backward = [](const BackwardCall& c) -> Grads {
                    return {div(c.grad(), c.outputs[0] * 2.0)};  // saves the output
                  },
                  .samples = unary_samples(0.2, 3.0),
                  .errors = unary_errors()},
                 [](auto x, const Attrs&) { return std::sqrt(x); });

  register_gelu_grad(registry);
  register_maxout(registry);
  register_where(registry);

  register_extremum(
      registry, "maximum",
      "y = max(a, b) (broadcasting); the gradient goes to a where a >= b, else to b (ties: a)",
      A::binary_max, true, [](auto a, auto b) { return a >= b ? a : b; });
  register_extremum(
      registry, "minimum",
      "y = min(a, b) (broadcasting); the gradient goes to a where a <= b, else to b (ties: a)",
      A::binary_min, false, [](auto a, auto b) { return a <= b ? a : b; });

  register_comparison(registry, "greater", ">", A::binary_gt, A::binary_lt,
                      [](auto a, auto b) { return a > b; });
  register_comparison(registry, "greater_equal", ">=", A::binary_ge, A::binary_le,
                      [](auto a, auto b) { return a >= b; });
  register_comparison(registry, "less", "<", A::binary_lt, A::binary_gt,
                      [](auto a, auto b) { return a < b; });
  register_comparison(registry, "less_equal", "<=", A::binary_le, A::binary_ge,
                      [](auto a, auto b) { return a <= b; });
  register_comparison(registry, "equal", "==", A::binary_eq, A::binary_eq,
                      [](auto a, auto b) { return a == b; });
  register_comparison(registry, "not_equal", "!=", A::binary_ne, A::binary_ne,
                      [](auto a, auto b) { return a != b; });
}

}  // namespace dagrad
