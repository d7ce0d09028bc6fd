#include "ops/small_gemm.hpp"

#include <omp.h>

#include <algorithm>
#include <array>
#include <optional>

#include "ops/cpu.hpp"
#include "ops/sgd_update.hpp"

#ifdef DAGRAD_X86
#include <immintrin.h>
#endif

namespace dagrad {

#ifdef DAGRAD_X86
namespace {

// Lanes [0, n) of a 256-bit mask (n may be <= 0 or >= 8).
[[gnu::target("avx2")]] inline __m256i lanes(std::int64_t n) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<std::int64_t>(n, 0, 8))),
                            index);
}

// 8 floats at p, or the lanes of `mask` (the others read as 0) when Masked.
template <bool Masked>
[[gnu::target("avx2")]] inline __m256 load(const float* p, __m256i mask) {
  if constexpr (Masked) {
    return _mm256_maskload_ps(p, mask);
  } else {
    (void)mask;
    return _mm256_loadu_ps(p);
  }
}
template <bool Masked>
[[gnu::target("avx2")]] inline void store(float* p, __m256i mask, __m256 v) {
  if constexpr (Masked) {
    _mm256_maskstore_ps(p, mask, v);
  } else {
    (void)mask;
    _mm256_storeu_ps(p, v);
  }
}
// How a block ends: C written (none), or the parameter in C updated from the sums g by plain
// SGD, momentum or Nesterov momentum, each as ops/sgd_update.hpp computes it (products, sums and
// differences rounded one by one, no FMA).
enum Epilogue { store_sums = 0, sgd = 1, momentum = 2, nesterov = 3 };
// η, λ, γ, read from memory by the epilogue only (see block()).
struct Scalars {
  float eta, lambda, gamma;
};

// The epilogue's update of 8 parameters w (in place) from their gradients g, velocities at v.
template <int E, bool Masked>
[[gnu::target("avx2")]] inline __m256 update(__m256 w, __m256 g, float* v, __m256i mask,
                                             const Scalars& s) {
  const __m256 eta = _mm256_broadcast_ss(&s.eta), lambda = _mm256_broadcast_ss(&s.lambda);
  const __m256 d = _mm256_add_ps(g, _mm256_mul_ps(lambda, w));
  if constexpr (E == sgd) {
    return _mm256_sub_ps(w, _mm256_mul_ps(eta, d));
  } else {
    const __m256 gamma = _mm256_broadcast_ss(&s.gamma);
    const __m256 step = _mm256_mul_ps(eta, d);
    const __m256 velocity = _mm256_sub_ps(_mm256_mul_ps(gamma, load<Masked>(v, mask)), step);
    store<Masked>(v, mask, velocity);
    if constexpr (E == momentum) {
      return _mm256_add_ps(w, velocity);
    } else {
      return _mm256_add_ps(w, _mm256_sub_ps(_mm256_mul_ps(gamma, velocity), step));
    }
  }
}

// C[0..R, 0..16) (the first `cols` columns when Masked) = Σ_k a[k·lda + r] · b[k·ldb + j], or
// with Accumulate acc + that sum, continuing the sums of earlier k (held in `acc`, laid out as
// C) in the same order: R × 2 accumulators in registers, one broadcast of a and two loads of b
// per k. With an update epilogue E, C holds a parameter w and the sum g is its gradient, and v
// (laid out as C) the parameter's velocity: w is updated as ops/sgd_update.hpp computes it.
template <int R, bool Masked, bool Accumulate, int E>
[[gnu::target("avx2,fma")]] void block(const float* a, std::int64_t lda, const float* b,
                                       std::int64_t ldb, const float* acc, float* c,
                                       std::int64_t ldc, std::int64_t k, std::int64_t cols,
                                       float* v, const Scalars* scalars) {
  __m256 lo[R], hi[R];
  __m256i mask_lo = _mm256_setzero_si256(), mask_hi = mask_lo;
  if constexpr (Masked) {
    mask_lo = lanes(cols);
    mask_hi = lanes(cols - 8);
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    if constexpr (Accumulate) {
      lo[r] = load<Masked>(acc + r * ldc, mask_lo);
      hi[r] = load<Masked>(acc + r * ldc + 8, mask_hi);
    } else {
      lo[r] = hi[r] = _mm256_setzero_ps();
    }
  }
  for (std::int64_t e = 0; e < k; ++e) {
    const __m256 b_lo = load<Masked>(b, mask_lo), b_hi = load<Masked>(b + 8, mask_hi);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r);
      lo[r] = _mm256_fmadd_ps(x, b_lo, lo[r]);
      hi[r] = _mm256_fmadd_ps(x, b_hi, hi[r]);
    }
    a += lda;
    b += ldb;
  }
  if constexpr (E != store_sums) {
    // η, λ and γ are read from memory only here: as register arguments they would stay live
    // through the k loop, and 12 accumulators, two rows of b and a broadcast leave no register
    // for them (the loop spilled, and the fused kernel ran 20–45 % slower than the plain one).
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      lo[r] = update<E, Masked>(load<Masked>(c + r * ldc, mask_lo), lo[r], v + r * ldc, mask_lo,
                                *scalars);
      hi[r] = update<E, Masked>(load<Masked>(c + r * ldc + 8, mask_hi), hi[r], v + r * ldc + 8,
                                mask_hi, *scalars);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    store<Masked>(c + r * ldc, mask_lo, lo[r]);
    store<Masked>(c + r * ldc + 8, mask_hi, hi[r]);
  }
}

// Rows [i, i + R) of C over `depth` values of k: all column blocks, the last one masked when N
// is not a multiple of 16; with `acc`, continuing the sums held there (acc may be c).
template <int R, int E>
[[gnu::target("avx2,fma")]] void rows(const float* a, const float* b, const float* acc, float* c,
                                      std::int64_t m, std::int64_t depth, std::int64_t n, float* v,
                                      const Scalars* scalars) {
  std::int64_t j = 0;
  if (acc == nullptr) {
    for (; j + 16 <= n; j += 16) {
      block<R, false, false, E>(a, m, b + j, n, nullptr, c + j, n, depth, 16, v ? v + j : v,
                                scalars);
    }
    if (j < n) {
      block<R, true, false, E>(a, m, b + j, n, nullptr, c + j, n, depth, n - j, v ? v + j : v,
                               scalars);
    }
  } else {
    for (; j + 16 <= n; j += 16) {
      block<R, false, true, E>(a, m, b + j, n, acc + j, c + j, n, depth, 16, v ? v + j : v,
                               scalars);
    }
    if (j < n) {
      block<R, true, true, E>(a, m, b + j, n, acc + j, c + j, n, depth, n - j, v ? v + j : v,
                              scalars);
    }
  }
}

// rows<R, E> for each epilogue E and R = 1..6 (index 0 unused).
using RowsFn = void (*)(const float*, const float*, const float*, float*, std::int64_t,
                        std::int64_t, std::int64_t, float*, const Scalars*);
template <int E>
constexpr std::array<RowsFn, 7> rows_of = {nullptr,    rows<1, E>, rows<2, E>, rows<3, E>,
                                           rows<4, E>, rows<5, E>, rows<6, E>};
constexpr std::array<std::array<RowsFn, 7>, 4> by_rows = {rows_of<store_sums>, rows_of<sgd>,
                                                          rows_of<momentum>, rows_of<nesterov>};

class TransposedASmallK final : public Kernel {
 public:
  TransposedASmallK(std::int64_t m, std::int64_t k, std::int64_t n, bool column_sums,
                    SmallKUpdate update)
      : m_(m), k_(k), n_(n), column_sums_(column_sums), update_(update) {
    // Partial sums of C between chunks of k, when C is a parameter updated at the last one.
    if (update_.weights && k_ > small_k_chunk) {
      partial_ = scratch_.reserve(static_cast<std::size_t>(m_ * n_) * sizeof(float));
    }
    if (update_.bias) sums_ = scratch_.reserve(static_cast<std::size_t>(n_) * sizeof(float));
  }

  std::size_t scratch_bytes() const override { return scratch_.bytes(); }

  // Inputs A [K, M], B [K, N] [, the parameter W [M, N] (update.weights)] [, the parameter b [N]
  // (update.bias)]; outputs [C [M, N] (unless update.weights)] [, column sums of B (column_sums,
  // unless update.bias)].
  void run(const KernelCall& call) override {
    const float* a = call.inputs[0].data<float>();
    const float* b = call.inputs[1].data<float>();
    std::size_t input = 2, output = 0;
    // Parameters are leaves bound at each run: their own storage, updated in place.
    float* c = update_.weights ? const_cast<float*>(call.inputs[input++].data<float>())
                               : call.outputs[output++].data<float>();
    float* bias = update_.bias ? const_cast<float*>(call.inputs[input++].data<float>()) : nullptr;
    std::byte* scratch =
        scratch_.bytes() > 0 ? scratch_.base(call.context, "small-batch matmul") : nullptr;
    float* partial = partial_ ? reinterpret_cast<float*>(scratch + *partial_) : nullptr;
    float* sums = !column_sums_  ? nullptr
                  : update_.bias ? reinterpret_cast<float*>(scratch + *sums_)
                                 : call.outputs[output++].data<float>();
    const float eta = static_cast<float>(call.context.learning_rate);
    const float lambda = static_cast<float>(update_.rule.weight_decay);
    const float gamma = static_cast<float>(update_.rule.momentum);
    const Scalars scalars{eta, lambda, gamma};
    const int epilogue = update_.rule.momentum == 0 ? sgd
                         : update_.rule.nesterov    ? nesterov
                                                    : momentum;
    const std::int64_t blocks = (m_ + 5) / 6;
#pragma omp parallel
    {
      const std::int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
      // k in chunks of small_k_chunk, outermost: a chunk of B (small_k_chunk × N) stays in
      // this core's L2 while the thread's row blocks pass, and each block's 6 columns of A for
      // the chunk stay in L1 while its column blocks pass. Each chunk continues the sums of the
      // one before, so every C element is summed over k in order, as in one pass. With the
      // update, the sums before the last chunk go to `partial` and the last chunk updates W.
      for (std::int64_t k0 = 0; k0 < k_; k0 += small_k_chunk) {
        const std::int64_t depth = std::min(small_k_chunk, k_ - k0);
        const bool update = update_.weights && k0 + depth == k_;
        float* sink = update_.weights && !update ? partial : c;
        const float* acc = k0 == 0 ? nullptr : update_.weights ? partial : c;
        for (std::int64_t q = blocks * t / threads; q < blocks * (t + 1) / threads; ++q) {
          const std::int64_t i = 6 * q;
          float* v = update_.weights_velocity ? update_.weights_velocity + i * n_ : nullptr;
          by_rows[update ? epilogue : store_sums][std::min<std::int64_t>(6, m_ - i)](
              a + k0 * m_ + i, b + k0 * n_, acc ? acc + i * n_ : nullptr, sink + i * n_, m_, depth,
              n_, v, &scalars);
        }
      }
      if (sums != nullptr) {  // columns [first, last) of B, summed over k in order
        const std::int64_t first = n_ * t / threads, last = n_ * (t + 1) / threads;
        std::fill(sums + first, sums + last, 0.0f);
        for (std::int64_t e = 0; e < k_; ++e) {
          const float* row = b + e * n_;
#pragma omp simd
          for (std::int64_t j = first; j < last; ++j) sums[j] += row[j];
        }
        if (bias != nullptr && epilogue == sgd) {
          sgd_update(bias, sums, first, last, eta, lambda);
        } else if (bias != nullptr) {
          momentum_update(bias, sums, update_.bias_velocity, first, last, eta, lambda, gamma,
                          epilogue == nesterov);
        }
      }
    }
  }

 private:
  std::int64_t m_, k_, n_;
  bool column_sums_;
  SmallKUpdate update_;
  ScratchLayout scratch_;
  std::optional<std::size_t> partial_, sums_;  // offsets in the scratch
};

}  // namespace
#endif

std::unique_ptr<Kernel> transposed_a_small_k_kernel(std::int64_t m, std::int64_t k, std::int64_t n,
                                                    bool column_sums, SmallKUpdate update) {
#ifdef DAGRAD_X86
  if (cpu_has_avx2_fma() && m > 0 && n > 0 && k > 0 && k <= small_k_limit &&
      m * n <= small_k_max_outputs) {
    if (update.bias && !column_sums) return nullptr;
    // With momentum, the velocities are needed.
    if (update.rule.momentum > 0 && ((update.weights && update.weights_velocity == nullptr) ||
                                     (update.bias && update.bias_velocity == nullptr))) {
      return nullptr;
    }
    return std::make_unique<TransposedASmallK>(m, k, n, column_sums, update);
  }
#endif
  (void)m, (void)k, (void)n, (void)column_sums, (void)update;
  return nullptr;
}

}  // namespace dagrad
