// matmul: 2-D and batched with NumPy-broadcast leading dimensions. Kernels: oneDNN matmul for
// f32 (ranks padded with leading 1s so oneDNN broadcasts the batch), a triple loop for the
// reference.
#include "ops/linalg.hpp"

#include "ops/common.hpp"
#include "ops/shape.hpp"
#include "runtime/primitive_kernel.hpp"

namespace dagrad {

namespace {

Shape leading(const Shape& shape) {
  return Shape(std::vector<std::int64_t>(shape.dims().begin(), shape.dims().end() - 2));
}

// `shape` with 1s prepended up to `rank`.
Shape padded(const Shape& shape, int rank) {
  std::vector<std::int64_t> dims(static_cast<std::size_t>(rank - shape.rank()), 1);
  dims.insert(dims.end(), shape.dims().begin(), shape.dims().end());
  return Shape(dims);
}

std::vector<TensorDesc> matmul_rule(const ShapeCall& call) {
  const TensorDesc& a = call.inputs[0];
  const TensorDesc& b = call.inputs[1];
  require_floating(call, 0);
  require_same_dtype(call);
  for (const TensorDesc* operand : {&a, &b}) {
    if (operand->shape.rank() < 2) {
      call.fail(
          "cannot multiply {} by {}: both operands need rank 2 or more (reshape a vector "
          "to [1,k] or [k,1])",
          a.shape, b.shape);
    }
  }
  const std::int64_t k_a = a.shape[a.shape.rank() - 1];
  const std::int64_t k_b = b.shape[b.shape.rank() - 2];
  if (k_a != k_b) {
    call.fail("cannot multiply {} by {}: inner sizes {} and {} differ", a.shape, b.shape, k_a, k_b);
  }
  Shape batch = broadcast_shapes(leading(a.shape), leading(b.shape), call.site);
  std::vector<std::int64_t> dims = batch.dims();
  dims.push_back(a.shape[a.shape.rank() - 2]);
  dims.push_back(b.shape[b.shape.rank() - 1]);
  return {TensorDesc{a.dtype, Shape(dims)}};
}

void matmul_reference(const KernelCall& call) {
  const Tensor& a = call.inputs[0];
  const Tensor& b = call.inputs[1];
  Tensor& y = call.outputs[0];
  const int rank = y.shape().rank();
  const std::int64_t m = y.shape()[rank - 2];
  const std::int64_t n = y.shape()[rank - 1];
  const std::int64_t k = a.shape()[a.shape().rank() - 1];
  const Shape batch = leading(y.shape());
  BroadcastIndex a_batch(batch, broadcast_strides(leading(a.shape()), batch));
  BroadcastIndex b_batch(batch, broadcast_strides(leading(b.shape()), batch));
  dispatch_floating(y.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const T* pa = a.data<T>();
    const T* pb = b.data<T>();
    T* py = y.data<T>();
    for (std::int64_t batch_index = 0; batch_index < batch.numel();
         ++batch_index, a_batch.next(), b_batch.next()) {
      const T* src = pa + a_batch.offset() * m * k;
      const T* weights = pb + b_batch.offset() * k * n;
      T* dst = py + batch_index * m * n;
      for (std::int64_t i = 0; i < m; ++i) {
        for (std::int64_t j = 0; j < n; ++j) {
          double acc = 0.0;
          for (std::int64_t p = 0; p < k; ++p) {
            acc += static_cast<double>(src[i * k + p]) * static_cast<double>(weights[p * n + j]);
          }
          dst[i * n + j] = static_cast<T>(acc);
        }
      }
    }
  });
}

std::unique_ptr<Kernel> matmul_onednn(const KernelBuild& build) {
  if (build.outputs[0].dtype != DType::f32) return nullptr;
  const int rank = build.outputs[0].shape.rank();
  if (rank > DNNL_MAX_NDIMS) return nullptr;
  // Empty operands (a zero size anywhere, including k = 0 whose product is all zeros) are
  // left to the reference loop.
  for (const TensorDesc& desc : {build.inputs[0], build.inputs[1], build.outputs[0]}) {
    if (desc.numel() == 0) return nullptr;
  }
  auto src_md = plain_md(padded(build.inputs[0].shape, rank), DType::f32);
  auto weights_md = plain_md(padded(build.inputs[1].shape, rank), DType::f32);
  auto dst_md = plain_md(build.outputs[0]);
  try {
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_md, weights_md, dst_md), build.engine);
    return std::make_unique<PrimitiveKernel>(
        dnnl::matmul(pd), std::vector<PrimitiveArg>{input_arg(DNNL_ARG_SRC, 0, src_md),
                                                    input_arg(DNNL_ARG_WEIGHTS, 1, weights_md),
                                                    output_arg(DNNL_ARG_DST, 0, dst_md)});
  } catch (const dnnl::error&) {
    return nullptr;  // a configuration this oneDNN build does not implement: the reference runs
  }
}

}  // namespace

Value matmul(const Value& a, const Value& b, std::source_location where) {
  if (!a.valid() || !b.valid()) throw GraphError("matmul: an input is an empty Value");
  return a.graph().apply("matmul", {a, b}, {}, where);
}

void register_linalg_ops(OpRegistry& registry) {
  OpDef def;
  def.name = "matmul";
  def.formula = "y[..., i, j] = Σ_p a[..., i, p] · b[..., p, j] (leading dimensions broadcast)";
  def.min_inputs = def.max_inputs = 2;
  def.shape = matmul_rule;
  // The switch: each operand's gradient is the output gradient times the other operand,
  // transposed; summed over the batch dimensions that operand was broadcast along.
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    Value g = c.grad();
    std::optional<Value> da, db;
    if (c.needs[0]) da = unbroadcast(matmul(g, transpose(c.inputs[1])), c.inputs[0].shape());
    if (c.needs[1]) db = unbroadcast(matmul(transpose(c.inputs[0]), g), c.inputs[1].shape());
    return {da, db};
  };
  def.second_order = true;
  def.reference = matmul_reference;
  def.onednn = matmul_onednn;
  def.samples = [] {
    return std::vector<Sample>{
        {"2-D", {spec({3, 4}), spec({4, 5})}},
        {"single column", {spec({3, 4}), spec({4, 1})}},
        {"batched by 2-D", {spec({2, 3, 4}), spec({4, 5})}},
        {"2-D by batched", {spec({3, 4}), spec({2, 4, 5})}},
        {"batched by batched", {spec({2, 3, 4}), spec({2, 4, 5})}},
        {"broadcast batches", {spec({2, 1, 3, 4}), spec({3, 4, 2})}},
    };
  };
  def.error_samples = [] {
    return std::vector<ErrorSample>{
        {"inner sizes differ",
         {spec({128, 256}), spec({128, 10})},
         {},
         "cannot multiply [128,256] by [128,10]: inner sizes 256 and 128 differ"},
        {"vector operand", {spec({4}), spec({4, 3})}, {}, "reshape a vector"},
        {"batches do not broadcast", {spec({2, 3, 4}), spec({3, 4, 5})}, {}, "cannot broadcast"},
        {"mixed dtypes", {spec({2, 3}), InputSpec{{3, 2}, DType::i32}}, {}, "different dtypes"},
    };
  };
  registry.add(std::move(def));
}

}  // namespace dagrad
