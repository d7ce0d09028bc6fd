#include "ops/small_gemm.hpp"

#include <omp.h>

#include <algorithm>

#include "ops/cpu.hpp"

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

// C[0..R, 0..16) (the first `cols` columns when Masked) = Σ_k a[k·lda + r] · b[k·ldb + j], or
// with Accumulate C += that sum, continuing the sums of earlier k in the same order: R × 2
// accumulators in registers, one broadcast of a and two loads of b per k.
template <int R, bool Masked, bool Accumulate>
[[gnu::target("avx2,fma")]] void block(const float* a, std::int64_t lda, const float* b,
                                       std::int64_t ldb, float* c, std::int64_t ldc, std::int64_t k,
                                       std::int64_t cols) {
  __m256 lo[R], hi[R];
  __m256i mask_lo = _mm256_setzero_si256(), mask_hi = mask_lo;
  if constexpr (Masked) {
    mask_lo = lanes(cols);
    mask_hi = lanes(cols - 8);
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    if constexpr (!Accumulate) {
      lo[r] = hi[r] = _mm256_setzero_ps();
    } else if constexpr (Masked) {
      lo[r] = _mm256_maskload_ps(c + r * ldc, mask_lo);
      hi[r] = _mm256_maskload_ps(c + r * ldc + 8, mask_hi);
    } else {
      lo[r] = _mm256_loadu_ps(c + r * ldc);
      hi[r] = _mm256_loadu_ps(c + r * ldc + 8);
    }
  }
  for (std::int64_t e = 0; e < k; ++e) {
    __m256 b_lo, b_hi;
    if constexpr (Masked) {
      b_lo = _mm256_maskload_ps(b, mask_lo);
      b_hi = _mm256_maskload_ps(b + 8, mask_hi);
    } else {
      b_lo = _mm256_loadu_ps(b);
      b_hi = _mm256_loadu_ps(b + 8);
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r);
      lo[r] = _mm256_fmadd_ps(x, b_lo, lo[r]);
      hi[r] = _mm256_fmadd_ps(x, b_hi, hi[r]);
    }
    a += lda;
    b += ldb;
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    if constexpr (Masked) {
      _mm256_maskstore_ps(c + r * ldc, mask_lo, lo[r]);
      _mm256_maskstore_ps(c + r * ldc + 8, mask_hi, hi[r]);
    } else {
      _mm256_storeu_ps(c + r * ldc, lo[r]);
      _mm256_storeu_ps(c + r * ldc + 8, hi[r]);
    }
  }
}

// Rows [i, i + R) of C over `depth` values of k: all column blocks, the last one masked when N
// is not a multiple of 16; with `accumulate`, continuing the sums of the k before.
template <int R>
[[gnu::target("avx2,fma")]] void rows(const float* a, const float* b, float* c, std::int64_t m,
                                      std::int64_t depth, std::int64_t n, bool accumulate) {
  std::int64_t j = 0;
  if (!accumulate) {
    for (; j + 16 <= n; j += 16) block<R, false, false>(a, m, b + j, n, c + j, n, depth, 16);
    if (j < n) block<R, true, false>(a, m, b + j, n, c + j, n, depth, n - j);
  } else {
    for (; j + 16 <= n; j += 16) block<R, false, true>(a, m, b + j, n, c + j, n, depth, 16);
    if (j < n) block<R, true, true>(a, m, b + j, n, c + j, n, depth, n - j);
  }
}

// rows<R> for R = 1..6 (index 0 unused).
using RowsFn = void (*)(const float*, const float*, float*, std::int64_t, std::int64_t,
                        std::int64_t, bool);
constexpr RowsFn by_rows[] = {nullptr, rows<1>, rows<2>, rows<3>, rows<4>, rows<5>, rows<6>};

class TransposedASmallK final : public Kernel {
 public:
  TransposedASmallK(std::int64_t m, std::int64_t k, std::int64_t n, bool column_sums)
      : m_(m), k_(k), n_(n), column_sums_(column_sums) {}

  // Inputs A [K, M], B [K, N]; outputs C [M, N] [, column sums of B].
  void run(const KernelCall& call) override {
    const float* a = call.inputs[0].data<float>();
    const float* b = call.inputs[1].data<float>();
    float* c = call.outputs[0].data<float>();
    float* sums = column_sums_ ? call.outputs[1].data<float>() : nullptr;
    const std::int64_t blocks = (m_ + 5) / 6;
#pragma omp parallel
    {
      const std::int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
      // k in chunks of small_k_chunk, outermost: a chunk of B (small_k_chunk × N) stays in
      // this core's L2 while the thread's row blocks pass, and each block's 6 columns of A for
      // the chunk stay in L1 while its column blocks pass. Each chunk continues the sums of the
      // one before, so every C element is summed over k in order, as in one pass.
      for (std::int64_t k0 = 0; k0 < k_; k0 += small_k_chunk) {
        const std::int64_t depth = std::min(small_k_chunk, k_ - k0);
        for (std::int64_t q = blocks * t / threads; q < blocks * (t + 1) / threads; ++q) {
          const std::int64_t i = 6 * q;
          by_rows[std::min<std::int64_t>(6, m_ - i)](a + k0 * m_ + i, b + k0 * n_, c + i * n_, m_,
                                                     depth, n_, k0 > 0);
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
      }
    }
  }

 private:
  std::int64_t m_, k_, n_;
  bool column_sums_;
};

}  // namespace
#endif

std::unique_ptr<Kernel> transposed_a_small_k_kernel(std::int64_t m, std::int64_t k, std::int64_t n,
                                                    bool column_sums) {
#ifdef DAGRAD_X86
  if (cpu_has_avx2_fma() && m > 0 && n > 0 && k > 0 && k <= small_k_limit &&
      m * n <= small_k_max_outputs) {
    return std::make_unique<TransposedASmallK>(m, k, n, column_sums);
  }
#endif
  (void)m, (void)k, (void)n, (void)column_sums;
  return nullptr;
}

}  // namespace dagrad
