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
#else
inline bool cpu_has_avx2() {
  return false;
}
inline bool cpu_has_avx2_fma() {
  return false;
}
#endif

}  // namespace dagrad
