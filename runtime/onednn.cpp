#include <omp.h>

#include <cstdlib>

#include "runtime/kernel.hpp"

namespace dagrad {

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

std::byte* ScratchLayout::base(const RunContext& context, const char* what) const {
  if (context.scratch_bytes < bytes_ || (bytes_ != 0 && context.scratch == nullptr)) {
    throw Error(fmt::format("{}: the kernel needs {} bytes of scratch, the run gives {}", what,
                            bytes_, context.scratch_bytes));
  }
  return context.scratch;
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
  std::string policy;
  for (const char* name : {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"}) {
    if (const char* value = std::getenv(name)) {
      policy += fmt::format("{}{}={}", policy.empty() ? "" : ", ", name, value);
    }
  }
  return policy.empty() ? "libgomp's default: spin ~300,000 iterations, then sleep" : policy;
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
