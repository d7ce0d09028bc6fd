// dropout, dropconnect, batch_norm, batch_norm_grad, layer_norm (registered ops) and the weight
// penalties (composites). Kernels: oneDNN layer_normalization forward for f32; own vectorised
// loops over NCHW for batch_norm and batch_norm_grad in f32 (faster than oneDNN's, see below);
// plain loops for the reference; dropout (which oneDNN 2.6 has no primitive for) has its own
// parallel vectorised loop for f32 with the reference's mask.
#include "ops/normalization.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>

#include "ops/common.hpp"
#include "ops/cpu.hpp"
#include "ops/elementwise.hpp"
#include "ops/reduction.hpp"
#include "ops/shape.hpp"
#include "runtime/primitive_kernel.hpp"

#ifdef DAGRAD_X86
#include <immintrin.h>
#endif

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

// dropout's f32 kernel: the reference's mask, bit for bit, in parallel vectorised loops. The
// reference's test u >= rate with u = k · 2⁻⁵³ (k the top 53 bits of the element's splitmix64
// output) is the integer test k >= ⌈rate · 2⁵³⌉ (both sides exact: scaling by a power of two
// loses nothing and k < 2⁵³). AVX2 computes eight elements' splitmix64 at a time, its 64-bit
// products from 32-bit ones; split across the threads from 32k elements. The reference loop
// (one thread, scalar, a double per element) took ~13 ns per element: 1.7 ms for the cnn
// preset's [128, 1024] activations.
constexpr std::uint64_t golden_gamma = 0x9E3779B97F4A7C15ull;

// Elements [first, last) of the scaled mask and y = x · mask, as the reference computes them.
void dropout_range(const float* x, float* y, float* mask, std::uint64_t key, std::int64_t threshold,
                   float kept, std::int64_t first, std::int64_t last) {
  for (std::int64_t i = first; i < last; ++i) {
    const std::uint64_t z = splitmix64(key + static_cast<std::uint64_t>(i));
    const float m = static_cast<std::int64_t>(z >> 11) >= threshold ? kept : 0.0f;
    mask[i] = m;
    y[i] = x[i] * m;
  }
}

#ifdef DAGRAD_X86
// The low 64 bits of a · c in each lane, c's halves given apart.
[[gnu::target("avx2")]] inline __m256i multiply64(__m256i a, __m256i c_low, __m256i c_high) {
  const __m256i cross = _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a, 32), c_low),
                                         _mm256_mul_epu32(a, c_high));
  return _mm256_add_epi64(_mm256_mul_epu32(a, c_low), _mm256_slli_epi64(cross, 32));
}

// splitmix64 of four consecutive counters z (golden_gamma already added), shifted right by 11,
// compared with threshold: all ones in a 64-bit lane where the element is kept.
[[gnu::target("avx2")]] inline __m256i kept_lanes(__m256i z, __m256i threshold_minus_1) {
  const __m256i m1_low = _mm256_set1_epi64x(0xBF58476D1CE4E5B9ull & 0xFFFFFFFFull);
  const __m256i m1_high = _mm256_set1_epi64x(0xBF58476D1CE4E5B9ull >> 32);
  const __m256i m2_low = _mm256_set1_epi64x(0x94D049BB133111EBull & 0xFFFFFFFFull);
  const __m256i m2_high = _mm256_set1_epi64x(0x94D049BB133111EBull >> 32);
  z = multiply64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 30)), m1_low, m1_high);
  z = multiply64(_mm256_xor_si256(z, _mm256_srli_epi64(z, 27)), m2_low, m2_high);
  z = _mm256_xor_si256(z, _mm256_srli_epi64(z, 31));
  return _mm256_cmpgt_epi64(_mm256_srli_epi64(z, 11), threshold_minus_1);
}

[[gnu::target("avx2")]] void dropout_range_avx2(const float* x, float* y, float* mask,
                                                std::uint64_t key, std::int64_t threshold,
                                                float kept, std::int64_t first, std::int64_t last) {
  const __m256i limit = _mm256_set1_epi64x(threshold - 1);
  const __m256 kept_v = _mm256_set1_ps(kept);
  const __m256i step = _mm256_set1_epi64x(8);
  __m256i low = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(
                                     key + golden_gamma + static_cast<std::uint64_t>(first))),
                                 _mm256_setr_epi64x(0, 1, 2, 3));
  __m256i high = _mm256_add_epi64(low, _mm256_set1_epi64x(4));
  std::int64_t i = first;
  for (; i + 8 <= last; i += 8) {
    // Lanes of the two 64-bit masks, in element order: [0 1 4 5 | 2 3 6 7] from the shuffle,
    // then 64-bit pairs reordered to [0 1 2 3 | 4 5 6 7].
    const __m256 a = _mm256_castsi256_ps(kept_lanes(low, limit));
    const __m256 b = _mm256_castsi256_ps(kept_lanes(high, limit));
    const __m256 both = _mm256_castpd_ps(
        _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))),
                              _MM_SHUFFLE(3, 1, 2, 0)));
    const __m256 m = _mm256_and_ps(both, kept_v);
    _mm256_storeu_ps(mask + i, m);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), m));
    low = _mm256_add_epi64(low, step);
    high = _mm256_add_epi64(high, step);
  }
  dropout_range(x, y, mask, key, threshold, kept, i, last);
}
#endif

class DropoutKernel final : public Kernel {
 public:
  explicit DropoutKernel(std::int64_t n) : n_(n) {}

  // Input x; outputs y and the scaled mask (1/(1 − rate) kept, 0 dropped; 1 everywhere outside
  // training or at rate 0).
  void run(const KernelCall& call) override {
    const float* x = call.inputs[0].data<float>();
    float* y = call.outputs[0].data<float>();
    float* mask = call.outputs[1].data<float>();
    const double rate = call.attrs().real("rate");
    const bool drop = call.context.training && rate > 0.0;
    const std::uint64_t key = drop ? mask_key(call) : 0;
    const auto threshold = static_cast<std::int64_t>(std::ceil(std::ldexp(rate, 53)));
    const float kept = static_cast<float>(1.0 / (1.0 - rate));
    const auto range = [&](std::int64_t first, std::int64_t last) {
      if (!drop) {
        std::fill(mask + first, mask + last, 1.0f);
        std::copy(x + first, x + last, y + first);
        return;
      }
#ifdef DAGRAD_X86
      if (cpu_has_avx2()) {
        dropout_range_avx2(x, y, mask, key, threshold, kept, first, last);
        return;
      }
#endif
      dropout_range(x, y, mask, key, threshold, kept, first, last);
    };
    if (n_ < 32 * 1024 || omp_get_max_threads() == 1) {
      range(0, n_);
      return;
    }
#pragma omp parallel
    {
      const std::int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
      range(n_ * t / threads, n_ * (t + 1) / threads);
    }
  }

 private:
  std::int64_t n_;
};

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
  def.onednn = [](const KernelBuild& build) -> std::unique_ptr<Kernel> {
    if (build.inputs[0].dtype != DType::f32 || build.inputs[0].numel() == 0) return nullptr;
    return std::make_unique<DropoutKernel>(build.inputs[0].numel());
  };
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

// ---- batch_norm, batch_norm_grad: own loops over NCHW (f32) -------------------------------
//
// Each (n, c) plane of an image is a contiguous run of S = H·W floats; a channel is N such runs
// C·S floats apart. The loops take one channel at a time (one OpenMP thread per channel, a fixed
// order inside it), so results do not depend on the thread count, and run all the passes over a
// channel back to back: a channel of [64,32,28,28] is 200 KB, so only the first pass reads memory
// and the later ones find the data in L2.
// They replace oneDNN 2.6's batch_normalization, which needed reorders to and from nChw8c around
// its kernels (its NCHW kernel was slower still) and ran [N, C] slowly. Measured on 1 thread
// (AVX2, a loaded 2-core VM, medians; oneDNN -> loops, ms): the CNN-with-batch-norm step's
// profile at batch 64: batch_norm [64,32,28,28] 2.87 -> 1.46, [64,64,14,14] 1.72 -> 0.94;
// batch_norm_grad 4.20 -> 1.71 and 2.28 -> 1.00. bench_ops forward: [128,32,28,28] 5.8 -> 2.9,
// [128,64,14,14] 3.3 -> 1.3, [128,1024] 1.71 -> 0.095. On 2 threads of the loaded machine
// oneDNN's kernels took 2.5-200 ms (why was not investigated), the loops about their 1-thread
// time.
// [N, C] (S = 1) is handled a block of channels at a time, vectorised across the channels of a
// row: the per-channel sums are double, added in row order.
//
// Sums: f32 vector partial sums over blocks of kSumBlock floats of a plane, each added into a
// double. The batch statistics take two passes (the mean, then the squared deviations from it
// rounded to f32, with Σ(x − shift) correcting that rounding, so the first pass's accuracy does
// not matter): no one-pass cancellation. The saved statistics are these double ones rounded to
// f32 (oneDNN accumulated them in f32).
// y is computed as (x − shift) scale + offset with offset = β + (shift − μ) scale in double: a
// large mean is subtracted before the scaling, not cancelled between two large products.
//
// The loop bodies are compiled twice, for AVX2 and for the baseline x86-64 (SSE2), and picked
// at run time, as the max-pool loops in ops/conv.cpp are.

constexpr std::int64_t kSumBlock = 256;  // floats summed in f32 before going into a double
constexpr std::int64_t kRowBlock = 64;   // channels of an [N, C] block

struct BatchNormForwardArgs {
  const float* src;
  float* dst;
  const float* gamma;
  const float* beta;
  const float* running_mean;
  const float* running_var;
  float* saved_mean;
  float* saved_variance;
  double* batch_mean;      // [C], double statistics for the running-statistics update
  double* batch_variance;  // (training only)
  std::int64_t batch, channels, spatial;
  double epsilon;
  bool training;
};

struct BatchNormBackwardArgs {
  const float* diff_dst;
  const float* src;
  const float* gamma;
  const float* mean;           // the saved (training) or the running (inference) statistics
  const float* variance;       //
  const float* diff_mean;      // gradients of the saved statistics, or nullptr
  const float* diff_variance;  //
  float* diff_src;
  float* diff_gamma;
  float* diff_beta;
  float* diff_running_mean;
  float* diff_running_var;
  std::int64_t batch, channels, spatial;
  double epsilon;
  bool training;
};

// Σ x over `count` floats.
[[gnu::always_inline]] inline double sum_of(const float* x, std::int64_t count) {
  double total = 0.0;
  for (std::int64_t start = 0; start < count; start += kSumBlock) {
    const std::int64_t end = std::min(count, start + kSumBlock);
    float partial = 0.0f;
#pragma omp simd reduction(+ : partial)
    for (std::int64_t i = start; i < end; ++i) partial += x[i];
    total += static_cast<double>(partial);
  }
  return total;
}

// Σ (x − shift) and Σ (x − shift)² over `count` floats.
[[gnu::always_inline]] inline void add_deviations(const float* x, std::int64_t count, float shift,
                                                  double& deviations, double& squares) {
  for (std::int64_t start = 0; start < count; start += kSumBlock) {
    const std::int64_t end = std::min(count, start + kSumBlock);
    float partial = 0.0f, partial_squares = 0.0f;
#pragma omp simd reduction(+ : partial, partial_squares)
    for (std::int64_t i = start; i < end; ++i) {
      const float d = x[i] - shift;
      partial += d;
      partial_squares += d * d;
    }
    deviations += static_cast<double>(partial);
    squares += static_cast<double>(partial_squares);
  }
}

// Σ dy and Σ dy (x − shift) over `count` floats.
[[gnu::always_inline]] inline void add_gradient_sums(const float* dy, const float* x,
                                                     std::int64_t count, float shift,
                                                     double& sum_dy, double& sum_dy_centred) {
  for (std::int64_t start = 0; start < count; start += kSumBlock) {
    const std::int64_t end = std::min(count, start + kSumBlock);
    float partial = 0.0f, partial_centred = 0.0f;
#pragma omp simd reduction(+ : partial, partial_centred)
    for (std::int64_t i = start; i < end; ++i) {
      partial += dy[i];
      partial_centred += dy[i] * (x[i] - shift);
    }
    sum_dy += static_cast<double>(partial);
    sum_dy_centred += static_cast<double>(partial_centred);
  }
}

// The affine map y = (x − shift) scale + offset of one channel.
struct ChannelAffine {
  float shift, scale, offset;
};

ChannelAffine forward_affine(const BatchNormForwardArgs& a, std::int64_t c, double mean,
                             double variance, float shift) {
  const double scale = static_cast<double>(a.gamma[c]) / std::sqrt(variance + a.epsilon);
  const double offset =
      static_cast<double>(a.beta[c]) + (static_cast<double>(shift) - mean) * scale;
  return {shift, static_cast<float>(scale), static_cast<float>(offset)};
}

void save_statistics(const BatchNormForwardArgs& a, std::int64_t c, double mean, double variance) {
  a.saved_mean[c] = static_cast<float>(mean);
  a.saved_variance[c] = static_cast<float>(variance);
  if (a.training) {
    a.batch_mean[c] = mean;
    a.batch_variance[c] = variance;
  }
}

// Forward of channel c of an image (S > 1).
[[gnu::always_inline]] inline void forward_channel_body(const BatchNormForwardArgs& a,
                                                        std::int64_t c) {
  const std::int64_t plane_stride = a.channels * a.spatial, S = a.spatial;
  const float* x = a.src + c * S;
  float* y = a.dst + c * S;
  double mean = 0.0, variance = 0.0;
  float shift = 0.0f;
  if (a.training) {
    const double count = static_cast<double>(a.batch * S);
    double total = 0.0;
    for (std::int64_t n = 0; n < a.batch; ++n) total += sum_of(x + n * plane_stride, S);
    shift = static_cast<float>(total / count);
    double deviations = 0.0, squares = 0.0;
    for (std::int64_t n = 0; n < a.batch; ++n) {
      add_deviations(x + n * plane_stride, S, shift, deviations, squares);
    }
    const double mean_deviation = deviations / count;
    mean = static_cast<double>(shift) + mean_deviation;
    variance = std::max(0.0, squares / count - mean_deviation * mean_deviation);
  } else {
    shift = a.running_mean[c];
    mean = static_cast<double>(shift);
    variance = static_cast<double>(a.running_var[c]);
  }
  save_statistics(a, c, mean, variance);
  const ChannelAffine f = forward_affine(a, c, mean, variance, shift);
  for (std::int64_t n = 0; n < a.batch; ++n) {
    const float* xn = x + n * plane_stride;
    float* yn = y + n * plane_stride;
#pragma omp simd
    for (std::int64_t s = 0; s < S; ++s) yn[s] = (xn[s] - f.shift) * f.scale + f.offset;
  }
}

// Forward of channels [first, first + width) of [N, C], width <= kRowBlock.
[[gnu::always_inline]] inline void forward_rows_body(const BatchNormForwardArgs& a,
                                                     std::int64_t first, std::int64_t width) {
  const std::int64_t C = a.channels;
  double mean[kRowBlock], variance[kRowBlock];
  float shift[kRowBlock], scale[kRowBlock], offset[kRowBlock];
  if (a.training) {
    const double count = static_cast<double>(a.batch);
    double total[kRowBlock] = {}, squares[kRowBlock] = {};
    for (std::int64_t n = 0; n < a.batch; ++n) {
      const float* x = a.src + n * C + first;
#pragma omp simd
      for (std::int64_t j = 0; j < width; ++j) total[j] += static_cast<double>(x[j]);
    }
    for (std::int64_t j = 0; j < width; ++j) mean[j] = total[j] / count;
    for (std::int64_t n = 0; n < a.batch; ++n) {
      const float* x = a.src + n * C + first;
#pragma omp simd
      for (std::int64_t j = 0; j < width; ++j) {
        const double d = static_cast<double>(x[j]) - mean[j];
        squares[j] += d * d;
      }
    }
    for (std::int64_t j = 0; j < width; ++j) variance[j] = squares[j] / count;
  } else {
    for (std::int64_t j = 0; j < width; ++j) {
      mean[j] = static_cast<double>(a.running_mean[first + j]);
      variance[j] = static_cast<double>(a.running_var[first + j]);
    }
  }
  for (std::int64_t j = 0; j < width; ++j) {
    save_statistics(a, first + j, mean[j], variance[j]);
    const ChannelAffine f =
        forward_affine(a, first + j, mean[j], variance[j], static_cast<float>(mean[j]));
    shift[j] = f.shift, scale[j] = f.scale, offset[j] = f.offset;
  }
  for (std::int64_t n = 0; n < a.batch; ++n) {
    const float* x = a.src + n * C + first;
    float* y = a.dst + n * C + first;
#pragma omp simd
    for (std::int64_t j = 0; j < width; ++j) y[j] = (x[j] - shift[j]) * scale[j] + offset[j];
  }
}

// The backward of one channel as dx = A dy + B (x − μ) + C_, from the sums Σ dy and
// Σ dy (x − μ); also writes dγ, dβ and the running statistics' gradients of channel c.
// Training: dx = γ/(M σ̂) (M dy − Σdy − x̂ Σdy x̂) + (dμ + 2 dσ² (x − μ))/M;
// inference: dx = γ dy / σ̂ (B = C_ = 0).
struct GradientAffine {
  float dy_scale, centred_scale, offset;
};

GradientAffine backward_affine(const BatchNormBackwardArgs& a, std::int64_t c, double sum_dy,
                               double sum_dy_centred) {
  const double inverse_std = 1.0 / std::sqrt(static_cast<double>(a.variance[c]) + a.epsilon);
  const double g = static_cast<double>(a.gamma[c]);
  const double sum_dy_xhat = sum_dy_centred * inverse_std;
  const double diff_mean = a.diff_mean ? static_cast<double>(a.diff_mean[c]) : 0.0;
  const double diff_variance = a.diff_variance ? static_cast<double>(a.diff_variance[c]) : 0.0;
  a.diff_beta[c] = static_cast<float>(sum_dy);
  a.diff_gamma[c] = static_cast<float>(sum_dy_xhat);
  if (!a.training) {
    a.diff_running_mean[c] = static_cast<float>(-g * inverse_std * sum_dy + diff_mean);
    a.diff_running_var[c] =
        static_cast<float>(-0.5 * g * inverse_std * inverse_std * sum_dy_xhat + diff_variance);
    return {static_cast<float>(g * inverse_std), 0.0f, 0.0f};
  }
  a.diff_running_mean[c] = 0.0f;
  a.diff_running_var[c] = 0.0f;
  const double count = static_cast<double>(a.batch * a.spatial);
  return {static_cast<float>(g * inverse_std),
          static_cast<float>((2.0 * diff_variance - g * inverse_std * inverse_std * sum_dy_xhat) /
                             count),
          static_cast<float>((diff_mean - g * inverse_std * sum_dy) / count)};
}

// Backward of channel c of an image (S > 1).
[[gnu::always_inline]] inline void backward_channel_body(const BatchNormBackwardArgs& a,
                                                         std::int64_t c) {
  const std::int64_t plane_stride = a.channels * a.spatial, S = a.spatial;
  const std::int64_t first = c * S;
  const float mu = a.mean[c];
  double sum_dy = 0.0, sum_dy_centred = 0.0;
  for (std::int64_t n = 0; n < a.batch; ++n) {
    const std::int64_t at = first + n * plane_stride;
    add_gradient_sums(a.diff_dst + at, a.src + at, S, mu, sum_dy, sum_dy_centred);
  }
  const GradientAffine f = backward_affine(a, c, sum_dy, sum_dy_centred);
  for (std::int64_t n = 0; n < a.batch; ++n) {
    const std::int64_t at = first + n * plane_stride;
    const float* dy = a.diff_dst + at;
    const float* x = a.src + at;
    float* dx = a.diff_src + at;
    if (a.training) {
#pragma omp simd
      for (std::int64_t s = 0; s < S; ++s) {
        dx[s] = dy[s] * f.dy_scale + (x[s] - mu) * f.centred_scale + f.offset;
      }
    } else {
#pragma omp simd
      for (std::int64_t s = 0; s < S; ++s) dx[s] = dy[s] * f.dy_scale;
    }
  }
}

// Backward of channels [first, first + width) of [N, C], width <= kRowBlock.
[[gnu::always_inline]] inline void backward_rows_body(const BatchNormBackwardArgs& a,
                                                      std::int64_t first, std::int64_t width) {
  const std::int64_t C = a.channels;
  double sum_dy[kRowBlock] = {}, sum_dy_centred[kRowBlock] = {};
  float mu[kRowBlock], dy_scale[kRowBlock], centred_scale[kRowBlock], offset[kRowBlock];
  for (std::int64_t j = 0; j < width; ++j) mu[j] = a.mean[first + j];
  for (std::int64_t n = 0; n < a.batch; ++n) {
    const float* dy = a.diff_dst + n * C + first;
    const float* x = a.src + n * C + first;
#pragma omp simd
    for (std::int64_t j = 0; j < width; ++j) {
      sum_dy[j] += static_cast<double>(dy[j]);
      sum_dy_centred[j] += static_cast<double>(dy[j]) * static_cast<double>(x[j] - mu[j]);
    }
  }
  for (std::int64_t j = 0; j < width; ++j) {
    const GradientAffine f = backward_affine(a, first + j, sum_dy[j], sum_dy_centred[j]);
    dy_scale[j] = f.dy_scale, centred_scale[j] = f.centred_scale, offset[j] = f.offset;
  }
  for (std::int64_t n = 0; n < a.batch; ++n) {
    const float* dy = a.diff_dst + n * C + first;
    const float* x = a.src + n * C + first;
    float* dx = a.diff_src + n * C + first;
#pragma omp simd
    for (std::int64_t j = 0; j < width; ++j) {
      dx[j] = dy[j] * dy_scale[j] + (x[j] - mu[j]) * centred_scale[j] + offset[j];
    }
  }
}

// Each body compiled for AVX2 and for the baseline.
#ifdef DAGRAD_X86
[[gnu::target("avx2")]] void forward_channel_avx2(const BatchNormForwardArgs& a, std::int64_t c) {
  forward_channel_body(a, c);
}
[[gnu::target("avx2")]] void forward_rows_avx2(const BatchNormForwardArgs& a, std::int64_t first,
                                               std::int64_t width) {
  forward_rows_body(a, first, width);
}
[[gnu::target("avx2")]] void backward_channel_avx2(const BatchNormBackwardArgs& a, std::int64_t c) {
  backward_channel_body(a, c);
}
[[gnu::target("avx2")]] void backward_rows_avx2(const BatchNormBackwardArgs& a, std::int64_t first,
                                                std::int64_t width) {
  backward_rows_body(a, first, width);
}
#endif
void forward_channel_baseline(const BatchNormForwardArgs& a, std::int64_t c) {
  forward_channel_body(a, c);
}
void forward_rows_baseline(const BatchNormForwardArgs& a, std::int64_t first, std::int64_t width) {
  forward_rows_body(a, first, width);
}
void backward_channel_baseline(const BatchNormBackwardArgs& a, std::int64_t c) {
  backward_channel_body(a, c);
}
void backward_rows_baseline(const BatchNormBackwardArgs& a, std::int64_t first,
                            std::int64_t width) {
  backward_rows_body(a, first, width);
}

// Runs channel(c) for every channel of an image, or rows(first, width) for every block of
// kRowBlock channels of [N, C], over the OpenMP threads (static schedule: the work of a
// channel never depends on the split).
template <class Args>
void for_each_channel(const Args& a, void (*channel)(const Args&, std::int64_t),
                      void (*rows)(const Args&, std::int64_t, std::int64_t)) {
  if (a.spatial > 1) {
#pragma omp parallel for schedule(static)
    for (std::int64_t c = 0; c < a.channels; ++c) channel(a, c);
    return;
  }
  const std::int64_t blocks = (a.channels + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(static)
  for (std::int64_t b = 0; b < blocks; ++b) {
    rows(a, b * kRowBlock, std::min(kRowBlock, a.channels - b * kRowBlock));
  }
}

// batch_norm on f32 NCHW or [N, C] with the loops above. Training: batch statistics into
// outputs 1 and 2, running statistics updated in place (update_running_statistics, from the
// double statistics); inference: the running statistics, copied into outputs 1 and 2.
class BatchNormForwardLoops final : public Kernel {
 public:
  explicit BatchNormForwardLoops(const KernelBuild& build)
      : geometry_(build.inputs[0].shape),
        epsilon_(build.node.attrs.real("epsilon")),
        batch_mean_(static_cast<std::size_t>(geometry_.channels)),
        batch_variance_(static_cast<std::size_t>(geometry_.channels)) {}

  void run(const KernelCall& call) override {
    const bool training = call.context.training;
    if (training) require_batch_statistics(call, geometry_);
    const BatchNormForwardArgs args{call.inputs[0].data<float>(),
                                    call.outputs[0].data<float>(),
                                    call.inputs[1].data<float>(),
                                    call.inputs[2].data<float>(),
                                    call.inputs[3].data<float>(),
                                    call.inputs[4].data<float>(),
                                    call.outputs[1].data<float>(),
                                    call.outputs[2].data<float>(),
                                    batch_mean_.data(),
                                    batch_variance_.data(),
                                    geometry_.batch,
                                    geometry_.channels,
                                    geometry_.spatial,
                                    epsilon_,
                                    training};
#ifdef DAGRAD_X86
    if (cpu_has_avx2()) {
      for_each_channel(args, forward_channel_avx2, forward_rows_avx2);
    } else
#endif
    {
      for_each_channel(args, forward_channel_baseline, forward_rows_baseline);
    }
    if (training) update_running_statistics<float>(call, geometry_, batch_mean_, batch_variance_);
  }

 private:
  ChannelGeometry geometry_;
  double epsilon_;
  std::vector<double> batch_mean_, batch_variance_;
};

// batch_norm_grad on f32 NCHW or [N, C] with the loops above: training reads the saved
// statistics (inputs 5 and 6), inference the running ones (inputs 3 and 4).
class BatchNormBackwardLoops final : public Kernel {
 public:
  explicit BatchNormBackwardLoops(const KernelBuild& build)
      : geometry_(build.inputs[1].shape), epsilon_(build.node.attrs.real("epsilon")) {}

  void run(const KernelCall& call) override {
    const bool training = call.context.training;
    const bool with_statistics_grads = call.inputs.size() == 9;
    const BatchNormBackwardArgs args{call.inputs[0].data<float>(),
                                     call.inputs[1].data<float>(),
                                     call.inputs[2].data<float>(),
                                     call.inputs[training ? 5 : 3].data<float>(),
                                     call.inputs[training ? 6 : 4].data<float>(),
                                     with_statistics_grads ? call.inputs[7].data<float>() : nullptr,
                                     with_statistics_grads ? call.inputs[8].data<float>() : nullptr,
                                     call.outputs[0].data<float>(),
                                     call.outputs[1].data<float>(),
                                     call.outputs[2].data<float>(),
                                     call.outputs[3].data<float>(),
                                     call.outputs[4].data<float>(),
                                     geometry_.batch,
                                     geometry_.channels,
                                     geometry_.spatial,
                                     epsilon_,
                                     training};
#ifdef DAGRAD_X86
    if (cpu_has_avx2()) {
      for_each_channel(args, backward_channel_avx2, backward_rows_avx2);
    } else
#endif
    {
      for_each_channel(args, backward_channel_baseline, backward_rows_baseline);
    }
  }

 private:
  ChannelGeometry geometry_;
  double epsilon_;
};

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
  def.onednn = [](const KernelBuild& build) -> std::unique_ptr<Kernel> {
    if (build.inputs[0].dtype != DType::f32 || build.inputs[0].numel() == 0) return nullptr;
    return std::make_unique<BatchNormForwardLoops>(build);
  };
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
    return std::make_unique<BatchNormBackwardLoops>(build);
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
