// dropout, dropconnect, batch_norm, batch_norm_grad, layer_norm (registered ops) and the weight
// penalties (composites). Kernels: oneDNN batch_normalization forward/backward and
// layer_normalization forward for f32; plain loops for the reference (and for dropout, which
// oneDNN 2.6 has no primitive for).
#include "ops/normalization.hpp"

#include <algorithm>
#include <cmath>

#include "ops/common.hpp"
#include "ops/elementwise.hpp"
#include "ops/reduction.hpp"
#include "ops/shape.hpp"
#include "runtime/primitive_kernel.hpp"

namespace dagrad {

namespace {

// ---- dropout ------------------------------------------------------------------------------

std::uint64_t splitmix64(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The key of one node's mask for one run (see normalization.hpp for why step is opt-in).
std::uint64_t mask_key(const KernelCall& call) {
  const Attrs& attrs = call.attrs();
  std::uint64_t key = splitmix64(static_cast<std::uint64_t>(attrs.integer("seed")));
  key = splitmix64(key ^ call.context.seed);
  key = splitmix64(key ^ static_cast<std::uint64_t>(call.node.id));
  if (attrs.boolean("vary_with_step")) key = splitmix64(key ^ call.context.step);
  return key;
}

// u in [0, 1) for element i: the top 53 bits of the i-th splitmix64 output of the stream.
double mask_uniform(std::uint64_t key, std::int64_t i) {
  return static_cast<double>(splitmix64(key + static_cast<std::uint64_t>(i)) >> 11) * 0x1.0p-53;
}

std::vector<TensorDesc> dropout_rule(const ShapeCall& call) {
  require_floating(call, 0);
  const double rate = call.attrs.real("rate");
  if (!(rate >= 0.0 && rate < 1.0)) call.fail("rate {} is outside [0, 1)", rate);
  return {call.inputs[0], call.inputs[0]};
}

void dropout_reference(const KernelCall& call) {
  const Tensor& x = call.inputs[0];
  Tensor& y = call.outputs[0];
  Tensor& mask = call.outputs[1];
  const double rate = call.attrs().real("rate");
  const bool drop = call.context.training && rate > 0.0;
  const std::uint64_t key = drop ? mask_key(call) : 0;
  dispatch_floating(x.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const T* src = x.data<T>();
    T* dst = y.data<T>();
    T* scaled_mask = mask.data<T>();
    const T kept = static_cast<T>(1.0 / (1.0 - rate));
    for (std::int64_t i = 0; i < x.numel(); ++i) {
      const T m = !drop ? T(1) : (mask_uniform(key, i) >= rate ? kept : T(0));
      scaled_mask[i] = m;
      dst[i] = src[i] * m;
    }
  });
}

void register_dropout_like(OpRegistry& registry, std::string name, std::string formula) {
  OpDef def;
  def.name = std::move(name);
  def.formula = std::move(formula);
  def.shape = dropout_rule;
  // dx = dy ⊙ mask; the mask does not depend on x (its gradient is ignored).
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    return {mul(c.grad(0), c.outputs[1])};
  };
  def.second_order = true;
  def.reference = dropout_reference;
  def.random = true;
  def.samples = [] {
    auto attrs = [](double rate, std::int64_t seed) {
      return Attrs{{"rate", rate}, {"seed", seed}, {"vary_with_step", false}};
    };
    return std::vector<Sample>{
        {"matrix, rate 0.5", {spec({6, 5})}, attrs(0.5, 3)},
        {"rank 3, rate 0.2", {spec({2, 3, 4})}, attrs(0.2, 9)},
        {"rate 0 keeps everything", {spec({4, 3})}, attrs(0.0, 1)},
        {"scalar", {spec({})}, attrs(0.3, 5)},
    };
  };
  def.error_samples = [] {
    auto attrs = [](double rate) {
      return Attrs{{"rate", rate}, {"seed", std::int64_t{0}}, {"vary_with_step", false}};
    };
    return std::vector<ErrorSample>{
        {"rate 1", {spec({3})}, attrs(1.0), "rate 1 is outside [0, 1)"},
        {"negative rate", {spec({3})}, attrs(-0.25), "rate -0.25 is outside [0, 1)"},
        {"integer input", {InputSpec{{2}, DType::i32}}, attrs(0.5), "must be f32 or f64"},
    };
  };
  registry.add(std::move(def));
}

// ---- batch_norm ---------------------------------------------------------------------------

// x as [N, C, S] with S = H·W (1 for [N, C]); element (n, c, s) at (n·C + c)·S + s.
struct ChannelGeometry {
  std::int64_t batch = 0, channels = 0, spatial = 1;
  explicit ChannelGeometry(const Shape& shape)
      : batch(shape[0]), channels(shape[1]), spatial(shape.rank() == 4 ? shape[2] * shape[3] : 1) {}
  std::int64_t per_channel() const { return batch * spatial; }  // M
  std::int64_t index(std::int64_t n, std::int64_t c, std::int64_t s) const {
    return (n * channels + c) * spatial + s;
  }
  // The oneDNN view: always 4-D NCHW.
  dnnl::memory::desc data_md() const {
    return plain_md(Shape{batch, channels, spatial, 1}, DType::f32);
  }
  dnnl::memory::desc channel_md() const { return plain_md(Shape{channels}, DType::f32); }
};

// Checks shared by batch_norm and batch_norm_grad: x is [N, C] or [N, C, H, W] and the inputs
// from index `first` on are [C] (their names in `names`).
void check_channel_inputs(const ShapeCall& call, const TensorDesc& x, std::size_t first,
                          std::initializer_list<const char*> names) {
  if (x.shape.rank() != 2 && x.shape.rank() != 4) {
    call.fail("x must be [N, C] or [N, C, H, W], got {}", x);
  }
  const std::int64_t channels = x.shape[1];
  std::size_t i = first;
  for (const char* name : names) {
    if (call.inputs[i].shape != Shape{channels}) {
      call.fail("{} must be [{}] (one value per channel of x {}), got {}", name, channels, x,
                call.inputs[i]);
    }
    ++i;
  }
}

void require_epsilon(const ShapeCall& call) {
  const double epsilon = call.attrs.real("epsilon");
  if (!(epsilon > 0.0)) call.fail("epsilon {} must be positive", epsilon);
}

std::vector<TensorDesc> batch_norm_rule(const ShapeCall& call) {
  require_floating(call, 0);
  require_same_dtype(call);
  check_channel_inputs(call, call.inputs[0], 1, {"gamma", "beta", "running_mean", "running_var"});
  const double momentum = call.attrs.real("momentum");
  if (!(momentum >= 0.0 && momentum <= 1.0)) call.fail("momentum {} is outside [0, 1]", momentum);
  require_epsilon(call);
  const TensorDesc channel = call.inputs[1];
  return {call.inputs[0], channel, channel};  // y, saved mean, saved variance
}

void require_batch_statistics(const KernelCall& call, const ChannelGeometry& geometry) {
  if (geometry.per_channel() < 2) {
    throw Error(fmt::format(
        "{}: training mode needs more than one value per channel for batch statistics, but x "
        "{} has N·H·W = {}; use a larger batch or run in inference mode",
        call.node.site(), call.inputs[0].desc(), geometry.per_channel()));
  }
}

// running ← (1 − momentum) running + momentum batch; the variance made unbiased (× M/(M−1)).
// Writes into the tensors bound to inputs 3 and 4 (the documented side effect).
template <class T, class Stat>
void update_running_statistics(const KernelCall& call, const ChannelGeometry& geometry,
                               const Stat& batch_mean, const Stat& batch_variance) {
  const double momentum = call.attrs().real("momentum");
  const double count = static_cast<double>(geometry.per_channel());
  T* running_mean = const_cast<T*>(call.inputs[3].data<T>());
  T* running_var = const_cast<T*>(call.inputs[4].data<T>());
  for (std::int64_t c = 0; c < geometry.channels; ++c) {
    const auto k = static_cast<std::size_t>(c);
    running_mean[c] = static_cast<T>((1.0 - momentum) * static_cast<double>(running_mean[c]) +
                                     momentum * static_cast<double>(batch_mean[k]));
    const double unbiased = static_cast<double>(batch_variance[k]) * count / (count - 1.0);
    running_var[c] = static_cast<T>((1.0 - momentum) * static_cast<double>(running_var[c]) +
                                    momentum * unbiased);
  }
}

// Per-channel mean and biased variance of x, accumulated in double (two passes: the mean, then
// the squared deviations), for the reference forward. Channels are split over the OpenMP
// threads and each row of S values is summed as a vector reduction, so the result does not
// depend on the thread count.
template <class T>
void batch_statistics(const T* x, const ChannelGeometry& geometry, std::vector<double>& mean,
                      std::vector<double>& variance) {
  mean.assign(static_cast<std::size_t>(geometry.channels), 0.0);
  variance.assign(static_cast<std::size_t>(geometry.channels), 0.0);
  const double count = static_cast<double>(geometry.per_channel());
  const std::int64_t spatial = geometry.spatial;
#pragma omp parallel for schedule(static)
  for (std::int64_t c = 0; c < geometry.channels; ++c) {
    double total = 0.0;
    for (std::int64_t n = 0; n < geometry.batch; ++n) {
      const T* row = x + geometry.index(n, c, 0);
      double row_total = 0.0;
#pragma omp simd reduction(+ : row_total)
      for (std::int64_t s = 0; s < spatial; ++s) row_total += static_cast<double>(row[s]);
      total += row_total;
    }
    const double mu = total / count;
    double squares = 0.0;
    for (std::int64_t n = 0; n < geometry.batch; ++n) {
      const T* row = x + geometry.index(n, c, 0);
      double row_squares = 0.0;
#pragma omp simd reduction(+ : row_squares)
      for (std::int64_t s = 0; s < spatial; ++s) {
        const double d = static_cast<double>(row[s]) - mu;
        row_squares += d * d;
      }
      squares += row_squares;
    }
    mean[static_cast<std::size_t>(c)] = mu;
    variance[static_cast<std::size_t>(c)] = squares / count;
  }
}

void batch_norm_reference(const KernelCall& call) {
  const Tensor& x = call.inputs[0];
  const ChannelGeometry geometry(x.shape());
  const bool training = call.context.training;
  if (training) require_batch_statistics(call, geometry);
  const double epsilon = call.attrs().real("epsilon");
  dispatch_floating(x.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const T* src = x.data<T>();
    const T* gamma = call.inputs[1].data<T>();
    const T* beta = call.inputs[2].data<T>();
    const T* running_mean = call.inputs[3].data<T>();
    const T* running_var = call.inputs[4].data<T>();
    T* dst = call.outputs[0].data<T>();
    T* saved_mean = call.outputs[1].data<T>();
    T* saved_variance = call.outputs[2].data<T>();
    std::vector<double> mean, variance;
    if (training) {
      batch_statistics(src, geometry, mean, variance);
    } else {
      for (std::int64_t c = 0; c < geometry.channels; ++c) {
        mean.push_back(static_cast<double>(running_mean[c]));
        variance.push_back(static_cast<double>(running_var[c]));
      }
    }
    for (std::int64_t c = 0; c < geometry.channels; ++c) {
      const auto k = static_cast<std::size_t>(c);
      saved_mean[c] = static_cast<T>(mean[k]);
      saved_variance[c] = static_cast<T>(variance[k]);
      const double inverse_std = 1.0 / std::sqrt(variance[k] + epsilon);
      for (std::int64_t n = 0; n < geometry.batch; ++n) {
        for (std::int64_t s = 0; s < geometry.spatial; ++s) {
          const std::int64_t i = geometry.index(n, c, s);
          dst[i] = static_cast<T>(static_cast<double>(gamma[c]) *
                                      (static_cast<double>(src[i]) - mean[k]) * inverse_std +
                                  static_cast<double>(beta[c]));
        }
      }
    }
    if (training) update_running_statistics<T>(call, geometry, mean, variance);
  });
}

dnnl::normalization_flags scale_and_shift() {
  return dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
}
dnnl::normalization_flags global_scale_and_shift() {
  return scale_and_shift() | dnnl::normalization_flags::use_global_stats;
}

void* handle(const Tensor& tensor) {
  return const_cast<void*>(tensor.raw());
}

// oneDNN batch_normalization_forward, f32. Both primitives (batch statistics for training,
// running statistics for inference) are created once; the run's mode picks one. Training
// writes the batch statistics straight into outputs 1 and 2 (the saved statistics the backward
// reads); inference copies the running statistics there. Images whose channels fill whole
// blocks are reordered to the channel-blocked layout, where oneDNN runs a JIT kernel instead
// of its generic NCHW one. Measured (raw oneDNN, [128,32,28,28], 2 threads):
// forward 7.8 ms on NCHW, 3.8 ms reorder + blocked + reorder back; backward 8.4 against 5.0.
class BatchNormForwardKernel final : public Kernel {
 public:
  explicit BatchNormForwardKernel(const KernelBuild& build) : geometry_(build.inputs[0].shape) {
    const float epsilon = static_cast<float>(build.node.attrs.real("epsilon"));
    const auto data_md = geometry_.data_md();
    const auto layout = geometry_.spatial > 1 ? channel_blocked_md(data_md) : data_md;
    const auto channel_md = geometry_.channel_md();
    using dnnl::batch_normalization_forward;
    auto make = [&](dnnl::prop_kind kind, dnnl::normalization_flags flags) {
      return batch_normalization_forward(batch_normalization_forward::primitive_desc(
          batch_normalization_forward::desc(kind, layout, epsilon, flags), build.engine));
    };
    src_ = StagedMemory(data_md, layout, build.engine);
    dst_ = StagedMemory(data_md, layout, build.engine);
    for (auto* m : {&scale_, &shift_, &running_mean_, &running_var_}) {
      *m = dnnl::memory(channel_md, build.engine, nullptr);
    }
    for (auto* m : {&saved_mean_, &saved_variance_}) {
      *m = dnnl::memory(channel_md, build.engine, nullptr);
    }
    training_ = PreparedPrimitive(make(dnnl::prop_kind::forward_training, scale_and_shift()),
                                  {{DNNL_ARG_SRC, src_.used()},
                                   {DNNL_ARG_DST, dst_.used()},
                                   {DNNL_ARG_SCALE, scale_},
                                   {DNNL_ARG_SHIFT, shift_},
                                   {DNNL_ARG_MEAN, saved_mean_},
                                   {DNNL_ARG_VARIANCE, saved_variance_}});
    inference_ =
        PreparedPrimitive(make(dnnl::prop_kind::forward_inference, global_scale_and_shift()),
                          {{DNNL_ARG_SRC, src_.used()},
                           {DNNL_ARG_DST, dst_.used()},
                           {DNNL_ARG_SCALE, scale_},
                           {DNNL_ARG_SHIFT, shift_},
                           {DNNL_ARG_MEAN, running_mean_},
                           {DNNL_ARG_VARIANCE, running_var_}});
  }

  void run(const KernelCall& call) override {
    dnnl::stream& stream = *call.context.stream;
    scale_.set_data_handle(handle(call.inputs[1]));
    shift_.set_data_handle(handle(call.inputs[2]));
    running_mean_.set_data_handle(handle(call.inputs[3]));
    running_var_.set_data_handle(handle(call.inputs[4]));
    if (call.context.training) require_batch_statistics(call, geometry_);
    src_.load(stream, call.inputs[0].raw());
    dst_.bind(call.outputs[0].raw());
    float* saved_mean = call.outputs[1].data<float>();
    float* saved_variance = call.outputs[2].data<float>();
    if (call.context.training) {
      saved_mean_.set_data_handle(saved_mean);
      saved_variance_.set_data_handle(saved_variance);
      training_.execute(stream, "batch_norm");
      dst_.store(stream);
      stream.wait();  // the statistics are read on the host below
      update_running_statistics<float>(call, geometry_, saved_mean, saved_variance);
    } else {
      inference_.execute(stream, "batch_norm");
      dst_.store(stream);
      const float* running_mean = call.inputs[3].data<float>();
      const float* running_var = call.inputs[4].data<float>();
      std::copy(running_mean, running_mean + geometry_.channels, saved_mean);
      std::copy(running_var, running_var + geometry_.channels, saved_variance);
    }
  }

 private:
  ChannelGeometry geometry_;
  StagedMemory src_, dst_;
  dnnl::memory scale_, shift_, running_mean_, running_var_, saved_mean_, saved_variance_;
  PreparedPrimitive training_, inference_;
};

KernelFactory batch_norm_onednn() {
  return [](const KernelBuild& build) -> std::unique_ptr<Kernel> {
    if (build.inputs[0].dtype != DType::f32 || build.inputs[0].numel() == 0) return nullptr;
    return std::make_unique<BatchNormForwardKernel>(build);
  };
}

// x, gamma, beta, running_mean, running_var.
std::vector<InputSpec> batch_norm_inputs(const Shape& x_shape) {
  const std::int64_t channels = x_shape[1];
  return {spec(x_shape, -2.0, 2.0), spec({channels}, 0.5, 1.5), spec({channels}), spec({channels}),
          spec({channels}, 0.5, 1.5) /* running_var: positive */};
}

// dy, x, gamma, running_mean, running_var, saved_mean, saved_variance and, when
// `with_statistics_grads`, the gradients of the two saved statistics. The saved statistics are
// random, not those of x: the kernels must use what they are given.
std::vector<InputSpec> batch_norm_grad_inputs(const Shape& x_shape, bool with_statistics_grads) {
  const std::int64_t channels = x_shape[1];
  std::vector<InputSpec> inputs{spec(x_shape),
                                spec(x_shape, -2.0, 2.0),
                                spec({channels}, 0.5, 1.5),
                                spec({channels}),
                                spec({channels}, 0.5, 1.5),
                                spec({channels}, -0.5, 0.5),
                                spec({channels}, 0.5, 1.5)};
  if (with_statistics_grads) {
    inputs.push_back(spec({channels}));
    inputs.push_back(spec({channels}));
  }
  return inputs;
}

Attrs batch_norm_attrs(double momentum = 0.1, double epsilon = 1e-5) {
  return Attrs{{"momentum", momentum}, {"epsilon", epsilon}};
}

void register_batch_norm(OpRegistry& registry) {
  OpDef def;
  def.name = "batch_norm";
  def.formula =
      "y = γ_c (x − μ_c) / √(σ²_c + ε) + β_c per channel c; training: batch mean and biased "
      "variance over N,H,W, and running_mean/var updated in place (momentum, unbiased "
      "variance); inference: running statistics";
  def.min_inputs = def.max_inputs = 5;
  def.shape = batch_norm_rule;
  def.backward = [](const BackwardCall& c) -> std::vector<std::optional<Value>> {
    const auto& in = c.inputs;
    // The backward reads the statistics the forward saved (outputs 1 and 2) instead of
    // computing them again.
    std::vector<Value> operands{c.grad(0), in[0], in[1], in[3], in[4], c.outputs[1], c.outputs[2]};
    // When the saved statistics themselves reach the loss (the registry's gradcheck combines
    // every output), their gradients go to batch_norm_grad too: only it knows the run's mode,
    // which decides whether they depend on x or on the running statistics.
    if (c.output_grads[1] || c.output_grads[2]) {
      operands.push_back(c.grad(1));
      operands.push_back(c.grad(2));
    }
    std::vector<Value> grads = c.graph.add_node("batch_norm_grad", std::move(operands),
                                                {{"epsilon", c.attrs().real("epsilon")}});
    // grads: dx, dgamma, dbeta, drunning_mean, drunning_var; inputs: x, gamma, beta, mean, var.
    std::vector<std::optional<Value>> result(5);
    for (std::size_t i = 0; i < 5; ++i) {
      if (c.needs[i]) result[i] = grads[i];
    }
    return result;
  };
  def.second_order = false;  // batch_norm_grad has no backward rule
  def.reference = batch_norm_reference;
  def.onednn = batch_norm_onednn();
  def.samples = [] {
    return std::vector<Sample>{
        {"[N, C]", batch_norm_inputs({6, 3}), batch_norm_attrs()},
        {"[N, C, H, W]", batch_norm_inputs({2, 3, 2, 2}), batch_norm_attrs(0.2, 1e-3)},
        {"one image, 3x3", batch_norm_inputs({1, 2, 3, 3}), batch_norm_attrs()},
    };
  };
  def.error_samples = [] {
    auto inputs = batch_norm_inputs({4, 3});
    auto rank3 = inputs;
    rank3[0] = spec({4, 3, 2});
    auto wrong_gamma = inputs;
    wrong_gamma[1] = spec({4});
    auto wrong_var = inputs;
    wrong_var[4] = spec({3, 1});
    return std::vector<ErrorSample>{
        {"x of rank 3", rank3, batch_norm_attrs(), "must be [N, C] or [N, C, H, W]"},
        {"gamma of 4 channels", wrong_gamma, batch_norm_attrs(), "gamma must be [3]"},
        {"running_var of rank 2", wrong_var, batch_norm_attrs(), "running_var must be [3]"},
        {"momentum above 1", inputs, batch_norm_attrs(1.5), "momentum 1.5 is outside [0, 1]"},
        {"epsilon zero", inputs, batch_norm_attrs(0.1, 0.0), "epsilon 0 must be positive"},
    };
  };
  registry.add(std::move(def));
}

// ---- batch_norm_grad ----------------------------------------------------------------------

std::vector<TensorDesc> batch_norm_grad_rule(const ShapeCall& call) {
  require_floating(call, 0);
  require_same_dtype(call);
  if (call.inputs.size() != 7 && call.inputs.size() != 9) {
    call.fail(
        "takes 7 inputs (dy, x, gamma, running_mean, running_var, saved_mean, saved_variance) "
        "or 9 (and the gradients of the two saved statistics), got {}",
        call.inputs.size());
  }
  const TensorDesc& x = call.inputs[1];
  if (call.inputs[0] != x) call.fail("dy {} must have the desc of x {}", call.inputs[0], x);
  check_channel_inputs(call, x, 2,
                       {"gamma", "running_mean", "running_var", "saved_mean", "saved_variance"});
  if (call.inputs.size() == 9) {
    check_channel_inputs(call, x, 7,
                         {"the gradient of saved_mean", "the gradient of saved_variance"});
  }
  require_epsilon(call);
  const TensorDesc channel = call.inputs[2];
  return {x, channel, channel, channel, channel};
}

void batch_norm_grad_reference(const KernelCall& call) {
  const Tensor& x = call.inputs[1];
  const ChannelGeometry geometry(x.shape());
  const bool training = call.context.training;
  const double epsilon = call.attrs().real("epsilon");
  const double count = static_cast<double>(geometry.per_channel());
  dispatch_floating(x.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const T* diff_dst = call.inputs[0].data<T>();
    const T* src = x.data<T>();
    const T* gamma = call.inputs[2].data<T>();
    const T* running_mean = call.inputs[3].data<T>();
    const T* running_var = call.inputs[4].data<T>();
    T* diff_src = call.outputs[0].data<T>();
    T* diff_gamma = call.outputs[1].data<T>();
    T* diff_beta = call.outputs[2].data<T>();
    T* diff_running_mean = call.outputs[3].data<T>();
    T* diff_running_var = call.outputs[4].data<T>();
    // The statistics y was normalised with: saved by the forward (training) or the running ones.
    const T* mean = training ? call.inputs[5].data<T>() : running_mean;
    const T* variance = training ? call.inputs[6].data<T>() : running_var;
    const bool with_statistics_grads = call.inputs.size() == 9;
    for (std::int64_t c = 0; c < geometry.channels; ++c) {
      const double mu = static_cast<double>(mean[c]);
      const double inverse_std = 1.0 / std::sqrt(static_cast<double>(variance[c]) + epsilon);
      const double g = static_cast<double>(gamma[c]);
      const double diff_mean =
          with_statistics_grads ? static_cast<double>(call.inputs[7].data<T>()[c]) : 0.0;
      const double diff_variance =
          with_statistics_grads ? static_cast<double>(call.inputs[8].data<T>()[c]) : 0.0;
      double sum_dy = 0.0, sum_dy_xhat = 0.0;
      for (std::int64_t n = 0; n < geometry.batch; ++n) {
        for (std::int64_t s = 0; s < geometry.spatial; ++s) {
          const std::int64_t i = geometry.index(n, c, s);
          const double xhat = (static_cast<double>(src[i]) - mu) * inverse_std;
          sum_dy += static_cast<double>(diff_dst[i]);
          sum_dy_xhat += static_cast<double>(diff_dst[i]) * xhat;
        }
      }
      diff_beta[c] = static_cast<T>(sum_dy);
      diff_gamma[c] = static_cast<T>(sum_dy_xhat);
      for (std::int64_t n = 0; n < geometry.batch; ++n) {
        for (std::int64_t s = 0; s < geometry.spatial; ++s) {
          const std::int64_t i = geometry.index(n, c, s);
          const double dy = static_cast<double>(diff_dst[i]);
          if (training) {
            const double centred = static_cast<double>(src[i]) - mu;
            const double xhat = centred * inverse_std;
            diff_src[i] = static_cast<T>(g * inverse_std / count *
                                             (count * dy - sum_dy - xhat * sum_dy_xhat) +
                                         (diff_mean + 2.0 * diff_variance * centred) / count);
          } else {
            diff_src[i] = static_cast<T>(g * inverse_std * dy);
          }
        }
      }
      diff_running_mean[c] = static_cast<T>(training ? 0.0 : -g * inverse_std * sum_dy + diff_mean);
      diff_running_var[c] = static_cast<T>(
          training ? 0.0 : -0.5 * g * inverse_std * inverse_std * sum_dy_xhat + diff_variance);
    }
  });
}

// oneDNN batch_normalization_backward, f32. Training: MEAN/VARIANCE are the statistics the
// forward saved (inputs 5 and 6), so nothing is computed again. Inference: use_global_stats with
// the running statistics; the running statistics' gradients follow from dγ and dβ on the host.
// The gradients of the saved statistics (inputs 7 and 8, present only when they reach a loss)
// are added on the host after the primitive. Layouts as in the forward kernel.
// Precision: oneDNN accumulates the saved statistics in f32 (and their rounding depends on the
// thread count); the forward's y already used them. Measured against dx with statistics in
// double (the old recomputation), at [128,32,28,28] and [128,64,14,14]: |Δdx| / (1 + |dx|) up
// to 3e-6 for data of mean ~0–5 and up to 3.5e-5 for mean ~100 and variance 1.
class BatchNormBackwardKernel final : public Kernel {
 public:
  explicit BatchNormBackwardKernel(const KernelBuild& build)
      : geometry_(build.inputs[1].shape), epsilon_(build.node.attrs.real("epsilon")) {
    const float epsilon = static_cast<float>(epsilon_);
    const auto data_md = geometry_.data_md();
    const auto layout = geometry_.spatial > 1 ? channel_blocked_md(data_md) : data_md;
    const auto channel_md = geometry_.channel_md();
    using dnnl::batch_normalization_backward;
    using dnnl::batch_normalization_forward;
    auto make = [&](dnnl::normalization_flags flags) {
      batch_normalization_forward::primitive_desc hint(
          batch_normalization_forward::desc(dnnl::prop_kind::forward_training, layout, epsilon,
                                            flags),
          build.engine);
      return batch_normalization_backward(batch_normalization_backward::primitive_desc(
          batch_normalization_backward::desc(dnnl::prop_kind::backward, layout, layout, epsilon,
                                             flags),
          build.engine, hint));
    };
    diff_dst_ = StagedMemory(data_md, layout, build.engine);
    src_ = StagedMemory(data_md, layout, build.engine);
    diff_src_ = StagedMemory(data_md, layout, build.engine);
    for (auto* m : {&scale_, &running_mean_, &running_var_, &saved_mean_, &saved_variance_,
                    &diff_scale_, &diff_shift_}) {
      *m = dnnl::memory(channel_md, build.engine, nullptr);
    }
    unused_shift_.assign(static_cast<std::size_t>(geometry_.channels), 0.f);
    unused_shift_memory_ = dnnl::memory(channel_md, build.engine, unused_shift_.data());
    // oneDNN 2.6 requires SHIFT to be bound on backward with use_shift, though the gradients do
    // not depend on it: bind zeros.
    auto args = [&](const dnnl::memory& mean, const dnnl::memory& variance) {
      return std::vector<std::pair<int, dnnl::memory>>{{DNNL_ARG_DIFF_DST, diff_dst_.used()},
                                                       {DNNL_ARG_SRC, src_.used()},
                                                       {DNNL_ARG_SCALE, scale_},
                                                       {DNNL_ARG_DIFF_SRC, diff_src_.used()},
                                                       {DNNL_ARG_DIFF_SCALE, diff_scale_},
                                                       {DNNL_ARG_DIFF_SHIFT, diff_shift_},
                                                       {DNNL_ARG_SHIFT, unused_shift_memory_},
                                                       {DNNL_ARG_MEAN, mean},
                                                       {DNNL_ARG_VARIANCE, variance}};
    };
    training_ = PreparedPrimitive(make(scale_and_shift()), args(saved_mean_, saved_variance_));
    inference_ =
        PreparedPrimitive(make(global_scale_and_shift()), args(running_mean_, running_var_));
  }

  void run(const KernelCall& call) override {
    dnnl::stream& stream = *call.context.stream;
    scale_.set_data_handle(handle(call.inputs[2]));
    running_mean_.set_data_handle(handle(call.inputs[3]));
    running_var_.set_data_handle(handle(call.inputs[4]));
    saved_mean_.set_data_handle(handle(call.inputs[5]));
    saved_variance_.set_data_handle(handle(call.inputs[6]));
    diff_scale_.set_data_handle(call.outputs[1].raw());
    diff_shift_.set_data_handle(call.outputs[2].raw());
    float* diff_running_mean = call.outputs[3].data<float>();
    float* diff_running_var = call.outputs[4].data<float>();
    diff_dst_.load(stream, call.inputs[0].raw());
    src_.load(stream, call.inputs[1].raw());
    diff_src_.bind(call.outputs[0].raw());
    const bool with_statistics_grads = call.inputs.size() == 9;
    const std::int64_t channels = geometry_.channels;
    if (call.context.training) {
      training_.execute(stream, "batch_norm_grad");
      diff_src_.store(stream);
      std::fill(diff_running_mean, diff_running_mean + channels, 0.f);
      std::fill(diff_running_var, diff_running_var + channels, 0.f);
      if (with_statistics_grads) {
        stream.wait();  // dx is updated on the host below
        add_statistics_gradients(call);
      }
    } else {
      inference_.execute(stream, "batch_norm_grad");
      diff_src_.store(stream);
      stream.wait();  // dγ and dβ are read on the host below
      const float* gamma = call.inputs[2].data<float>();
      const float* running_var = call.inputs[4].data<float>();
      const float* diff_gamma = call.outputs[1].data<float>();
      const float* diff_beta = call.outputs[2].data<float>();
      for (std::int64_t c = 0; c < channels; ++c) {
        const double inverse_std = 1.0 / std::sqrt(static_cast<double>(running_var[c]) + epsilon_);
        const double g = static_cast<double>(gamma[c]);
        diff_running_mean[c] =
            static_cast<float>(-g * inverse_std * static_cast<double>(diff_beta[c]));
        diff_running_var[c] = static_cast<float>(-0.5 * g * inverse_std * inverse_std *
                                                 static_cast<double>(diff_gamma[c]));
      }
      if (with_statistics_grads) {  // the saved statistics are the running ones
        for (std::int64_t c = 0; c < channels; ++c) {
          diff_running_mean[c] += call.inputs[7].data<float>()[c];
          diff_running_var[c] += call.inputs[8].data<float>()[c];
        }
      }
    }
  }

 private:
  // Training: dx += (dμ + 2 dσ² (x − μ)) / M, on the plain (NCHW) dx.
  void add_statistics_gradients(const KernelCall& call) const {
    const float* src = call.inputs[1].data<float>();
    const float* mean = call.inputs[5].data<float>();
    const float* diff_mean = call.inputs[7].data<float>();
    const float* diff_variance = call.inputs[8].data<float>();
    float* diff_src = call.outputs[0].data<float>();
    const float inverse_count = 1.0f / static_cast<float>(geometry_.per_channel());
    for (std::int64_t n = 0; n < geometry_.batch; ++n) {
      for (std::int64_t c = 0; c < geometry_.channels; ++c) {
        for (std::int64_t s = 0; s < geometry_.spatial; ++s) {
          const std::int64_t i = geometry_.index(n, c, s);
          diff_src[i] +=
              (diff_mean[c] + 2.0f * diff_variance[c] * (src[i] - mean[c])) * inverse_count;
        }
      }
    }
  }

  ChannelGeometry geometry_;
  double epsilon_;
  StagedMemory diff_dst_, src_, diff_src_;
  dnnl::memory scale_, running_mean_, running_var_, saved_mean_, saved_variance_, diff_scale_,
      diff_shift_;
  std::vector<float> unused_shift_;
  dnnl::memory unused_shift_memory_;
  PreparedPrimitive training_, inference_;
};

void register_batch_norm_grad(OpRegistry& registry) {
  OpDef def;
  def.name = "batch_norm_grad";
  def.formula =
      "batch_norm's backward: {dx, dγ, dβ, drunning_mean, drunning_var} from dy, x, γ, the "
      "running and the saved statistics (and optionally dμ, dσ² of the saved ones); training "
      "(x̂ from the saved μ, σ²): dβ = Σ dy, dγ = Σ dy x̂, dx = γ/(M σ̂) (M dy − dβ − x̂ dγ) "
      "[+ (dμ + 2 dσ² (x − μ))/M]; inference: dx = γ dy / σ̂, drunning_mean = −γ dβ / σ̂ "
      "[+ dμ], drunning_var = −γ dγ / (2 σ̂²) [+ dσ²]";
  def.min_inputs = 7;
  def.max_inputs = 9;
  def.shape = batch_norm_grad_rule;
  def.no_gradient = "second-order gradients of batch_norm are not implemented";
  def.reference = batch_norm_grad_reference;
  def.onednn = [](const KernelBuild& build) -> std::unique_ptr<Kernel> {
    if (build.inputs[1].dtype != DType::f32 || build.inputs[1].numel() == 0) return nullptr;
    return std::make_unique<BatchNormBackwardKernel>(build);
  };
  def.samples = [] {
    Attrs attrs{{"epsilon", 1e-5}};
    return std::vector<Sample>{
        {"[N, C]", batch_norm_grad_inputs({6, 3}, false), attrs},
        {"[N, C, H, W]", batch_norm_grad_inputs({2, 3, 2, 2}, false), attrs},
        {"with the saved statistics' gradients", batch_norm_grad_inputs({2, 3, 2, 2}, true), attrs},
    };
  };
  def.error_samples = [] {
    const Attrs attrs{{"epsilon", 1e-5}};
    auto wrong_dy = batch_norm_grad_inputs({4, 3}, false);
    wrong_dy[0] = spec({4, 2});
    auto wrong_saved = batch_norm_grad_inputs({4, 3}, false);
    wrong_saved[6] = spec({2});
    auto eight = batch_norm_grad_inputs({4, 3}, true);
    eight.pop_back();
    return std::vector<ErrorSample>{
        {"dy of another shape", wrong_dy, attrs, "must have the desc of x"},
        {"saved_variance of 2 channels", wrong_saved, attrs, "saved_variance must be [3]"},
        {"one saved statistic's gradient", eight, attrs, "takes 7 inputs"}};
  };
  registry.add(std::move(def));
}

// ---- layer_norm ---------------------------------------------------------------------------

// The trailing axes from `first`, which layer_norm normalises over (also gamma's shape).
Shape trailing_shape(const Shape& shape, int first) {
  return Shape(std::vector<std::int64_t>(shape.dims().begin() + first, shape.dims().end()));
}

std::vector<TensorDesc> layer_norm_rule(const ShapeCall& call) {
  require_floating(call, 0);
  require_same_dtype(call);
  const TensorDesc& x = call.inputs[0];
  if (x.shape.rank() == 0) call.fail("x must have at least one axis, got {}", x);
  const std::int64_t axis = call.attrs.integer("axis");
  const Shape normalized = trailing_shape(x.shape, normalize_axis(axis, x.shape.rank(), call.site));
  const char* names[] = {"gamma", "beta"};
  for (std::size_t i = 1; i <= 2; ++i) {
    if (call.inputs[i].shape != normalized) {
      call.fail("{} must have the shape {} of x {} from axis {}, got {}", names[i - 1], normalized,
                x, axis, call.inputs[i]);
    }
  }
  require_epsilon(call);
  return {x};
}

// x viewed as [rows, D], D = the number of normalised elements per row.
std::pair<std::int64_t, std::int64_t> layer_norm_rows(const Shape& shape, const Attrs& attrs) {
  const int first = normalize_axis(attrs.integer("axis"), shape.rank(), "layer_norm");
  const std::int64_t width = trailing_shape(shape, first).numel();
  return {width == 0 ? 0 : shape.numel() / width, width};
}

void layer_norm_reference(const KernelCall& call) {
  const Tensor& x = call.inputs[0];
  const auto [rows, width] = layer_norm_rows(x.shape(), call.attrs());
  const double epsilon = call.attrs().real("epsilon");
  dispatch_floating(x.dtype(), [&](auto zero) {
    using T = decltype(zero);
    const T* src = x.data<T>();
    const T* gamma = call.inputs[1].data<T>();
    const T* beta = call.inputs[2].data<T>();
    T* dst = call.outputs[0].data<T>();
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* row = src + r * width;
      double total = 0.0;
      for (std::int64_t j = 0; j < width; ++j) total += static_cast<double>(row[j]);
      const double mu = total / static_cast<double>(width);
      double squares = 0.0;
      for (std::int64_t j = 0; j < width; ++j) {
        const double d = static_cast<double>(row[j]) - mu;
        squares += d * d;
      }
      const double inverse_std = 1.0 / std::sqrt(squares / static_cast<double>(width) + epsilon);
      for (std::int64_t j = 0; j < width; ++j) {
        dst[r * width + j] = static_cast<T>(static_cast<double>(gamma[j]) *
                                                (static_cast<double>(row[j]) - mu) * inverse_std +
                                            static_cast<double>(beta[j]));
      }
    }
  });
}

// oneDNN layer_normalization_forward (f32) on the [rows, D] view; the statistics are computed
// inside the primitive and not kept (the backward recomputes them with ops).
std::unique_ptr<Kernel> layer_norm_onednn(const KernelBuild& build) {
  if (build.inputs[0].dtype != DType::f32 || build.inputs[0].numel() == 0) return nullptr;
  const auto [rows, width] = layer_norm_rows(build.inputs[0].shape, build.node.attrs);
  const auto data_md = plain_md(Shape{rows, width}, DType::f32);
  const auto channel_md = plain_md(Shape{width}, DType::f32);
  const float epsilon = static_cast<float>(build.node.attrs.real("epsilon"));
  dnnl::layer_normalization_forward::primitive_desc pd(
      dnnl::layer_normalization_forward::desc(dnnl::prop_kind::forward_inference, data_md, epsilon,
                                              scale_and_shift()),
      build.engine);
  return std::make_unique<PrimitiveKernel>(
      dnnl::layer_normalization_forward(pd),
      std::vector<PrimitiveArg>{
          input_arg(DNNL_ARG_SRC, 0, data_md), input_arg(DNNL_ARG_SCALE, 1, channel_md),
          input_arg(DNNL_ARG_SHIFT, 2, channel_md), output_arg(DNNL_ARG_DST, 0, data_md)});
}

// layer_norm's backward, built from ops so it can be differentiated again. With the
// statistics recomputed from x, x̂ = (x − μ) σ̂⁻¹ and h = dy γ (means over the normalised axes):
//   dβ = Σ_rows dy,  dγ = Σ_rows dy x̂,  dx = σ̂⁻¹ (h − mean(h) − x̂ mean(h x̂)).
std::vector<std::optional<Value>> layer_norm_backward(const BackwardCall& c) {
  const Value& x = c.inputs[0];
  const Value& gamma = c.inputs[1];
  const Value dy = c.grad();
  const int first = normalize_axis(c.attrs().integer("axis"), x.rank(), "layer_norm");
  std::vector<std::int64_t> axes;
  for (int i = first; i < x.rank(); ++i) axes.push_back(i);
  const Value centred = sub(x, mean(x, axes, true));
  const Value variance = mean(mul(centred, centred), axes, true);
  const Value inverse_std =
      exp(mul(log(add(variance, scalar_like(x, c.attrs().real("epsilon")))), scalar_like(x, -0.5)));
  const Value normalized = mul(centred, inverse_std);
  std::optional<Value> dx, dgamma, dbeta;
  if (c.needs[0]) {
    const Value h = mul(dy, gamma);
    const Value h_mean = mean(h, axes, true);
    const Value projection = mean(mul(h, normalized), axes, true);
    dx = mul(inverse_std, sub(sub(h, h_mean), mul(normalized, projection)));
  }
  if (c.needs[1]) dgamma = unbroadcast(mul(dy, normalized), gamma.shape());
  if (c.needs[2]) dbeta = unbroadcast(dy, c.inputs[2].shape());
  return {dx, dgamma, dbeta};
}

void register_layer_norm(OpRegistry& registry) {
  OpDef def;
  def.name = "layer_norm";
  def.formula =
      "y = γ (x − μ) / √(σ² + ε) + β, μ and biased σ² over the trailing axes from `axis` "
      "(γ, β of those axes' shape); the same in training and inference";
  def.min_inputs = def.max_inputs = 3;
  def.shape = layer_norm_rule;
  def.backward = layer_norm_backward;
  def.second_order = true;
  def.reference = layer_norm_reference;
  def.onednn = layer_norm_onednn;
  def.samples = [] {
    auto attrs = [](std::int64_t axis, double epsilon) {
      return Attrs{{"axis", axis}, {"epsilon", epsilon}};
    };
    auto inputs = [](Shape x, Shape normalized) {
      return std::vector<InputSpec>{spec(std::move(x), -2.0, 2.0), spec(normalized, 0.5, 1.5),
                                    spec(normalized)};
    };
    return std::vector<Sample>{
        {"matrix, last axis", inputs({3, 4}, {4}), attrs(-1, 1e-5)},
        {"rank 3, last two axes", inputs({2, 3, 4}, {3, 4}), attrs(1, 1e-5)},
        {"rank 3, last axis, epsilon 1e-3", inputs({2, 3, 4}, {4}), attrs(-1, 1e-3)},
        {"vector", inputs({5}, {5}), attrs(0, 1e-5)},
    };
  };
  def.error_samples = [] {
    Attrs attrs{{"axis", std::int64_t{-1}}, {"epsilon", 1e-5}};
    return std::vector<ErrorSample>{
        {"gamma of another shape",
         {spec({2, 4}), spec({2}), spec({4})},
         attrs,
         "gamma must have the shape [4]"},
        {"beta of another shape",
         {spec({2, 4}), spec({4}), spec({2, 4})},
         attrs,
         "beta must have the shape [4]"},
        {"axis out of range",
         {spec({2, 4}), spec({4}), spec({4})},
         Attrs{{"axis", std::int64_t{2}}, {"epsilon", 1e-5}},
         "out of range"},
        {"epsilon zero",
         {spec({2, 4}), spec({4}), spec({4})},
         Attrs{{"axis", std::int64_t{-1}}, {"epsilon", 0.0}},
         "epsilon 0 must be positive"},
    };
  };
  registry.add(std::move(def));
}

// ---- penalties ----------------------------------------------------------------------------

void check_penalty_params(const std::vector<Value>& params, std::string_view what) {
  if (params.empty()) throw GraphError(fmt::format("{}: the list of parameters is empty", what));
  for (const Value& p : params) {
    if (!p.valid()) throw GraphError(fmt::format("{}: a parameter is an empty Value", what));
    if (&p.graph() != &params[0].graph()) {
      throw GraphError(fmt::format("{}: \"{}\" belongs to another graph than \"{}\"", what, p.str(),
                                   params[0].str()));
    }
    if (p.dtype() != params[0].dtype()) {
      throw GraphError(fmt::format("{}: \"{}\" is {} but \"{}\" is {}; use one dtype", what,
                                   p.str(), p.desc(), params[0].str(), params[0].desc()));
    }
  }
}

// Σ_p Σ_i |w_pi|, with |w| = relu(w) + relu(−w).
Value sum_of_magnitudes(const std::vector<Value>& params) {
  Value total;
  for (const Value& p : params) {
    Value term = sum(add(relu(p), relu(neg(p))));
    total = total.valid() ? add(total, term) : term;
  }
  return total;
}

Value sum_of_squares(const std::vector<Value>& params) {
  Value total;
  for (const Value& p : params) {
    Value term = sum(mul(p, p));
    total = total.valid() ? add(total, term) : term;
  }
  return total;
}

}  // namespace

// ---- builders -----------------------------------------------------------------------------

std::vector<Value> dropout_with_mask(const Value& x, double rate, std::int64_t seed,
                                     bool vary_with_step, std::source_location where) {
  if (!x.valid()) throw GraphError("dropout: the input is an empty Value");
  return x.graph().add_node(
      "dropout", {x}, {{"rate", rate}, {"seed", seed}, {"vary_with_step", vary_with_step}}, where);
}

Value dropout(const Value& x, double rate, std::int64_t seed, bool vary_with_step,
              std::source_location where) {
  return dropout_with_mask(x, rate, seed, vary_with_step, where)[0];
}

Value dropconnect(const Value& w, double rate, std::int64_t seed, bool vary_with_step,
                  std::source_location where) {
  if (!w.valid()) throw GraphError("dropconnect: the input is an empty Value");
  return w.graph().add_node("dropconnect", {w},
                            {{"rate", rate}, {"seed", seed}, {"vary_with_step", vary_with_step}},
                            where)[0];
}

std::vector<Value> batch_norm_with_statistics(const Value& x, const Value& gamma, const Value& beta,
                                              const Value& running_mean, const Value& running_var,
                                              double momentum, double epsilon,
                                              std::source_location where) {
  if (!x.valid()) throw GraphError("batch_norm: the input is an empty Value");
  return x.graph().add_node("batch_norm", {x, gamma, beta, running_mean, running_var},
                            {{"momentum", momentum}, {"epsilon", epsilon}}, where);
}

Value batch_norm(const Value& x, const Value& gamma, const Value& beta, const Value& running_mean,
                 const Value& running_var, double momentum, double epsilon,
                 std::source_location where) {
  return batch_norm_with_statistics(x, gamma, beta, running_mean, running_var, momentum, epsilon,
                                    where)[0];
}

std::vector<Value> batch_norm_grad(const Value& dy, const Value& x, const Value& gamma,
                                   const Value& running_mean, const Value& running_var,
                                   const Value& saved_mean, const Value& saved_variance,
                                   double epsilon, std::source_location where) {
  if (!dy.valid()) throw GraphError("batch_norm_grad: the input is an empty Value");
  return dy.graph().add_node("batch_norm_grad",
                             {dy, x, gamma, running_mean, running_var, saved_mean, saved_variance},
                             {{"epsilon", epsilon}}, where);
}

Value layer_norm(const Value& x, const Value& gamma, const Value& beta, std::int64_t axis,
                 double epsilon, std::source_location where) {
  if (!x.valid()) throw GraphError("layer_norm: the input is an empty Value");
  return x.graph().apply("layer_norm", {x, gamma, beta}, {{"axis", axis}, {"epsilon", epsilon}},
                         where);
}

Value l1_penalty(const std::vector<Value>& params, double lambda) {
  check_penalty_params(params, "l1_penalty");
  return mul(sum_of_magnitudes(params), scalar_like(params[0], lambda));
}

Value l2_penalty(const std::vector<Value>& params, double lambda) {
  check_penalty_params(params, "l2_penalty");
  return mul(sum_of_squares(params), scalar_like(params[0], 0.5 * lambda));
}

Value elastic_net_penalty(const std::vector<Value>& params, double l1, double l2) {
  check_penalty_params(params, "elastic_net_penalty");
  return add(mul(sum_of_magnitudes(params), scalar_like(params[0], l1)),
             mul(sum_of_squares(params), scalar_like(params[0], 0.5 * l2)));
}

void register_normalization_ops(OpRegistry& registry) {
  register_dropout_like(
      registry, "dropout",
      "training: y = x · m / (1 − rate), m ~ Bernoulli(1 − rate) (splitmix64 "
      "of seed, run seed, node); inference: y = x. Outputs y and the scaled mask");
  register_dropout_like(registry, "dropconnect",
                        "dropout on a weight tensor: training: w · m / (1 − rate), m ~ "
                        "Bernoulli(1 − rate); inference: w. Outputs w' and the scaled mask");
  register_batch_norm(registry);
  register_batch_norm_grad(registry);
  register_layer_norm(registry);
}

}  // namespace dagrad
