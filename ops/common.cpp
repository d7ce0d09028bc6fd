#include "ops/common.hpp"

#include "ops/ops.hpp"

namespace dagrad {

std::vector<std::int64_t> broadcast_strides(const Shape& in, const Shape& out) {
  std::vector<std::int64_t> strides(static_cast<std::size_t>(out.rank()), 0);
  const auto in_strides = in.strides();
  const int shift = out.rank() - in.rank();
  for (int i = 0; i < in.rank(); ++i) {
    if (in[i] != 1)
      strides[static_cast<std::size_t>(i + shift)] = in_strides[static_cast<std::size_t>(i)];
  }
  return strides;
}

BroadcastIndex::BroadcastIndex(const Shape& out, std::vector<std::int64_t> strides)
    : dims_(out.dims()), strides_(std::move(strides)), counter_(dims_.size(), 0) {}

void BroadcastIndex::next() {
  for (int axis = static_cast<int>(dims_.size()) - 1; axis >= 0; --axis) {
    auto a = static_cast<std::size_t>(axis);
    offset_ += strides_[a];
    if (++counter_[a] < dims_[a]) return;
    offset_ -= strides_[a] * dims_[a];
    counter_[a] = 0;
  }
}

std::vector<TensorDesc> broadcast_rule(const ShapeCall& call) {
  require_floating(call, 0);
  require_same_dtype(call);
  return {TensorDesc{call.inputs[0].dtype,
                     broadcast_shapes(call.inputs[0].shape, call.inputs[1].shape, call.site)}};
}

void require_floating(const ShapeCall& call, std::size_t input) {
  if (!is_floating(call.inputs[input].dtype)) {
    call.fail("input {} must be f32 or f64, got {}", input, call.inputs[input]);
  }
}

void require_same_dtype(const ShapeCall& call) {
  for (std::size_t i = 1; i < call.inputs.size(); ++i) {
    if (call.inputs[i].dtype != call.inputs[0].dtype) {
      call.fail("inputs have different dtypes: {} and {} (convert one with cast())", call.inputs[0],
                call.inputs[i]);
    }
  }
}

Value unbroadcast(const Value& grad, const Shape& shape) {
  const Shape& from = grad.shape();
  if (from == shape) return grad;
  std::vector<std::int64_t> axes;
  const int shift = from.rank() - shape.rank();
  for (int i = 0; i < from.rank(); ++i) {
    const std::int64_t target = i < shift ? 1 : shape[i - shift];
    if (i < shift || (target == 1 && from[i] != 1)) axes.push_back(i);
  }
  Value summed = axes.empty() ? grad : sum(grad, axes, /*keepdims=*/true);
  return summed.shape() == shape ? summed : reshape(summed, shape);
}

}  // namespace dagrad
