#include "ops/cross_entropy_kernels.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "ops/common.hpp"
#include "ops/cpu.hpp"

#ifdef DAGRAD_X86
#include <immintrin.h>
#endif

namespace dagrad {

namespace {

// Below this many elements a pass runs on the calling thread: opening a parallel region costs
// more than the work (a [128, 10] loss is 1,280 elements).
constexpr std::int64_t parallel_elements = 64 * 1024;

#ifdef DAGRAD_X86
// e^x by range reduction: x = k·ln 2 + r with |r| <= ln 2 / 2, e^r by its Taylor polynomial to
// degree 7 (truncation below 6e-9 relative), times 2^k built in the exponent bits. ln 2 is split
// in two parts so that k·ln2_hi is exact. Below ln(FLT_MIN) the result is 0 (no subnormals),
// above 88.376 (k would pass 127; ln(FLT_MAX) is 88.72) +inf; NaN stays NaN. Softmax only
// takes e^x of x <= 0.
[[gnu::target("avx2,fma")]] inline __m256 exp8(__m256 v) {
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f);
  const __m256 ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  const __m256 lowest = _mm256_set1_ps(-87.33654475f);  // ln(FLT_MIN)
  const __m256 highest = _mm256_set1_ps(88.37626266f);  // k stays <= 127 below it
  const __m256 k =
      _mm256_round_ps(_mm256_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, ln2_hi, v);
  r = _mm256_fnmadd_ps(k, ln2_lo, r);
  // 1 + r + r²/2! + ... + r⁷/7!, by Horner.
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  for (const float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 1.0f / 2, 1.0f, 1.0f}) {
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  }
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  e = _mm256_blendv_ps(e, _mm256_setzero_ps(), _mm256_cmp_ps(v, lowest, _CMP_LT_OQ));
  e = _mm256_blendv_ps(e, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                       _mm256_cmp_ps(v, highest, _CMP_GT_OQ));
  return _mm256_blendv_ps(e, v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

[[gnu::target("avx2,fma")]] void exp_avx2(const float* x, float* y, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, exp8(_mm256_loadu_ps(x + i)));
  if (i < n) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_maskstore_ps(y + i, mask, exp8(_mm256_maskload_ps(x + i, mask)));
  }
}
#endif

// Rows [first, last) of `rows` for the calling thread of a team of `threads`.
struct RowRange {
  std::int64_t first, last;
  RowRange(std::int64_t rows, int threads, int t)
      : first(rows * t / threads), last(rows * (t + 1) / threads) {}
};

// Runs body(first_row, last_row) over all rows, split across the threads when the pass is
// large enough to pay for a parallel region.
template <class Body>
void over_rows(std::int64_t rows, std::int64_t classes, const Body& body) {
  if (rows * classes < parallel_elements || omp_get_max_threads() == 1) {
    body(std::int64_t{0}, rows);
    return;
  }
#pragma omp parallel
  {
    const RowRange range(rows, omp_get_num_threads(), omp_get_thread_num());
    body(range.first, range.last);
  }
}

// Throws, naming `site`, at the first label outside [0, classes), as pick does.
void check_labels(const std::int32_t* labels, std::int64_t rows, std::int64_t classes,
                  const std::string& site) {
  for (std::int64_t i = 0; i < rows; ++i) {
    if (labels[i] < 0 || labels[i] >= classes)
      throw_label_out_of_range(site, labels[i], i, classes);
  }
}

// Rows [first, last) of the forward: y = z − max (every exponent <= 0, nothing overflows),
// e = e^y, y −= log Σ e (summed in double), p_i = y[i, label_i], n_i = −p_i.
struct ForwardRows {
  const float* z;
  const std::int32_t* labels;
  float *y, *p, *n, *e;  // n may be null
  std::int64_t classes;
};

[[gnu::always_inline]] inline void forward_rows_body(const ForwardRows& a, std::int64_t first,
                                                     std::int64_t last) {
  const std::int64_t c = a.classes;
  for (std::int64_t i = first; i < last; ++i) {
    const float* zi = a.z + i * c;
    float max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : max)
    for (std::int64_t j = 0; j < c; ++j) max = std::max(max, zi[j]);
    float* yi = a.y + i * c;
#pragma omp simd
    for (std::int64_t j = 0; j < c; ++j) yi[j] = zi[j] - max;
  }
  exp_f32(a.y + first * c, a.e + first * c, (last - first) * c);
  for (std::int64_t i = first; i < last; ++i) {
    const float* ei = a.e + i * c;
    double total = 0.0;
#pragma omp simd reduction(+ : total)
    for (std::int64_t j = 0; j < c; ++j) total += static_cast<double>(ei[j]);
    const double log_total = std::log(total);
    float* yi = a.y + i * c;
#pragma omp simd
    for (std::int64_t j = 0; j < c; ++j) {
      yi[j] = static_cast<float>(static_cast<double>(yi[j]) - log_total);
    }
    a.p[i] = yi[a.labels[i]];
    if (a.n != nullptr) a.n[i] = -a.p[i];
  }
}

// Rows [first, last) of the backward: dz = e^y, then dz = −f_i dz, dz[i, label_i] += f_i.
struct BackwardRows {
  const float* y;
  const std::int32_t* labels;
  const float* d;  // f_i = sign · d_i; null: f_i = sign · scalar
  float scalar, sign;
  float* dz;
  std::int64_t classes;
};

[[gnu::always_inline]] inline void backward_rows_body(const BackwardRows& a, std::int64_t first,
                                                      std::int64_t last) {
  const std::int64_t c = a.classes;
  exp_f32(a.y + first * c, a.dz + first * c, (last - first) * c);
  for (std::int64_t i = first; i < last; ++i) {
    const float f = a.sign * (a.d != nullptr ? a.d[i] : a.scalar);
    float* row = a.dz + i * c;
#pragma omp simd
    for (std::int64_t j = 0; j < c; ++j) row[j] = -f * row[j];
    row[a.labels[i]] += f;
  }
}

// Each body compiled for AVX2 + FMA and for the baseline.
#ifdef DAGRAD_X86
[[gnu::target("avx2,fma")]] void forward_rows_avx2(const ForwardRows& a, std::int64_t first,
                                                   std::int64_t last) {
  forward_rows_body(a, first, last);
}
[[gnu::target("avx2,fma")]] void backward_rows_avx2(const BackwardRows& a, std::int64_t first,
                                                    std::int64_t last) {
  backward_rows_body(a, first, last);
}
#endif
void forward_rows(const ForwardRows& a, std::int64_t first, std::int64_t last) {
#ifdef DAGRAD_X86
  if (cpu_has_avx2_fma()) return forward_rows_avx2(a, first, last);
#endif
  forward_rows_body(a, first, last);
}
void backward_rows(const BackwardRows& a, std::int64_t first, std::int64_t last) {
#ifdef DAGRAD_X86
  if (cpu_has_avx2_fma()) return backward_rows_avx2(a, first, last);
#endif
  backward_rows_body(a, first, last);
}

class LogSoftmaxPick final : public Kernel {
 public:
  LogSoftmaxPick(std::int64_t rows, std::int64_t classes, PickTail tail, std::string site)
      : rows_(rows), classes_(classes), tail_(tail), site_(std::move(site)) {
    scratch_.reserve(static_cast<std::size_t>(rows * classes) * sizeof(float));
  }

  std::size_t scratch_bytes() const override { return scratch_.bytes(); }

  // Inputs z, labels; outputs y, p [, n [, m]].
  void run(const KernelCall& call) override {
    const float* z = call.inputs[0].data<float>();
    const std::int32_t* labels = call.inputs[1].data<std::int32_t>();
    check_labels(labels, rows_, classes_, site_);
    float* y = call.outputs[0].data<float>();
    float* p = call.outputs[1].data<float>();
    float* n = tail_ == PickTail::none ? nullptr : call.outputs[2].data<float>();
    float* e = reinterpret_cast<float*>(scratch_.base(call.context, "log_softmax+pick"));
    const ForwardRows rows{z, labels, y, p, n, e, classes_};
    over_rows(rows_, classes_,
              [&](std::int64_t first, std::int64_t last) { forward_rows(rows, first, last); });
    if (tail_ == PickTail::neg_mean) {
      double total = 0.0;
      for (std::int64_t i = 0; i < rows_; ++i) total += static_cast<double>(n[i]);
      call.outputs[3].data<float>()[0] = static_cast<float>(total / static_cast<double>(rows_));
    }
  }

 private:
  std::int64_t rows_, classes_;
  PickTail tail_;
  std::string site_;
  ScratchLayout scratch_;  // e^(z − max)
};

class PickLogSoftmaxGrad final : public Kernel {
 public:
  PickLogSoftmaxGrad(std::int64_t rows, std::int64_t classes, RowFactor factor, bool negate,
                     std::string site)
      : rows_(rows), classes_(classes), factor_(factor), negate_(negate), site_(std::move(site)) {}

  // Inputs y, labels, then d | s | a, b; output dz.
  void run(const KernelCall& call) override {
    const float* y = call.inputs[0].data<float>();
    const std::int32_t* labels = call.inputs[1].data<std::int32_t>();
    check_labels(labels, rows_, classes_, site_);
    const float* d = call.inputs[2].data<float>();
    float scalar = 0.f;
    if (factor_ == RowFactor::scalar) scalar = d[0];
    if (factor_ == RowFactor::quotient) scalar = d[0] / call.inputs[3].data<float>()[0];
    const BackwardRows rows{y,
                            labels,
                            factor_ == RowFactor::vector ? d : nullptr,
                            scalar,
                            negate_ ? -1.f : 1.f,
                            call.outputs[0].data<float>(),
                            classes_};
    over_rows(rows_, classes_,
              [&](std::int64_t first, std::int64_t last) { backward_rows(rows, first, last); });
  }

 private:
  std::int64_t rows_, classes_;
  RowFactor factor_;
  bool negate_;
  std::string site_;
};

}  // namespace

void exp_f32(const float* x, float* y, std::int64_t n) {
#ifdef DAGRAD_X86
  if (cpu_has_avx2_fma()) {
    exp_avx2(x, y, n);
    return;
  }
#endif
  for (std::int64_t i = 0; i < n; ++i) y[i] = std::exp(x[i]);
}

std::unique_ptr<Kernel> log_softmax_pick_kernel(std::int64_t rows, std::int64_t classes,
                                                PickTail tail, std::string site) {
  if (rows <= 0 || classes <= 0) return nullptr;
  return std::make_unique<LogSoftmaxPick>(rows, classes, tail, std::move(site));
}

std::unique_ptr<Kernel> pick_log_softmax_grad_kernel(std::int64_t rows, std::int64_t classes,
                                                     RowFactor factor, bool negate,
                                                     std::string site) {
  if (rows <= 0 || classes <= 0) return nullptr;
  return std::make_unique<PickLogSoftmaxGrad>(rows, classes, factor, negate, std::move(site));
}

}  // namespace dagrad
