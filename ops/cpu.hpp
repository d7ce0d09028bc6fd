// What the processor running this process can do, for dagrad's own kernels (internal to ops/).
// Such a kernel compiles its vector body with [[gnu::target("avx2,fma")]] under DAGRAD_X86 and
// picks it at run time when these say the instructions exist, keeping a baseline otherwise.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#define DAGRAD_X86 1
#endif

namespace dagrad {

#ifdef DAGRAD_X86
inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
inline bool cpu_has_avx2_fma() {
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("fma");
  return has;
}
// Calls loop() inlined into a function compiled for AVX2 without FMA, so that the `omp simd`
// loops in it use 256-bit vectors (8 floats) instead of the baseline's SSE (4). `loop` must be a
// lambda declared __attribute__((always_inline)). For element-wise loops: with no FMA, every
// product, sum, quotient and square root is rounded as in the baseline code, so the results are
// the same bits on either path, only faster (nn/optimizer.cpp, ops/sgd_update.hpp).
template <class Loop>
[[gnu::target("avx2")]] void run_avx2(const Loop& loop) {
  loop();
}
template <class Loop>
void run_vectorized(const Loop& loop) {
  if (cpu_has_avx2()) {
    run_avx2(loop);
  } else {
    loop();
  }
}
#else
template <class Loop>
void run_vectorized(const Loop& loop) {
  loop();
}
inline bool cpu_has_avx2() {
  return false;
}
inline bool cpu_has_avx2_fma() {
  return false;
}
#endif

}  // namespace dagrad
