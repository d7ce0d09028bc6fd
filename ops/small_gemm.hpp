// A kernel for the weight gradient of a dense layer at small batch sizes, which the plan's
// fusion pass (runtime/fusion.cpp) uses instead of oneDNN's matmul; not a user API.
#pragma once

#include <cstdint>
#include <memory>

#include "ops/sgd_update.hpp"
#include "runtime/kernel.hpp"

namespace dagrad {

// Where transposed_a_small_k_kernel builds a kernel: K (the batch) at most small_k_limit and
// C at most small_k_max_outputs elements. (Named for small batches; up to K 512 it was measured
// as fast as oneDNN or faster, counting the bias sum it absorbs.)
inline constexpr std::int64_t small_k_limit = 512;
inline constexpr std::int64_t small_k_max_outputs = 800 * 1024;
// The kernel sums over k in chunks of this many (see rows() in small_gemm.cpp).
inline constexpr std::int64_t small_k_chunk = 128;

// C[M, N] = Aᵀ B for A stored [K, M] and B [K, N], both row-major and contiguous (a dense
// layer's dW = xᵀ dy, K the batch), f32. Inputs A, B; outputs C and, with `column_sums`, the
// column sums of B (the layer's bias gradient Σ_k dy[k, :], N floats). Each 6 × 16 block of C is
// summed over k in registers, in order, by one thread (k in chunks of small_k_chunk, each
// continuing the sums of the one before), and each column sum likewise, so results are the
// same bits on any number of threads. nullptr without AVX2 and FMA, or outside the limits
// above, where oneDNN's SGEMM (which packs its operands first) is as fast or faster.
// Measured (2 threads, 2026-11-26; M × K × N, this kernel against oneDNN's matmul on the
// transposed A). Raw kernels, medians of 400 runs: 784×32×256 74–96 against 82–112 µs;
// 256×32×128 15.9 against 21.2 µs; 784×16×256 48 against 107 µs; 784×48×256 159 against
// 176 µs; 784×32×1024 460 against 580 µs; 784×64×256 201–217 against 200–219 µs. Through a
// plan (bench_engine weight_gradient, this kernel with the column sums, oneDNN without, medians
// of 5): 784×128×256 387–428 against 397–439 µs; 256×128×128 72–74 against 72–76 µs;
// 1024×128×10 47–49 against 68–73 µs; 784×512×256 1.53 against 1.62 ms; 256×512×128 292
// against 291 µs. K 512 runs chunk after chunk over all of a thread's rows, so that a chunk of B
// stays in L2: one pass per row block over the whole B ran 1.9–2.3 ms. Slower, so excluded by the
// limits: large C (1024×32×1024 852 against 774 µs, 3136×32×1024 2.3 against 1.5 ms,
// 3136×64×1024 4.8 against 2.9 ms: with large C this kernel runs at ~85 GFLOP/s).
//
// With an SGDUpdate fused in (SmallKUpdate), C is not written: it is the gradient of a parameter
// W [M, N], read as an extra input after A and B and updated in place as its 6 × 16 blocks are
// summed, by `rule` (ops/sgd_update.hpp, the same bits as sgd_update or momentum_update) with η
// from RunContext::learning_rate and, with momentum, W's velocity [M, N] at weights_velocity;
// likewise the column sums for a bias parameter b [N], an input after W, velocity at
// bias_velocity. Between chunks of k (K > small_k_chunk) the partial sums of C go to the
// kernel's scratch (M × N floats).
struct SmallKUpdate {
  bool weights = false;  // update W instead of writing C
  bool bias = false;     // update b instead of writing the column sums (needs column_sums)
  SGDRule rule;
  float* weights_velocity = nullptr;  // with rule.momentum > 0: M × N floats, kept between runs
  float* bias_velocity = nullptr;     // likewise N floats
};
std::unique_ptr<Kernel> transposed_a_small_k_kernel(std::int64_t m, std::int64_t k, std::int64_t n,
                                                    bool column_sums, SmallKUpdate update = {});

}  // namespace dagrad
