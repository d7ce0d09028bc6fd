// reshape, broadcast_to, transpose, stop_gradient.
#include "ops/shape.hpp"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "ops/common.hpp"
#include "ops/reduction.hpp"
#include "runtime/primitive_kernel.hpp"

namespace dagrad {

namespace {

void copy_kernel(const KernelCall& call) {
  if (call.outputs[0].raw() != call.inputs[0].raw() && call.inputs[0].bytes() > 0) {
    std::memcpy(call.outputs[0].raw(), call.inputs[0].raw(), call.inputs[0].bytes());
  }
}

Shape resolve_reshape(const ShapeCall& call, const Shape& from,
                      const std::vector<std::int64_t>& to) {
  std::int64_t known = 1;
  int unknown = -1;
  for (std::size_t i = 0; i < to.size(); ++i) {
    if (to[i] == -1) {
      if (unknown >= 0) call.fail("only one dimension may be -1 in {}", Shape(to));
      unknown = static_cast<int>(i);
    } else if (to[i] < 0) {
      call.fail("dimension {} of {} is negative", i, Shape(to));
    } else {
      known *= to[i];
    }
  }
  std::vector<std::int64_t> dims = to;
  if (unknown >= 0) {
    if (known == 0 || from.numel() % known != 0) {
      call.fail("cannot reshape {} ({} elements) to {}", from, from.numel(), Shape(to));
    }
    dims[static_cast<std::size_t>(unknown)] = from.numel() / known;
  }
  Shape result(dims);
  if (result.numel() != from.numel()) {
    call.fail("cannot reshape {} ({} elements) to {} ({} elements)", from, from.numel(), result,
              result.numel());
  }
  return result;
}

std::vector<std::int64_t> full_perm(const std::vector<std::int64_t>& perm, int rank) {
  if (!perm.empty()) return perm;
  std::vector<std::int64_t> p(static_cast<std::size_t>(rank));
  std::iota(p.begin(), p.end(), 0);
  if (rank >= 2)
    std::swap(p[static_cast<std::size_t>(rank - 1)], p[static_cast<std::size_t>(rank - 2)]);
  return p;
}

}  // namespace

Value reshape(const Value& x, Shape shape, std::source_location where) {
  return x.graph().apply("reshape", {x}, {{"shape", shape.dims()}}, where);
}

Value broadcast_to(const Value& x, Shape shape, std::source_location where) {
  if (x.shape() == shape) return x;
  return x.graph().apply("broadcast_to", {x}, {{"shape", shape.dims()}}, where);
}

Value reshape_like(const Value& x, const Value& like, std::source_location where) {
  if (x.shape() == like.shape()) return x;
  return x.graph().apply("reshape", {x, like}, {{"shape", std::vector<std::int64_t>{}}}, where);
}

Value broadcast_like(const Value& x, const Value& like, std::source_location where) {
  if (x.shape() == like.shape()) return x;
  return x.graph().apply("broadcast_to", {x, like}, {{"shape", std::vector<std::int64_t>{}}},
                         where);
}

Value filled_like(const Value& like, double value) {
  return broadcast_like(like.graph().scalar(value, like.dtype()), like);
}

Value transpose(const Value& x, std::vector<std::int64_t> perm, std::source_location where) {
  return x.graph().apply("transpose", {x}, {{"perm", full_perm(perm, x.rank())}}, where);
}

Value stop_gradient(const Value& x, std::source_location where) {
  return x.graph().apply("stop_gradient", {x}, {}, where);
}

Value filled(Graph& graph, const Shape& shape, double value, DType dtype) {
  return broadcast_to(graph.scalar(value, dtype), shape);
}

void register_shape_ops(OpRegistry& registry) {
  {
    OpDef def;
    def.name = "reshape";
    def.formula =
        "same elements, new shape (attribute, one dimension may be -1; or the shape of a second "
        "input, whose data is not read)";
    def.max_inputs = 2;
    def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
      const auto& in = call.inputs[0];
      const std::vector<std::int64_t> target =
          call.inputs.size() == 2 ? call.inputs[1].shape.dims() : call.attrs.integers("shape");
      return {TensorDesc{in.dtype, resolve_reshape(call, in.shape, target)}};
    };
    def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
      // The shape-giving second input (if any) gets no gradient: its data is not read.
      std::vector<std::optional<Value>> grads(c.inputs.size());
      grads[0] = reshape_like(c.grad(), c.inputs[0]);
      return grads;
    };
    def.second_order = true;
    def.reference = copy_kernel;
    def.samples = [] {
      return std::vector<Sample>{
          {"flatten", {spec({2, 3, 4})}, {{"shape", std::vector<std::int64_t>{2, 12}}}},
          {"inferred", {spec({6, 2})}, {{"shape", std::vector<std::int64_t>{-1, 3}}}},
          {"to scalar", {spec({1, 1})}, {{"shape", std::vector<std::int64_t>{}}}},
          {"like another value",
           {spec({2, 6}), spec({3, 4})},
           {{"shape", std::vector<std::int64_t>{}}}}};
    };
    def.error_samples = [] {
      return std::vector<ErrorSample>{{"wrong count",
                                       {spec({2, 3})},
                                       {{"shape", std::vector<std::int64_t>{4, 2}}},
                                       "cannot reshape"},
                                      {"two unknowns",
                                       {spec({2, 3})},
                                       {{"shape", std::vector<std::int64_t>{-1, -1}}},
                                       "only one"}};
    };
    registry.add(std::move(def));
  }
  {
    OpDef def;
    def.name = "broadcast_to";
    def.formula =
        "y = x repeated along broadcast axes (NumPy rules) to a shape (attribute, or the shape of "
        "a second input, whose data is not read)";
    def.max_inputs = 2;
    def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
      const auto& in = call.inputs[0];
      Shape target =
          call.inputs.size() == 2 ? call.inputs[1].shape : Shape(call.attrs.integers("shape"));
      Shape joined = broadcast_shapes(in.shape, target, call.site);
      if (joined != target) call.fail("cannot broadcast {} to {}", in.shape, target);
      return {TensorDesc{in.dtype, target}};
    };
    def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
      std::vector<std::optional<Value>> grads(c.inputs.size());
      grads[0] = unbroadcast(c.grad(), c.inputs[0].shape());
      return grads;
    };
    def.second_order = true;
    def.reference = [](const KernelCall& call) {
      dispatch_any(call.inputs[0].dtype(), [&](auto zero) {
        using T = decltype(zero);
        const T* x = call.inputs[0].data<T>();
        T* y = call.outputs[0].data<T>();
        BroadcastIndex index(call.outputs[0].shape(),
                             broadcast_strides(call.inputs[0].shape(), call.outputs[0].shape()));
        for (std::int64_t i = 0; i < call.outputs[0].numel(); ++i, index.next()) {
          y[i] = x[index.offset()];
        }
      });
    };
    // f32 fast path: a fill for a scalar, row copies for a trailing block, and otherwise the
    // odometer with strides prepared once (no allocation per run).
    def.onednn = [](const KernelBuild& build) -> std::unique_ptr<Kernel> {
      const Shape out = build.outputs[0].shape;
      const Shape in = build.inputs[0].shape;
      if (out.numel() == 0) return nullptr;
      const auto strides = broadcast_strides(in, out);
      // The largest trailing block that x holds contiguously (no broadcast inside it).
      std::int64_t block = 1;
      for (int axis = out.rank() - 1; axis >= 0; --axis) {
        if (strides[static_cast<std::size_t>(axis)] != block || out[axis] == 1) {
          if (out[axis] == 1) continue;
          break;
        }
        block *= out[axis];
      }
      const std::int64_t total = out.numel();
      const std::int64_t in_count = in.numel();
      return make_kernel([=](const KernelCall& call) {
        const float* x = call.inputs[0].data<float>();
        float* y = call.outputs[0].data<float>();
        if (in_count == 1) {
          std::fill(y, y + total, x[0]);
        } else if (block == in_count) {  // x repeats as a whole: copy it row after row
          for (std::int64_t i = 0; i < total; i += block) std::copy(x, x + block, y + i);
        } else {
          BroadcastIndex index(out, strides);
          for (std::int64_t i = 0; i < total; ++i, index.next()) y[i] = x[index.offset()];
        }
      });
    };
    def.samples = [] {
      return std::vector<Sample>{
          {"row", {spec({4})}, {{"shape", std::vector<std::int64_t>{3, 4}}}},
          {"column", {spec({3, 1})}, {{"shape", std::vector<std::int64_t>{2, 3, 4}}}},
          {"scalar", {spec({})}, {{"shape", std::vector<std::int64_t>{2, 2}}}},
          {"like another value",
           {spec({3, 1}), spec({3, 4})},
           {{"shape", std::vector<std::int64_t>{}}}}};
    };
    def.error_samples = [] {
      return std::vector<ErrorSample>{{"incompatible",
                                       {spec({3})},
                                       {{"shape", std::vector<std::int64_t>{4}}},
                                       "cannot broadcast"},
                                      {"shrink",
                                       {spec({2, 3})},
                                       {{"shape", std::vector<std::int64_t>{3}}},
                                       "cannot broadcast"}};
    };
    registry.add(std::move(def));
  }
  {
    OpDef def;
    def.name = "transpose";
    def.formula = "y[i_perm[0], ..., i_perm[n-1]] = x[i_0, ..., i_(n-1)]";
    def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> {
      const auto& in = call.inputs[0];
      const auto& perm = call.attrs.integers("perm");
      if (static_cast<int>(perm.size()) != in.shape.rank()) {
        call.fail("permutation {} has {} axes, the input {} has {}", Shape(perm), perm.size(),
                  in.shape, in.shape.rank());
      }
      std::vector<char> seen(perm.size(), 0);
      std::vector<std::int64_t> dims;
      for (auto axis : perm) {
        if (axis < 0 || axis >= in.shape.rank() || seen[static_cast<std::size_t>(axis)]) {
          call.fail("{} is not a permutation of the axes of {}", Shape(perm), in.shape);
        }
        seen[static_cast<std::size_t>(axis)] = 1;
        dims.push_back(in.shape[static_cast<int>(axis)]);
      }
      return {TensorDesc{in.dtype, Shape(dims)}};
    };
    def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
      const auto& perm = c.attrs().integers("perm");
      std::vector<std::int64_t> inverse(perm.size());
      for (std::size_t i = 0; i < perm.size(); ++i)
        inverse[static_cast<std::size_t>(perm[i])] = static_cast<std::int64_t>(i);
      return {transpose(c.grad(), inverse)};
    };
    def.second_order = true;
    def.reference = [](const KernelCall& call) {
      const auto& perm = call.attrs().integers("perm");
      const Shape& in_shape = call.inputs[0].shape();
      const auto in_strides = in_shape.strides();
      std::vector<std::int64_t> strides;  // input stride of each output axis
      for (auto axis : perm) strides.push_back(in_strides[static_cast<std::size_t>(axis)]);
      dispatch_any(call.inputs[0].dtype(), [&](auto zero) {
        using T = decltype(zero);
        const T* x = call.inputs[0].data<T>();
        T* y = call.outputs[0].data<T>();
        BroadcastIndex index(call.outputs[0].shape(), strides);
        for (std::int64_t i = 0; i < call.outputs[0].numel(); ++i, index.next()) {
          y[i] = x[index.offset()];
        }
      });
    };
    // A oneDNN reorder reads the input through permuted strides into a plain output.
    def.onednn = [](const KernelBuild& build) -> std::unique_ptr<Kernel> {
      const auto& perm = build.node.attrs.integers("perm");
      if (build.inputs[0].shape.rank() == 0) return nullptr;
      const auto in_strides = build.inputs[0].shape.strides();
      dnnl::memory::dims dims(build.outputs[0].shape.dims().begin(),
                              build.outputs[0].shape.dims().end());
      dnnl::memory::dims strides;
      for (auto axis : perm) strides.push_back(in_strides[static_cast<std::size_t>(axis)]);
      dnnl::memory::desc src_md(dims, to_dnnl(build.inputs[0].dtype), strides);
      auto dst_md = plain_md(build.outputs[0]);
      dnnl::reorder::primitive_desc pd(build.engine, src_md, build.engine, dst_md);
      return std::make_unique<PrimitiveKernel>(
          dnnl::reorder(pd), std::vector<PrimitiveArg>{input_arg(DNNL_ARG_FROM, 0, src_md),
                                                       output_arg(DNNL_ARG_TO, 0, dst_md)});
    };
    def.samples = [] {
      return std::vector<Sample>{
          {"matrix", {spec({3, 4})}, {{"perm", std::vector<std::int64_t>{1, 0}}}},
          {"rank 3", {spec({2, 3, 4})}, {{"perm", std::vector<std::int64_t>{2, 0, 1}}}}};
    };
    def.error_samples = [] {
      return std::vector<ErrorSample>{
          {"not a permutation",
           {spec({2, 3})},
           {{"perm", std::vector<std::int64_t>{0, 0}}},
           "not a permutation"},
          {"wrong length", {spec({2, 3})}, {{"perm", std::vector<std::int64_t>{0}}}, "has 1 axes"}};
    };
    registry.add(std::move(def));
  }
  {
    OpDef def;
    def.name = "stop_gradient";
    def.formula = "y = x; no gradient flows back (x is treated as a constant)";
    def.shape = [](const ShapeCall& call) -> std::vector<TensorDesc> { return {call.inputs[0]}; };
    // Deliberately returns no gradient: this is the op's meaning, not a missing rule.
    def.backward = [](const BackwardCall&) -> std::vector<std::optional<Value>> {
      return {std::nullopt};
    };
    def.second_order = true;
    def.reference = copy_kernel;
    // The input is marked non-differentiable: central differences would see the identity,
    // while the op's meaning is a zero gradient (tested in test_autodiff.cpp).
    def.samples = [] {
      InputSpec x = spec({2, 3});
      x.differentiable = false;
      return std::vector<Sample>{{"matrix", {x}}};
    };
    def.error_samples = [] { return std::vector<ErrorSample>{}; };
    registry.add(std::move(def));
  }
}

}  // namespace dagrad
