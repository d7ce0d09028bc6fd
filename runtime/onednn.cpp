#include <omp.h>

#include <cstdlib>
#include <string_view>

#include "runtime/kernel.hpp"

#if defined(DAGRAD_PASSIVE_OPENMP)
// OpenMP threads that wait with OMP_WAIT_POLICY unset spin (libgomp: ~300,000 iterations) before
// they sleep. On a machine where anything else runs, a spinning thread burns the time slice its
// partner needs to reach the barrier, and every parallel region of a step can cost a scheduler
// slice: a 2-thread MLP step at batch 32 measured 65 ms instead of 0.8 ms while two compilers
// ran (bench_train, 495 instead of 40,000 samples/s; 1 thread: 46,500). libgomp reads its
// settings once, in its constructor, and has no call to change them later, so the policy is set
// before that: an executable's .preinit_array runs before the constructors of the shared
// libraries it loads. An OMP_WAIT_POLICY the user set is kept (setenv does not overwrite).
// Only in a static dagrad (a shared object cannot have a .preinit_array); see README.
namespace {
bool passive_set_by_dagrad = false;
void prefer_passive_openmp(int, char**, char** envp) {
  // Read the environment the program was started with: the C library is not fully set up yet
  // (getenv() finds nothing here).
  for (char** entry = envp; entry != nullptr && *entry != nullptr; ++entry) {
    if (std::string_view(*entry).starts_with("OMP_WAIT_POLICY=")) return;
  }
  setenv("OMP_WAIT_POLICY", "passive", /*overwrite=*/0);
  passive_set_by_dagrad = true;
}
}  // namespace
__attribute__((section(".preinit_array"), used)) void (*dagrad_preinit_openmp)(int, char**,
                                                                               char**) =
    prefer_passive_openmp;
#endif

namespace dagrad {

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::memory::data_type to_dnnl(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return dnnl::memory::data_type::f32;
    case DType::i32:
      return dnnl::memory::data_type::s32;
    case DType::f64:
      break;
  }
  throw Error(fmt::format("oneDNN has no {} data type", dtype));
}

dnnl::memory::desc plain_md(const Shape& shape, DType dtype) {
  dnnl::memory::dims dims(shape.dims().begin(), shape.dims().end());
  dnnl::memory::dims strides;
  if (dims.empty()) {
    dims = {1};
    strides = {1};
  } else {
    auto s = shape.strides();
    strides.assign(s.begin(), s.end());
  }
  return dnnl::memory::desc(dims, to_dnnl(dtype), strides);
}

dnnl::memory::desc plain_md(const TensorDesc& desc) {
  return plain_md(desc.shape, desc.dtype);
}

void set_num_threads(int threads) {
  if (threads < 0) throw Error(fmt::format("set_num_threads: {} is negative", threads));
  omp_set_num_threads(threads == 0 ? omp_get_num_procs() : threads);
}

int num_threads() {
  return omp_get_max_threads();
}

std::string openmp_wait_policy() {
#if defined(DAGRAD_PASSIVE_OPENMP)
  if (passive_set_by_dagrad) return "passive (dagrad's default)";
#endif
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  return policy ? fmt::format("{} (OMP_WAIT_POLICY)", policy) : "unset: threads spin, then sleep";
}

ThreadScope::ThreadScope(int threads) {
  if (threads > 0) {
    saved_ = omp_get_max_threads();
    omp_set_num_threads(threads);
  }
}

ThreadScope::~ThreadScope() {
  if (saved_ > 0) omp_set_num_threads(saved_);
}

}  // namespace dagrad
