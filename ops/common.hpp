// Helpers shared by the op families: dtype dispatch, broadcasting index maps, unbroadcast,
// and the registration shorthands. Internal to ops/ (not part of the public API).
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "graph/graph.hpp"
#include "graph/op_def.hpp"
#include "runtime/kernel.hpp"

namespace dagrad {

class OpRegistry;

// Calls f(T{}) with T = float or double for a floating dtype; throws for others.
template <class F>
decltype(auto) dispatch_floating(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32:
      return f(float{});
    case DType::f64:
      return f(double{});
    case DType::i32:
      break;
  }
  throw Error(fmt::format("expected a floating dtype, got {}", dtype));
}
// Same with i32 as well.
template <class F>
decltype(auto) dispatch_any(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32:
      return f(float{});
    case DType::f64:
      return f(double{});
    case DType::i32:
      return f(std::int32_t{});
  }
  throw Error("unknown dtype");
}

// The Error for a class label outside [0, classes), naming `site` (the node reading the labels),
// the label, its position and the number of classes: one message for every kernel reading
// labels (pick, pick_grad, the fused cross-entropy).
[[noreturn]] void throw_label_out_of_range(std::string_view site, std::int64_t label,
                                           std::int64_t position, std::int64_t classes);

// Strides of `in` viewed inside `out` under NumPy broadcasting: 0 on broadcast axes, with
// one entry per axis of `out`.
std::vector<std::int64_t> broadcast_strides(const Shape& in, const Shape& out);

// Maps a flat row-major index of `out` to a flat index of an input with `strides` (from
// broadcast_strides). Iterates with an odometer for speed.
class BroadcastIndex {
 public:
  BroadcastIndex(const Shape& out, std::vector<std::int64_t> strides);
  std::int64_t offset() const { return offset_; }
  void next();

 private:
  std::vector<std::int64_t> dims_, strides_, counter_;
  std::int64_t offset_ = 0;
};

// Shape rule of binary floating ops with NumPy broadcasting (one dtype for both inputs).
std::vector<TensorDesc> broadcast_rule(const ShapeCall& call);

// Reference kernel of a binary op with NumPy broadcasting: y[i] = op(a[ia], b[ib]).
template <class Op>
ReferenceFn binary_reference(Op op) {
  return [op](const KernelCall& call) {
    const Tensor& a = call.inputs[0];
    const Tensor& b = call.inputs[1];
    Tensor& y = call.outputs[0];
    dispatch_floating(y.dtype(), [&](auto zero) {
      using T = decltype(zero);
      const T* src0 = a.data<T>();
      const T* src1 = b.data<T>();
      T* dst = y.data<T>();
      BroadcastIndex ia(y.shape(), broadcast_strides(a.shape(), y.shape()));
      BroadcastIndex ib(y.shape(), broadcast_strides(b.shape(), y.shape()));
      for (std::int64_t i = 0; i < y.numel(); ++i, ia.next(), ib.next()) {
        dst[i] = static_cast<T>(op(src0[ia.offset()], src1[ib.offset()]));
      }
    });
  };
}

// Shape rule of unary floating ops: the output is the input's desc.
std::vector<TensorDesc> same_as_input(const ShapeCall& call);

// Reference kernel of a unary op: y[i] = op(x[i], attrs), in f32 or f64.
template <class Op>
ReferenceFn unary_reference(Op op) {
  return [op](const KernelCall& call) {
    dispatch_floating(call.inputs[0].dtype(), [&](auto zero) {
      using T = decltype(zero);
      const T* src = call.inputs[0].data<T>();
      T* dst = call.outputs[0].data<T>();
      for (std::int64_t i = 0; i < call.inputs[0].numel(); ++i) {
        dst[i] = static_cast<T>(op(src[i], call.attrs()));
      }
    });
  };
}

// oneDNN eltwise forward (f32, non-empty; nullptr otherwise) with alpha and beta from `params`.
using EltwiseParams = std::function<std::pair<float, float>(const Attrs&)>;
KernelFactory eltwise_onednn(dnnl::algorithm algorithm, EltwiseParams params = {});
// oneDNN binary for a broadcasting binary op (f32, non-empty; nullptr otherwise: the reference
// runs). The primitive broadcasts src1 only, so the input of the output's shape becomes src0.
// When that is input 1, the primitive runs `swapped`: the same algorithm for a symmetric op,
// the mirrored comparison for gt/lt/ge/le, or a − b as −(b − a) (exact: negation and a
// subtraction's rounding are sign-symmetric); with no swapped algorithm the reference runs.
// (1 − y in sigmoid's backward took 1.08 ms on [128,1024] in the reference kernel.)
struct SwappedBinary {
  std::optional<dnnl::algorithm> algorithm;
  bool negate = false;
};
KernelFactory binary_onednn(dnnl::algorithm algorithm, SwappedBinary swapped);

// Backward op of an activation, (dy, x) -> dx: its shape rule (both floating, one dtype, one
// shape) and oneDNN eltwise_backward of `algorithm` reading x (f32, non-empty; nullptr
// otherwise). The primitive may write dx over dy (OpDef::in_place).
std::vector<TensorDesc> activation_grad_rule(const ShapeCall& call);
KernelFactory eltwise_backward_onednn(dnnl::algorithm algorithm);
// alpha and beta fixed, or read from the named attributes ("" for 0).
EltwiseParams constant_params(float alpha, float beta);
EltwiseParams attribute_params(std::string alpha_attr, std::string beta_attr = "");

// Shape-rule checks that raise ShapeError naming the op.
void require_floating(const ShapeCall& call, std::size_t input);
void require_same_dtype(const ShapeCall& call);

// Sums `grad` down to `shape` (undoing NumPy broadcasting): the one helper every
// broadcasting op's backward uses.
Value unbroadcast(const Value& grad, const Shape& shape);

// Registration functions, one per op family (ops/<family>.cpp).
void register_elementwise_ops(OpRegistry& registry);
void register_shape_ops(OpRegistry& registry);
void register_reduction_ops(OpRegistry& registry);
void register_linalg_ops(OpRegistry& registry);
void register_softmax_ops(OpRegistry& registry);
void register_loss_ops(OpRegistry& registry);
void register_activation_ops(OpRegistry& registry);
void register_indexing_ops(OpRegistry& registry);
void register_conv_ops(OpRegistry& registry);
void register_normalization_ops(OpRegistry& registry);
void register_math_ops(OpRegistry& registry);

}  // namespace dagrad
