// concat, split, slice, slice_grad, pad, one_hot, argmax; squeeze, unsqueeze and flatten are
// reshape wrappers.
//
// concat, split, slice, slice_grad and pad all copy between a dense tensor and a strided
// window of another one (a "Window"). One reference kernel and one oneDNN kernel (reorders
// whose window side has strides and an offset) serve the five of them; concat uses oneDNN's
// concat primitive instead.
#include "ops/indexing.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <type_traits>

#include "ops/common.hpp"
#include "ops/shape.hpp"
#include "runtime/primitive_kernel.hpp"

namespace dagrad {

namespace {

using Dims = std::vector<std::int64_t>;

// A strided window of a row-major tensor: element i of the window (row-major over `dims`)
// sits at flat index offset + Σ_k index_k · strides[k] of that tensor.
struct Window {
  Shape dims;
  Dims strides;
  std::int64_t offset = 0;
};

// How an op moves data: gather (output k = window k of input 0) or scatter (output 0 filled
// with `fill`, then window k of it = input k).
struct WindowCopy {
  bool scatter = false;
  bool fill_first = false;
  double fill = 0.0;
  std::vector<Window> windows;
};
using WindowFn = std::function<WindowCopy(std::span<const TensorDesc> inputs,
                                          std::span<const TensorDesc> outputs, const Attrs&)>;

std::vector<TensorDesc> descs_of(std::span<const Tensor> tensors) {
  std::vector<TensorDesc> descs;
  for (const auto& t : tensors) descs.push_back(t.desc());
  return descs;
}

int axis_of(const Attrs& attrs, int rank) {
  const std::int64_t axis = attrs.integer("axis");
  return static_cast<int>(axis < 0 ? axis + rank : axis);
}

std::string dims_str(const Dims& dims) {
  return fmt::format("[{}]", fmt::join(dims, ","));
}

ReferenceFn window_reference(WindowFn windows_of) {
  return [windows_of](const KernelCall& call) {
    const auto in = descs_of(call.inputs);
    const auto out = descs_of(call.outputs);
    const WindowCopy copy = windows_of(in, out, call.attrs());
    dispatch_any(call.outputs[0].dtype(), [&](auto zero) {
      using T = decltype(zero);
      if (copy.scatter && copy.fill_first) {
        auto dst = call.outputs[0].span<T>();
        std::fill(dst.begin(), dst.end(), static_cast<T>(copy.fill));
      }
      for (std::size_t k = 0; k < copy.windows.size(); ++k) {
        const Window& w = copy.windows[k];
        BroadcastIndex index(w.dims, w.strides);
        const std::int64_t n = w.dims.numel();
        if (copy.scatter) {
          T* big = call.outputs[0].data<T>();
          const T* small = call.inputs[k].data<T>();
          for (std::int64_t i = 0; i < n; ++i, index.next())
            big[w.offset + index.offset()] = small[i];
        } else {
          const T* big = call.inputs[0].data<T>();
          T* small = call.outputs[k].data<T>();
          for (std::int64_t i = 0; i < n; ++i, index.next())
            small[i] = big[w.offset + index.offset()];
        }
      }
    });
  };
}

// One oneDNN reorder per window; the window side is a memory desc with the window's strides
// and offset0, so the primitive reads or writes the strided region in place.
class WindowReorderKernel final : public Kernel {
 public:
  WindowReorderKernel(WindowCopy copy, const KernelBuild& build) : copy_(std::move(copy)) {
    for (std::size_t k = 0; k < copy_.windows.size(); ++k) {
      const Window& w = copy_.windows[k];
      const DType dtype = build.outputs[0].dtype;
      dnnl::memory::desc window_md(dnnl::memory::dims(w.dims.dims().begin(), w.dims.dims().end()),
                                   to_dnnl(dtype),
                                   dnnl::memory::dims(w.strides.begin(), w.strides.end()));
      window_md.data.offset0 = w.offset;
      const auto dense_md = plain_md(w.dims, dtype);
      const auto& src_md = copy_.scatter ? dense_md : window_md;
      const auto& dst_md = copy_.scatter ? window_md : dense_md;
      dnnl::reorder::primitive_desc pd(build.engine, src_md, build.engine, dst_md);
      reorders_.emplace_back(pd);
      sources_.emplace_back(src_md, build.engine, static_cast<void*>(nullptr));
      destinations_.emplace_back(dst_md, build.engine, static_cast<void*>(nullptr));
    }
  }

  const char* library() const override { return "oneDNN"; }
  void run(const KernelCall& call) override {
    if (copy_.scatter && copy_.fill_first) {
      dispatch_any(call.outputs[0].dtype(), [&](auto zero) {
        using T = decltype(zero);
        auto dst = call.outputs[0].span<T>();
        std::fill(dst.begin(), dst.end(), static_cast<T>(copy_.fill));
      });
    }
    for (std::size_t k = 0; k < reorders_.size(); ++k) {
      const Tensor& src = copy_.scatter ? call.inputs[k] : call.inputs[0];
      const Tensor& dst = copy_.scatter ? call.outputs[0] : call.outputs[k];
      sources_[k].set_data_handle(const_cast<void*>(src.raw()));
      destinations_[k].set_data_handle(const_cast<void*>(dst.raw()));
      reorders_[k].execute(*call.context.stream,
                           {{DNNL_ARG_FROM, sources_[k]}, {DNNL_ARG_TO, destinations_[k]}});
    }
  }

 private:
  WindowCopy copy_;
  std::vector<dnnl::reorder> reorders_;
  std::vector<dnnl::memory> sources_, destinations_;
};

// Scalars, empty windows and negative strides (reversed slices) are left to the reference
// kernel.
KernelFactory window_onednn(WindowFn windows_of) {
  return [windows_of](const KernelBuild& build) -> std::unique_ptr<Kernel> {
    WindowCopy copy = windows_of(build.inputs, build.outputs, build.node.attrs);
    for (const Window& w : copy.windows) {
      if (w.dims.rank() == 0 || w.dims.numel() == 0) return nullptr;
      if (std::any_of(w.strides.begin(), w.strides.end(), [](auto s) { return s < 0; }))
        return nullptr;
    }
    try {
      return std::make_unique<WindowReorderKernel>(std::move(copy), build);
    } catch (const dnnl::error&) {
      return nullptr;  // configuration oneDNN does not implement: use the reference kernel
    }
  };
}

// ---- slice arithmetic ---------------------------------------------------------------------

struct AxisSlice {
  std::int64_t start = 0;
  std::int64_t step = 1;
  std::int64_t count = 0;
};

// Resolves starts/ends/steps against `shape` (see slice() in indexing.hpp); `fail` receives
// the message of the first problem and must throw.
template <class Fail>
std::vector<AxisSlice> resolve_slice(const Shape& shape, const Attrs& attrs, Fail&& fail) {
  const Dims& starts = attrs.integers("starts");
  const Dims& ends = attrs.integers("ends");
  const Dims steps = attrs.has("steps") ? attrs.integers("steps") : Dims{};
  if (starts.size() != ends.size()) {
    fail(fmt::format("{} starts {} but {} ends {}", starts.size(), dims_str(starts), ends.size(),
                     dims_str(ends)));
  }
  if (!steps.empty() && steps.size() != starts.size()) {
    fail(fmt::format("{} steps {} for {} starts", steps.size(), dims_str(steps), starts.size()));
  }
  if (static_cast<int>(starts.size()) > shape.rank()) {
    fail(fmt::format("{} starts given but the input {} has {} axes", starts.size(), shape,
                     shape.rank()));
  }
  std::vector<AxisSlice> result;
  for (int axis = 0; axis < shape.rank(); ++axis) {
    const std::int64_t dim = shape[axis];
    const auto k = static_cast<std::size_t>(axis);
    if (k >= starts.size()) {
      result.push_back({0, 1, dim});
      continue;
    }
    const std::int64_t step = steps.empty() ? 1 : steps[k];
    if (step == 0 || step == std::numeric_limits<std::int64_t>::min()) {
      fail(fmt::format("step {} on axis {} is invalid (must be non-zero)", step, axis));
    }
    std::int64_t start = starts[k];
    if (start < -dim || start >= dim) {
      fail(fmt::format("start {} is out of range for axis {} of size {} in {} (valid: {}..{})",
                       start, axis, dim, shape, -dim, dim - 1));
    }
    if (start < 0) start += dim;
    std::int64_t end = ends[k];
    if (end == slice_to_end) {
      end = step > 0 ? dim : -1;
    } else {
      if (end < -dim || end > dim) {
        fail(fmt::format(
            "end {} is out of range for axis {} of size {} in {} (valid: {}..{}, or slice_to_end)",
            end, axis, dim, shape, -dim, dim));
      }
      if (end < 0) end += dim;
    }
    const std::int64_t count =
        step > 0 ? (end - start + step - 1) / step : (start - end - step - 1) / -step;
    if (count <= 0) {
      fail(fmt::format("selects no element on axis {} of {} (start {}, end {}, step {})", axis,
                       shape, starts[k], ends[k], step));
    }
    result.push_back({start, step, count});
  }
  return result;
}

// Whether slice attrs take axis `axis` whole at any size: not listed, or start 0, step 1 and
// slice_to_end.
bool takes_axis_whole(const Attrs& attrs, int axis) {
  const Dims& starts = attrs.integers("starts");
  const auto k = static_cast<std::size_t>(axis);
  if (k >= starts.size()) return true;
  const Dims steps = attrs.has("steps") ? attrs.integers("steps") : Dims{};
  return starts[k] == 0 && attrs.integers("ends")[k] == slice_to_end &&
         (steps.empty() || steps[k] == 1);
}

// slice_grad's output shape: attrs "shape", where −1 (allowed only on an axis the slice takes
// whole) stands for dy's size on that axis.
template <class Fail>
Shape slice_grad_shape(const Attrs& attrs, const Shape& dy, Fail&& fail) {
  Shape shape(attrs.integers("shape"));
  if (shape.rank() != dy.rank()) {
    fail(fmt::format("shape {} has {} axes but dy {} has {}", shape, shape.rank(), dy, dy.rank()));
  }
  for (int k = 0; k < shape.rank(); ++k) {
    if (shape[k] == -1 && takes_axis_whole(attrs, k)) {
      shape[k] = dy[k];
    } else if (shape[k] <= 0) {
      fail(
          fmt::format("shape {} must have positive dimensions (or -1 on an axis the slice takes "
                      "whole: start 0, slice_to_end, step 1)",
                      Shape(attrs.integers("shape"))));
    }
  }
  return shape;
}

std::vector<AxisSlice> resolved_slice(const Shape& shape, const Attrs& attrs) {
  return resolve_slice(shape, attrs, [](const std::string& message) -> void {
    throw Error(fmt::format("slice: {}", message));
  });
}

Window slice_window(const Shape& big, const std::vector<AxisSlice>& axes) {
  Window w;
  const Dims strides = big.strides();
  Dims dims;
  for (std::size_t k = 0; k < axes.size(); ++k) {
    dims.push_back(axes[k].count);
    w.strides.push_back(strides[k] * axes[k].step);
    w.offset += axes[k].start * strides[k];
  }
  w.dims = Shape(dims);
  return w;
}

Shape slice_shape(const std::vector<AxisSlice>& axes) {
  Dims dims;
  for (const auto& a : axes) dims.push_back(a.count);
  return Shape(dims);
}

// Window of `small` inside `big` at per-axis `offsets` (dense, unit steps).
Window placed_window(const Shape& small, const Shape& big, const Dims& offsets) {
  Window w{small, big.strides(), 0};
  for (std::size_t k = 0; k < offsets.size(); ++k) w.offset += offsets[k] * w.strides[k];
  return w;
}

// Offsets along `axis` of consecutive pieces of the given shapes.
Dims piece_offsets(std::span<const TensorDesc> pieces, int axis) {
  Dims offsets;
  std::int64_t offset = 0;
  for (const auto& p : pieces) {
    offsets.push_back(offset);
    offset += p.shape[axis];
  }
  return offsets;
}

// Windows of the pieces (inputs of concat, outputs of split) inside the joined tensor.
std::vector<Window> piece_windows(std::span<const TensorDesc> pieces, const Shape& joined,
                                  int axis) {
  std::vector<Window> windows;
  const Dims offsets = piece_offsets(pieces, axis);
  for (std::size_t k = 0; k < pieces.size(); ++k) {
    Dims at(static_cast<std::size_t>(joined.rank()), 0);
    at[static_cast<std::size_t>(axis)] = offsets[k];
    windows.push_back(placed_window(pieces[k].shape, joined, at));
  }
  return windows;
}

// The steps of a slice attribute set (absent: all 1, like an empty list).
Dims steps_of(const Attrs& attrs) {
  return attrs.has("steps") ? attrs.integers("steps") : Dims{};
}

Attrs slice_attrs(Dims starts, Dims ends, Dims steps) {
  return {{"starts", std::move(starts)}, {"ends", std::move(ends)}, {"steps", std::move(steps)}};
}

InputSpec exact(Shape shape, std::vector<double> values,
                std::optional<DType> dtype = std::nullopt) {
  InputSpec s = spec(std::move(shape));
  s.dtype = dtype;
  s.values = std::move(values);
  if (dtype && !is_floating(*dtype)) s.differentiable = false;
  return s;
}

template <class T>
bool is_nan(T v) {
  if constexpr (std::is_floating_point_v<T>) {
    return std::isnan(v);
  } else {
    return false;
  }
}

DType parse_dtype(const ShapeCall& call, const std::string& name) {
  for (DType d : {DType::f32, DType::f64, DType::i32}) {
    if (to_string(d) == name) return d;
  }
  call.fail("unknown dtype \"{}\" (expected f32, f64 or i32)", name);
}

// ---- registrations ------------------------------------------------------------------------

void register_concat(OpRegistry& registry) {
  OpDef def;
  def.name = "concat";
  def.formula = "y[..., offset_k + i, ...] = x_k[..., i, ...] along `axis`";
  def.min_inputs = 1;
  def.max_inputs = -1;
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    require_same_dtype(call);
    const TensorDesc& first = call.inputs[0];
    if (first.shape.rank() == 0) call.fail("cannot concatenate scalars (input 0 is {})", first);
    const int axis = normalize_axis(call.attrs.integer("axis"), first.shape.rank(), call.site);
    Shape joined = first.shape;
    for (std::size_t k = 1; k < call.inputs.size(); ++k) {
      const Shape& s = call.inputs[k].shape;
      bool same = s.rank() == first.shape.rank();
      for (int i = 0; same && i < s.rank(); ++i) same = i == axis || s[i] == first.shape[i];
      if (!same) {
        call.fail("input {} {} does not match input 0 {} outside axis {}", k, call.inputs[k], first,
                  axis);
      }
      joined[axis] += s[axis];
    }
    return {TensorDesc{first.dtype, joined}};
  };
  // The gradient of each input is its slice of dy. The other axes run to their end rather than
  // to the declared size, so that the gradient graph also holds when a plan runs with another
  // batch size (an input declared batch_dynamic).
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    const Value g = c.grad();
    const int axis = axis_of(c.attrs(), g.rank());
    if (axis == 0 && c.inputs.size() > 1) {
      // Along the batch axis the pieces' sizes are the inputs' own at run time: split_as reads
      // them (the inputs then live until the backward).
      std::vector<Value> pieces =
          split_as(g, std::vector<Value>(c.inputs.begin(), c.inputs.end()), 0);
      std::vector<std::optional<Value>> grads;
      for (std::size_t k = 0; k < pieces.size(); ++k) {
        grads.push_back(c.needs[k] ? std::optional<Value>(pieces[k]) : std::nullopt);
      }
      return grads;
    }
    std::vector<TensorDesc> pieces;
    for (const auto& x : c.inputs) pieces.push_back(x.desc());
    const Dims offsets = piece_offsets(pieces, axis);
    std::vector<std::optional<Value>> grads;
    for (std::size_t k = 0; k < c.inputs.size(); ++k) {
      if (!c.needs[k]) {
        grads.emplace_back();
        continue;
      }
      Dims starts(static_cast<std::size_t>(g.rank()), 0);
      Dims ends(static_cast<std::size_t>(g.rank()), slice_to_end);
      starts[static_cast<std::size_t>(axis)] = offsets[k];
      ends[static_cast<std::size_t>(axis)] = offsets[k] + c.inputs[k].shape()[axis];
      grads.emplace_back(slice(g, starts, ends));
    }
    return grads;
  };
  def.second_order = true;
  def.reference = window_reference([](auto inputs, auto outputs, const Attrs& attrs) {
    const Shape& joined = outputs[0].shape;
    return WindowCopy{true, false, 0.0,
                      piece_windows(inputs, joined, axis_of(attrs, joined.rank()))};
  });
  def.onednn = [](const KernelBuild& build) -> std::unique_ptr<Kernel> {
    for (const auto& in : build.inputs) {
      if (in.numel() == 0) return nullptr;  // empty pieces: the reference kernel
    }
    const auto dst_md = plain_md(build.outputs[0]);
    std::vector<dnnl::memory::desc> src_mds;
    std::vector<PrimitiveArg> args;
    for (std::size_t k = 0; k < build.inputs.size(); ++k) {
      src_mds.push_back(plain_md(build.inputs[k]));
      args.push_back(input_arg(DNNL_ARG_MULTIPLE_SRC + static_cast<int>(k), static_cast<int>(k),
                               src_mds.back()));
    }
    args.push_back(output_arg(DNNL_ARG_DST, 0, dst_md));
    try {
      dnnl::concat::primitive_desc pd(
          dst_md, axis_of(build.node.attrs, build.outputs[0].shape.rank()), src_mds, build.engine);
      return std::make_unique<PrimitiveKernel>(dnnl::concat(pd), std::move(args));
    } catch (const dnnl::error&) {
      return nullptr;
    }
  };
  def.samples = [] {
    return std::vector<Sample>{
        {"three inputs on axis 1",
         {spec({2, 3}), spec({2, 1}), spec({2, 2})},
         {{"axis", std::int64_t{1}}}},
        {"rows", {spec({1, 4}), spec({3, 4})}, {{"axis", std::int64_t{0}}}},
        {"negative axis", {spec({2, 2, 3}), spec({2, 2, 1})}, {{"axis", std::int64_t{-1}}}},
        {"middle axis", {spec({2, 1, 3}), spec({2, 3, 3})}, {{"axis", std::int64_t{1}}}},
        {"single input", {spec({3})}, {{"axis", std::int64_t{0}}}},
        {"integers",
         {InputSpec{{2, 2}, DType::i32, -5, 5, 0, false},
          InputSpec{{1, 2}, DType::i32, -5, 5, 0, false}},
         {{"axis", std::int64_t{0}}}}};
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{{"mismatched shapes",
                                     {spec({2, 3}), spec({3, 3})},
                                     {{"axis", std::int64_t{1}}},
                                     "does not match input 0"},
                                    {"ranks differ",
                                     {spec({2, 3}), spec({2})},
                                     {{"axis", std::int64_t{0}}},
                                     "does not match input 0"},
                                    {"axis out of range",
                                     {spec({2, 3}), spec({2, 3})},
                                     {{"axis", std::int64_t{2}}},
                                     "out of range"},
                                    {"scalars",
                                     {spec({}), spec({})},
                                     {{"axis", std::int64_t{0}}},
                                     "cannot concatenate scalars"},
                                    {"dtypes differ",
                                     {spec({2}), InputSpec{{2}, DType::i32}},
                                     {{"axis", std::int64_t{0}}},
                                     "different dtypes"}};
  };
  registry.add(std::move(def));
}

// split's and split_as's backward and kernels: x's gradient is the concat of the pieces'
// gradients (zeros for pieces that do not reach the loss); split_as's likes get none. The
// pieces are windows of x.
void set_split_rules(OpDef& def) {
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    std::vector<Value> grads;
    for (std::size_t k = 0; k < c.outputs.size(); ++k) grads.push_back(c.grad(static_cast<int>(k)));
    std::vector<std::optional<Value>> result{concat(grads, c.attrs().integer("axis"))};
    result.resize(c.inputs.size());
    return result;
  };
  def.second_order = true;
  WindowFn windows_of = [](auto inputs, auto outputs, const Attrs& attrs) {
    const Shape& joined = inputs[0].shape;
    return WindowCopy{false, false, 0.0,
                      piece_windows(outputs, joined, axis_of(attrs, joined.rank()))};
  };
  def.reference = window_reference(windows_of);
  def.onednn = window_onednn(windows_of);
}

void register_split(OpRegistry& registry) {
  OpDef def;
  def.name = "split";
  def.formula = "out_k[..., i, ...] = x[..., offset_k + i, ...] along `axis`, sizes given";
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    const TensorDesc& in = call.inputs[0];
    if (in.shape.rank() == 0) call.fail("cannot split a scalar ({})", in);
    const int axis = normalize_axis(call.attrs.integer("axis"), in.shape.rank(), call.site);
    const Dims& sizes = call.attrs.integers("sizes");
    if (sizes.empty()) call.fail("no sizes given");
    std::int64_t total = 0;
    std::vector<TensorDesc> outputs;
    for (auto size : sizes) {
      if (size <= 0) call.fail("sizes {} must all be positive", dims_str(sizes));
      total += size;
      Shape piece = in.shape;
      piece[axis] = size;
      outputs.push_back(TensorDesc{in.dtype, piece});
    }
    if (total != in.shape[axis]) {
      call.fail("sizes {} sum to {}, but axis {} of {} has length {}", dims_str(sizes), total, axis,
                in, in.shape[axis]);
    }
    return outputs;
  };
  set_split_rules(def);
  def.samples = [] {
    return std::vector<Sample>{
        {"three pieces", {spec({5, 2})}, {{"sizes", Dims{2, 1, 2}}, {"axis", std::int64_t{0}}}},
        {"last axis", {spec({2, 3, 4})}, {{"sizes", Dims{1, 3}}, {"axis", std::int64_t{-1}}}},
        {"one piece", {spec({3})}, {{"sizes", Dims{3}}, {"axis", std::int64_t{0}}}}};
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{{"sizes do not sum",
                                     {spec({5, 2})},
                                     {{"sizes", Dims{2, 2}}, {"axis", std::int64_t{0}}},
                                     "sum to 4"},
                                    {"zero size",
                                     {spec({5, 2})},
                                     {{"sizes", Dims{0, 5}}, {"axis", std::int64_t{0}}},
                                     "must all be positive"},
                                    {"axis out of range",
                                     {spec({5, 2})},
                                     {{"sizes", Dims{5}}, {"axis", std::int64_t{3}}},
                                     "out of range"}};
  };
  registry.add(std::move(def));
}

void register_split_as(OpRegistry& registry) {
  OpDef def;
  def.name = "split_as";
  def.formula =
      "out_k[..., i, ...] = x[..., offset_k + i, ...] along `axis`, out_k sized as like_k";
  def.min_inputs = 2;
  def.max_inputs = -1;
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    const TensorDesc& in = call.inputs[0];
    if (in.shape.rank() == 0) call.fail("cannot split a scalar ({})", in);
    const int axis = normalize_axis(call.attrs.integer("axis"), in.shape.rank(), call.site);
    std::int64_t total = 0;
    std::vector<TensorDesc> outputs;
    for (std::size_t k = 1; k < call.inputs.size(); ++k) {
      const TensorDesc& like = call.inputs[k];
      if (like.shape.rank() != in.shape.rank()) {
        call.fail("like {} {} has {} axes, x {} has {}", k - 1, like, like.shape.rank(), in,
                  in.shape.rank());
      }
      total += like.shape[axis];
      Shape piece = in.shape;
      piece[axis] = like.shape[axis];
      outputs.push_back(TensorDesc{in.dtype, piece});
    }
    if (total != in.shape[axis]) {
      call.fail("the likes' sizes on axis {} sum to {}, but x {} has {}", axis, total, in,
                in.shape[axis]);
    }
    return outputs;
  };
  set_split_rules(def);  // the likes only give sizes: no gradient
  def.samples = [] {
    auto like = [](Shape shape) {
      return InputSpec{std::move(shape), std::nullopt, -1, 1, 0, false};
    };
    return std::vector<Sample>{
        {"batch axis", {spec({5, 2}), like({2, 2}), like({3, 2})}, {{"axis", std::int64_t{0}}}},
        {"last axis",
         {spec({2, 3, 4}), like({2, 3, 1}), like({7, 1, 3})},
         {{"axis", std::int64_t{-1}}}}};
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{
        {"sizes do not sum",
         {spec({5, 2}), spec({2, 2}), spec({2, 2})},
         {{"axis", std::int64_t{0}}},
         "sum to 4"},
        {"rank differs", {spec({5, 2}), spec({5})}, {{"axis", std::int64_t{0}}}, "has 1 axes"}};
  };
  registry.add(std::move(def));
}

void register_slice(OpRegistry& registry) {
  OpDef def;
  def.name = "slice";
  def.formula = "y[i_0, ...] = x[start_0 + i_0 * step_0, ...] (NumPy basic slicing)";
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    const TensorDesc& in = call.inputs[0];
    auto axes =
        resolve_slice(in.shape, call.attrs, [&](const std::string& m) { call.fail("{}", m); });
    return {TensorDesc{in.dtype, slice_shape(axes)}};
  };
  // With unit steps the gradient is dy padded with zeros back to x's shape: pad takes its size
  // from dy, so the gradient graph also holds when a plan runs with another batch size (an
  // input declared batch_dynamic, sliced over its whole batch). Other steps scatter dy into
  // zeros of x's shape (slice_grad), whose axes taken whole (the batch, usually) take their
  // size from dy (−1 in slice_grad's shape) for the same reason. A slice of axis 0 itself that
  // is not whole gives slice_grad x as its shape (its `like` input: x then lives until the
  // backward, so that the gradient follows x's batch size too).
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    const Attrs& a = c.attrs();
    const Shape& shape = c.inputs[0].shape();
    const std::vector<AxisSlice> axes = resolved_slice(shape, a);
    if (std::all_of(axes.begin(), axes.end(), [](const AxisSlice& s) { return s.step == 1; })) {
      Dims before, after;
      for (int k = 0; k < shape.rank(); ++k) {
        const AxisSlice& s = axes[static_cast<std::size_t>(k)];
        before.push_back(s.start);
        after.push_back(shape[k] - s.start - s.count);
      }
      return {pad(c.grad(), before, after, 0.0)};
    }
    if (shape.rank() > 0 && !takes_axis_whole(a, 0)) {
      return {
          slice_grad(c.grad(), c.inputs[0], a.integers("starts"), a.integers("ends"), steps_of(a))};
    }
    Dims dims = shape.dims();
    for (int k = 0; k < shape.rank(); ++k) {
      if (takes_axis_whole(a, k)) dims[static_cast<std::size_t>(k)] = -1;
    }
    return {slice_grad(c.grad(), Shape(std::move(dims)), a.integers("starts"), a.integers("ends"),
                       steps_of(a))};
  };
  def.second_order = true;
  WindowFn windows_of = [](auto inputs, auto, const Attrs& attrs) {
    const Shape& big = inputs[0].shape;
    return WindowCopy{false, false, 0.0, {slice_window(big, resolved_slice(big, attrs))}};
  };
  def.reference = window_reference(windows_of);
  def.onednn = window_onednn(windows_of);
  def.samples = [] {
    return std::vector<Sample>{
        {"negative indices and steps",
         {spec({5, 6})},
         slice_attrs({-4, 1}, {slice_to_end, -1}, {2, 1})},
        {"reversed rows", {spec({4, 3})}, slice_attrs({3, 0}, {slice_to_end, 3}, {-1, 1})},
        {"leading axis only", {spec({3, 4, 2})}, slice_attrs({1}, {3}, {})},
        {"step past the end", {spec({7})}, slice_attrs({0}, {7}, {3})},
        {"integers",
         {InputSpec{{3, 4}, DType::i32, -9, 9, 0, false}},
         slice_attrs({1, -3}, {3, slice_to_end}, {1, 2})}};
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{
        {"start out of range",
         {spec({4})},
         slice_attrs({4}, {slice_to_end}, {}),
         "start 4 is out of range"},
        {"end out of range", {spec({4})}, slice_attrs({0}, {6}, {}), "end 6 is out of range"},
        {"empty", {spec({4})}, slice_attrs({2}, {1}, {}), "selects no element"},
        {"zero step", {spec({4})}, slice_attrs({0}, {4}, {0}), "step 0"},
        {"too many axes", {spec({4})}, slice_attrs({0, 0}, {1, 1}, {}), "has 1 axes"},
        {"lengths differ", {spec({4, 4})}, slice_attrs({0, 0}, {1}, {}), "2 starts"}};
  };
  registry.add(std::move(def));
}

void register_slice_grad(OpRegistry& registry) {
  OpDef def;
  def.name = "slice_grad";
  def.formula =
      "zeros of `shape` with y[start_0 + i_0 * step_0, ...] = dy[i_0, ...] (slice's backward)";
  def.max_inputs = 2;
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    const TensorDesc& dy = call.inputs[0];
    const Shape shape = call.inputs.size() == 2
                            ? call.inputs[1].shape
                            : slice_grad_shape(call.attrs, dy.shape,
                                               [&](const std::string& m) { call.fail("{}", m); });
    auto axes = resolve_slice(shape, call.attrs, [&](const std::string& m) { call.fail("{}", m); });
    if (slice_shape(axes) != dy.shape) {
      call.fail("dy {} does not match the slice {} of {}", dy, slice_shape(axes), shape);
    }
    return {TensorDesc{dy.dtype, shape}};
  };
  // The shape-giving input (`like`) has no gradient: only its shape is read.
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    const Attrs& a = c.attrs();
    std::vector<std::optional<Value>> grads{
        slice(c.grad(), a.integers("starts"), a.integers("ends"), steps_of(a))};
    if (c.inputs.size() == 2) grads.emplace_back();
    return grads;
  };
  def.second_order = true;
  WindowFn windows_of = [](auto, auto outputs, const Attrs& attrs) {
    const Shape& big = outputs[0].shape;
    return WindowCopy{true, true, 0.0, {slice_window(big, resolved_slice(big, attrs))}};
  };
  def.reference = window_reference(windows_of);
  def.onednn = window_onednn(windows_of);
  def.samples = [] {
    auto with_shape = [](Attrs attrs, Dims shape) {
      attrs.set("shape", std::move(shape));
      return attrs;
    };
    return std::vector<Sample>{
        {"strided",
         {spec({2, 4})},
         with_shape(slice_attrs({-4, 1}, {slice_to_end, -1}, {2, 1}), {5, 6})},
        {"reversed rows",
         {spec({4, 3})},
         with_shape(slice_attrs({3, 0}, {slice_to_end, 3}, {-1, 1}), {4, 3})},
        {"leading axis only", {spec({2, 4, 2})}, with_shape(slice_attrs({1}, {3}, {}), {3, 4, 2})},
        {"whole axes sized by dy",
         {spec({3, 2, 2})},
         with_shape(slice_attrs({0, 1}, {slice_to_end, slice_to_end}, {1, 2}), {-1, 4, -1})},
        {"shaped like an input",
         {spec({2, 3}), InputSpec{{5, 3}, std::nullopt, -1, 1, 0, false}},
         slice_attrs({1}, {slice_to_end}, {2})}};
  };
  def.error_samples = [] {
    Attrs attrs = slice_attrs({0}, {2}, {});
    attrs.set("shape", Dims{4});
    Attrs partial = slice_attrs({1, 0}, {slice_to_end, 4}, {1, 2});
    partial.set("shape", Dims{-1, 4});
    return std::vector<ErrorSample>{
        {"dy of the wrong shape", {spec({3})}, attrs, "does not match the slice"},
        {"dy of the wrong shape for `like`",
         {spec({3}), spec({5})},
         slice_attrs({1}, {slice_to_end}, {2}),
         "does not match the slice [2] of [5]"},
        {"-1 on an axis not taken whole", {spec({2, 2})}, partial, "or -1 on an axis"}};
  };
  registry.add(std::move(def));
}

void register_pad(OpRegistry& registry) {
  OpDef def;
  def.name = "pad";
  def.formula = "y = value, except y[before_0 + i_0, ...] = x[i_0, ...]";
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    const TensorDesc& in = call.inputs[0];
    const Dims& before = call.attrs.integers("before");
    const Dims& after = call.attrs.integers("after");
    const auto rank = static_cast<std::size_t>(in.shape.rank());
    if (before.size() != rank || after.size() != rank) {
      call.fail("before {} and after {} need one entry per axis, the input {} has {} axes",
                dims_str(before), dims_str(after), in, rank);
    }
    Shape out = in.shape;
    for (std::size_t k = 0; k < rank; ++k) {
      if (before[k] < 0 || after[k] < 0) {
        call.fail("padding must not be negative (before {}, after {})", dims_str(before),
                  dims_str(after));
      }
      out[static_cast<int>(k)] += before[k] + after[k];
    }
    return {TensorDesc{in.dtype, out}};
  };
  // The gradient is the window of dy where x was copied; the padding value has none. Its ends
  // count from dy's end (−after, or to the end), so that the gradient graph also holds when a
  // plan runs with another batch size (an input declared batch_dynamic).
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    const Dims& before = c.attrs().integers("before");
    const Dims& after = c.attrs().integers("after");
    Dims ends;
    for (std::int64_t a : after) ends.push_back(a > 0 ? -a : slice_to_end);
    return {slice(c.grad(), before, ends)};
  };
  def.second_order = true;
  WindowFn windows_of = [](auto inputs, auto outputs, const Attrs& attrs) {
    return WindowCopy{true,
                      true,
                      attrs.real_or("value", 0.0),
                      {placed_window(inputs[0].shape, outputs[0].shape, attrs.integers("before"))}};
  };
  def.reference = window_reference(windows_of);
  def.onednn = window_onednn(windows_of);
  def.samples = [] {
    return std::vector<Sample>{
        {"both sides",
         {spec({2, 3})},
         {{"before", Dims{1, 0}}, {"after", Dims{2, 1}}, {"value", 0.0}}},
        {"value", {spec({3})}, {{"before", Dims{2}}, {"after", Dims{0}}, {"value", 1.5}}},
        {"rank 3",
         {spec({1, 2, 2})},
         {{"before", Dims{0, 1, 1}}, {"after", Dims{1, 0, 1}}, {"value", -1.0}}},
        {"integers",
         {InputSpec{{2, 2}, DType::i32, -9, 9, 0, false}},
         {{"before", Dims{1, 0}}, {"after", Dims{0, 2}}, {"value", 7.0}}}};
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{{"negative padding",
                                     {spec({3})},
                                     {{"before", Dims{-1}}, {"after", Dims{0}}, {"value", 0.0}},
                                     "must not be negative"},
                                    {"wrong length",
                                     {spec({2, 3})},
                                     {{"before", Dims{1}}, {"after", Dims{1}}, {"value", 0.0}},
                                     "one entry per axis"}};
  };
  registry.add(std::move(def));
}

void register_one_hot(OpRegistry& registry) {
  OpDef def;
  def.name = "one_hot";
  def.formula = "y[..., c] = 1 if labels[...] == c else 0";
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    const TensorDesc& labels = call.inputs[0];
    if (labels.dtype != DType::i32) call.fail("labels must be i32, got {}", labels);
    const std::int64_t classes = call.attrs.integer("classes");
    if (classes <= 0) call.fail("classes must be positive, got {}", classes);
    Dims dims = labels.shape.dims();
    dims.push_back(classes);
    return {TensorDesc{parse_dtype(call, call.attrs.text("dtype")), Shape(dims)}};
  };
  def.no_gradient = "labels are integers; one_hot has no gradient";
  def.reference = [](const KernelCall& call) {
    const Tensor& labels = call.inputs[0];
    const std::int64_t classes = call.attrs().integer("classes");
    const std::int32_t* label = labels.data<std::int32_t>();
    for (std::int64_t i = 0; i < labels.numel(); ++i) {
      if (label[i] < 0 || label[i] >= classes) {
        Dims index(static_cast<std::size_t>(labels.shape().rank()));
        for (std::int64_t rest = i, k = labels.shape().rank() - 1; k >= 0; --k) {
          index[static_cast<std::size_t>(k)] = rest % labels.shape()[static_cast<int>(k)];
          rest /= labels.shape()[static_cast<int>(k)];
        }
        throw Error(fmt::format("{}: label {} at position {} of labels {} is outside [0, {})",
                                call.node.site(), label[i], dims_str(index), labels.shape(),
                                classes));
      }
    }
    dispatch_any(call.outputs[0].dtype(), [&](auto zero) {
      using T = decltype(zero);
      T* y = call.outputs[0].data<T>();
      std::fill(y, y + call.outputs[0].numel(), T(0));
      for (std::int64_t i = 0; i < labels.numel(); ++i) y[i * classes + label[i]] = T(1);
    });
  };
  def.samples = [] {
    return std::vector<Sample>{
        {"vector", {labels({4}, 3)}, {{"classes", std::int64_t{3}}, {"dtype", std::string("f32")}}},
        {"matrix in f64",
         {labels({2, 3}, 5)},
         {{"classes", std::int64_t{5}}, {"dtype", std::string("f64")}}},
        {"integers",
         {labels({3}, 2)},
         {{"classes", std::int64_t{2}}, {"dtype", std::string("i32")}}}};
  };
  def.error_samples = [] {
    Attrs three{{"classes", std::int64_t{3}}, {"dtype", std::string("f32")}};
    ErrorSample too_big{
        "label too large", {exact({3}, {0, 3, 1}, DType::i32)}, three, "label 3 at position [1]"};
    too_big.at_run = true;
    ErrorSample negative{"negative label",
                         {exact({2, 2}, {0, 1, 2, -1}, DType::i32)},
                         three,
                         "label -1 at position [1,1]"};
    negative.at_run = true;
    return std::vector<ErrorSample>{too_big,
                                    negative,
                                    {"floating labels", {spec({3})}, three, "labels must be i32"},
                                    {"no classes",
                                     {labels({3}, 2)},
                                     {{"classes", std::int64_t{0}}, {"dtype", std::string("f32")}},
                                     "classes must be positive"},
                                    {"unknown dtype",
                                     {labels({3}, 2)},
                                     {{"classes", std::int64_t{2}}, {"dtype", std::string("f16")}},
                                     "unknown dtype"}};
  };
  registry.add(std::move(def));
}

void register_argmax(OpRegistry& registry) {
  OpDef def;
  def.name = "argmax";
  def.formula = "y = index of the largest x along `axis` (first index on ties; a NaN is largest)";
  def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
    const TensorDesc& in = call.inputs[0];
    const int axis = normalize_axis(call.attrs.integer("axis"), in.shape.rank(), call.site);
    if (in.shape[axis] == 0) call.fail("axis {} of {} is empty", axis, in);
    Dims dims = in.shape.dims();
    if (call.attrs.boolean_or("keepdims", false)) {
      dims[static_cast<std::size_t>(axis)] = 1;
    } else {
      dims.erase(dims.begin() + axis);
    }
    return {TensorDesc{DType::i32, Shape(dims)}};
  };
  def.no_gradient = "argmax returns integer indices; it is piecewise constant with no gradient";
  def.reference = [](const KernelCall& call) {
    const Tensor& x = call.inputs[0];
    const int axis = axis_of(call.attrs(), x.shape().rank());
    std::int64_t outer = 1, inner = 1;
    for (int k = 0; k < axis; ++k) outer *= x.shape()[k];
    for (int k = axis + 1; k < x.shape().rank(); ++k) inner *= x.shape()[k];
    const std::int64_t n = x.shape()[axis];
    std::int32_t* y = call.outputs[0].data<std::int32_t>();
    dispatch_any(x.dtype(), [&](auto zero) {
      using T = decltype(zero);
      const T* src = x.data<T>();
      for (std::int64_t o = 0; o < outer; ++o) {
        for (std::int64_t i = 0; i < inner; ++i) {
          const T* line = src + o * n * inner + i;
          std::int64_t best = 0;
          for (std::int64_t j = 1; j < n && !is_nan(line[best * inner]); ++j) {
            const T v = line[j * inner];
            if (v > line[best * inner] || is_nan(v)) best = j;
          }
          y[o * inner + i] = static_cast<std::int32_t>(best);
        }
      }
    });
  };
  def.samples = [] {
    return std::vector<Sample>{
        {"rows", {spec({3, 4})}, {{"axis", std::int64_t{1}}, {"keepdims", false}}},
        {"columns kept", {spec({3, 4})}, {{"axis", std::int64_t{0}}, {"keepdims", true}}},
        {"ties",
         {exact({2, 3}, {1, 3, 3, 2, 2, 1})},
         {{"axis", std::int64_t{-1}}, {"keepdims", false}}},
        {"integers",
         {InputSpec{{4, 2}, DType::i32, -5, 5, 0, false}},
         {{"axis", std::int64_t{0}}, {"keepdims", false}}}};
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{
        {"axis out of range",
         {spec({3, 4})},
         {{"axis", std::int64_t{2}}, {"keepdims", false}},
         "out of range"},
        {"scalar", {spec({})}, {{"axis", std::int64_t{0}}, {"keepdims", false}}, "out of range"}};
  };
  registry.add(std::move(def));
}

std::string value_site(std::string_view op, const Value& x, const std::source_location& where) {
  return fmt::format("{} of \"{}\" (built at {}:{})", op, x.str(),
                     std::filesystem::path(where.file_name()).filename().string(), where.line());
}

}  // namespace

// ---- builders -----------------------------------------------------------------------------

Value concat(std::vector<Value> xs, std::int64_t axis, std::source_location where) {
  if (xs.empty()) throw GraphError("concat: no inputs given");
  for (const auto& x : xs) {
    if (!x.valid()) throw GraphError("concat: an input is an empty Value");
  }
  Graph& graph = xs[0].graph();
  return graph.apply("concat", std::move(xs), {{"axis", axis}}, where);
}

std::vector<Value> split(const Value& x, std::vector<std::int64_t> sizes, std::int64_t axis,
                         std::source_location where) {
  if (!x.valid()) throw GraphError("split: the input is an empty Value");
  return x.graph().add_node("split", {x}, {{"sizes", std::move(sizes)}, {"axis", axis}}, where);
}

Value slice(const Value& x, std::vector<std::int64_t> starts, std::vector<std::int64_t> ends,
            std::vector<std::int64_t> steps, std::source_location where) {
  if (!x.valid()) throw GraphError("slice: the input is an empty Value");
  return x.graph().apply("slice", {x},
                         slice_attrs(std::move(starts), std::move(ends), std::move(steps)), where);
}

Value slice_grad(const Value& dy, const Shape& shape, std::vector<std::int64_t> starts,
                 std::vector<std::int64_t> ends, std::vector<std::int64_t> steps,
                 std::source_location where) {
  if (!dy.valid()) throw GraphError("slice_grad: the input is an empty Value");
  Attrs attrs = slice_attrs(std::move(starts), std::move(ends), std::move(steps));
  attrs.set("shape", shape.dims());
  return dy.graph().apply("slice_grad", {dy}, std::move(attrs), where);
}

Value slice_grad(const Value& dy, const Value& like, std::vector<std::int64_t> starts,
                 std::vector<std::int64_t> ends, std::vector<std::int64_t> steps,
                 std::source_location where) {
  if (!dy.valid() || !like.valid()) throw GraphError("slice_grad: an input is an empty Value");
  return dy.graph().apply("slice_grad", {dy, like},
                          slice_attrs(std::move(starts), std::move(ends), std::move(steps)), where);
}

std::vector<Value> split_as(const Value& x, const std::vector<Value>& likes, std::int64_t axis,
                            std::source_location where) {
  if (!x.valid()) throw GraphError("split_as: the input is an empty Value");
  std::vector<Value> inputs{x};
  for (const Value& like : likes) {
    if (!like.valid()) throw GraphError("split_as: a `likes` entry is an empty Value");
    inputs.push_back(like);
  }
  return x.graph().add_node("split_as", std::move(inputs), {{"axis", axis}}, where);
}

Value pad(const Value& x, std::vector<std::int64_t> before, std::vector<std::int64_t> after,
          double value, std::source_location where) {
  if (!x.valid()) throw GraphError("pad: the input is an empty Value");
  return x.graph().apply(
      "pad", {x}, {{"before", std::move(before)}, {"after", std::move(after)}, {"value", value}},
      where);
}

Value squeeze(const Value& x, std::vector<std::int64_t> axes, std::source_location where) {
  if (!x.valid()) throw GraphError("squeeze: the input is an empty Value");
  const Shape& shape = x.shape();
  const std::string site = value_site("squeeze", x, where);
  std::vector<bool> drop(static_cast<std::size_t>(shape.rank()), false);
  for (auto axis : axes) {
    const int a = normalize_axis(axis, shape.rank(), site);
    if (drop[static_cast<std::size_t>(a)])
      throw ShapeError(fmt::format("{}: axis {} listed twice", site, axis));
    if (shape[a] != 1) {
      throw ShapeError(fmt::format("{}: axis {} of {} has size {}; only size-1 axes can be removed",
                                   site, axis, shape, shape[a]));
    }
    drop[static_cast<std::size_t>(a)] = true;
  }
  Dims dims;
  for (int a = 0; a < shape.rank(); ++a) {
    const bool removed = axes.empty() ? shape[a] == 1 : drop[static_cast<std::size_t>(a)];
    if (!removed) dims.push_back(shape[a]);
  }
  return reshape(x, Shape(dims), where);
}

Value unsqueeze(const Value& x, std::vector<std::int64_t> axes, std::source_location where) {
  if (!x.valid()) throw GraphError("unsqueeze: the input is an empty Value");
  const Shape& shape = x.shape();
  const std::string site = value_site("unsqueeze", x, where);
  const int rank = shape.rank() + static_cast<int>(axes.size());
  std::vector<bool> inserted(static_cast<std::size_t>(rank), false);
  for (auto axis : axes) {
    const int a = normalize_axis(axis, rank, site);
    if (inserted[static_cast<std::size_t>(a)])
      throw ShapeError(fmt::format("{}: axis {} listed twice", site, axis));
    inserted[static_cast<std::size_t>(a)] = true;
  }
  Dims dims;
  int next = 0;
  for (int a = 0; a < rank; ++a)
    dims.push_back(inserted[static_cast<std::size_t>(a)] ? 1 : shape[next++]);
  return reshape(x, Shape(dims), where);
}

Value flatten(const Value& x, std::int64_t start_axis, std::source_location where) {
  if (!x.valid()) throw GraphError("flatten: the input is an empty Value");
  const Shape& shape = x.shape();
  const int start = normalize_axis(start_axis, shape.rank(), value_site("flatten", x, where));
  Dims dims(shape.dims().begin(), shape.dims().begin() + start);
  std::int64_t merged = 1;
  for (int a = start; a < shape.rank(); ++a) merged *= shape[a];
  dims.push_back(merged);
  // Flattening from axis 1 keeps the batch symbolic (-1), so plans can change batch size.
  if (start == 1 && merged > 0) dims[0] = -1;
  return reshape(x, Shape(dims), where);
}

Value one_hot(const Value& labels, std::int64_t classes, DType dtype, std::source_location where) {
  if (!labels.valid()) throw GraphError("one_hot: the input is an empty Value");
  return labels.graph().apply(
      "one_hot", {labels}, {{"classes", classes}, {"dtype", std::string(to_string(dtype))}}, where);
}

Value argmax(const Value& x, std::int64_t axis, bool keepdims, std::source_location where) {
  if (!x.valid()) throw GraphError("argmax: the input is an empty Value");
  return x.graph().apply("argmax", {x}, {{"axis", axis}, {"keepdims", keepdims}}, where);
}

void register_indexing_ops(OpRegistry& registry) {
  register_concat(registry);
  register_split(registry);
  register_split_as(registry);
  register_slice(registry);
  register_slice_grad(registry);
  register_pad(registry);
  register_one_hot(registry);
  register_argmax(registry);
}

}  // namespace dagrad
