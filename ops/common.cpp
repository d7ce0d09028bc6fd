#include "ops/common.hpp"

#include "ops/ops.hpp"
#include "runtime/primitive_kernel.hpp"

namespace dagrad {

void throw_label_out_of_range(std::string_view site, std::int64_t label, std::int64_t position,
                              std::int64_t classes) {
  throw Error(fmt::format("{}: label {} at position {} is outside [0, {}) (the number of classes)",
                          site, label, position, classes));
}

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

std::vector<TensorDesc> same_as_input(const ShapeCall& call) {
  require_floating(call, 0);
  return {call.inputs[0]};
}

KernelFactory eltwise_onednn(dnnl::algorithm algorithm, EltwiseParams params) {
  return [=](const KernelBuild& build) -> std::unique_ptr<Kernel> {
    if (build.inputs[0].dtype != DType::f32 || build.inputs[0].numel() == 0) return nullptr;
    const auto [alpha, beta] = params ? params(build.node.attrs) : std::pair{0.f, 0.f};
    auto md = plain_md(build.inputs[0]);
    dnnl::eltwise_forward::primitive_desc pd(
        dnnl::eltwise_forward::desc(dnnl::prop_kind::forward_inference, algorithm, md, alpha, beta),
        build.engine);
    return std::make_unique<PrimitiveKernel>(
        dnnl::eltwise_forward(pd),
        std::vector<PrimitiveArg>{input_arg(DNNL_ARG_SRC, 0, md), output_arg(DNNL_ARG_DST, 0, md)});
  };
}

KernelFactory binary_onednn(dnnl::algorithm algorithm, SwappedBinary swapped) {
  return [=](const KernelBuild& build) -> std::unique_ptr<Kernel> {
    const Shape& out = build.outputs[0].shape;
    if (build.outputs[0].dtype != DType::f32 || build.outputs[0].numel() == 0) return nullptr;
    int full = 0;
    dnnl::algorithm chosen = algorithm;
    if (build.inputs[0].shape == out) {
      full = 0;
    } else if (swapped.algorithm && build.inputs[1].shape == out) {
      full = 1;
      chosen = *swapped.algorithm;
    } else {
      return nullptr;
    }
    const int other = 1 - full;
    // src1 gets dst's rank by prepending size-1 axes.
    const Shape& small = build.inputs[static_cast<std::size_t>(other)].shape;
    std::vector<std::int64_t> dims(static_cast<std::size_t>(out.rank()), 1);
    for (int i = 0; i < small.rank(); ++i) {
      dims[static_cast<std::size_t>(out.rank() - small.rank() + i)] = small[i];
    }
    auto src0_md = plain_md(build.inputs[static_cast<std::size_t>(full)]);
    auto src1_md = plain_md(Shape(dims), build.inputs[0].dtype);
    auto dst_md = plain_md(build.outputs[0]);
    dnnl::primitive_attr attr;
    if (full == 1 && swapped.negate) {
      dnnl::post_ops negate;
      negate.append_eltwise(1.f, dnnl::algorithm::eltwise_linear, -1.f, 0.f);
      attr.set_post_ops(negate);
    }
    dnnl::binary::primitive_desc pd(dnnl::binary::desc(chosen, src0_md, src1_md, dst_md), attr,
                                    build.engine);
    return std::make_unique<PrimitiveKernel>(
        dnnl::binary(pd), std::vector<PrimitiveArg>{input_arg(DNNL_ARG_SRC_0, full, src0_md),
                                                    input_arg(DNNL_ARG_SRC_1, other, src1_md),
                                                    output_arg(DNNL_ARG_DST, 0, dst_md)});
  };
}

std::vector<TensorDesc> activation_grad_rule(const ShapeCall& call) {
  require_floating(call, 0);
  require_same_dtype(call);
  if (call.inputs[0].shape != call.inputs[1].shape) {
    call.fail("dy {} and x {} must have the same shape", call.inputs[0], call.inputs[1]);
  }
  return {call.inputs[0]};
}

KernelFactory eltwise_backward_onednn(dnnl::algorithm algorithm) {
  return [=](const KernelBuild& build) -> std::unique_ptr<Kernel> {
    if (build.inputs[0].dtype != DType::f32 || build.inputs[0].numel() == 0) return nullptr;
    auto md = plain_md(build.inputs[0]);
    dnnl::eltwise_forward::primitive_desc hint(
        dnnl::eltwise_forward::desc(dnnl::prop_kind::forward_training, algorithm, md, 0.f, 0.f),
        build.engine);
    dnnl::eltwise_backward::primitive_desc pd(
        dnnl::eltwise_backward::desc(algorithm, md, md, 0.f, 0.f), build.engine, hint);
    return std::make_unique<PrimitiveKernel>(
        dnnl::eltwise_backward(pd),
        std::vector<PrimitiveArg>{input_arg(DNNL_ARG_DIFF_DST, 0, md),
                                  input_arg(DNNL_ARG_SRC, 1, md),
                                  output_arg(DNNL_ARG_DIFF_SRC, 0, md)});
  };
}

EltwiseParams constant_params(float alpha, float beta) {
  return [=](const Attrs&) { return std::pair{alpha, beta}; };
}

EltwiseParams attribute_params(std::string alpha_attr, std::string beta_attr) {
  return [=](const Attrs& attrs) {
    const float alpha = alpha_attr.empty() ? 0.f : static_cast<float>(attrs.real(alpha_attr));
    const float beta = beta_attr.empty() ? 0.f : static_cast<float>(attrs.real(beta_attr));
    return std::pair{alpha, beta};
  };
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
