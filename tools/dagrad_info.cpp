// dagrad-info: versions, the CPU ISA oneDNN dispatches to, threads, and the op registry.
#include <fmt/format.h>

#include <cstdio>
#include <string>

#include "dagrad.hpp"

namespace {

std::string isa_name(dnnl::cpu_isa isa) {
  switch (isa) {
    case dnnl::cpu_isa::sse41:
      return "SSE4.1";
    case dnnl::cpu_isa::avx:
      return "AVX";
    case dnnl::cpu_isa::avx2:
      return "AVX2";
    case dnnl::cpu_isa::avx512_core:
      return "AVX-512 core";
    case dnnl::cpu_isa::avx512_core_vnni:
      return "AVX-512 core VNNI";
    case dnnl::cpu_isa::avx512_core_bf16:
      return "AVX-512 core BF16";
    case dnnl::cpu_isa::avx512_core_amx:
      return "AVX-512 core AMX";
    case dnnl::cpu_isa::avx2_vnni:
      return "AVX2 VNNI";
    default:
      return fmt::format("isa code {}", static_cast<int>(isa));
  }
}

}  // namespace

int main() {
  const dnnl_version_t* v = dnnl_version();
  fmt::print("dagrad {}\n", dagrad::version);
  fmt::print("oneDNN {}.{}.{} (CPU runtime OpenMP)\n", v->major, v->minor, v->patch);
  fmt::print("CPU ISA: {}\n", isa_name(dnnl::get_effective_cpu_isa()));
  fmt::print("threads: {} (OpenMP wait policy: {})\n\n", dagrad::num_threads(),
             dagrad::openmp_wait_policy());

  const auto ops = dagrad::op_registry().all();
  fmt::print("{:<28} {:<9} {:<17} {:<8} {}\n", "op", "gradient", "kernels", "2nd ord",
             "computes / why no gradient");
  fmt::print("{}\n", std::string(110, '-'));
  for (const dagrad::OpDef* op : ops) {
    std::string kernels = op->reference ? "reference" : "";
    if (op->onednn) kernels = "oneDNN+" + kernels;
    const bool differentiable = static_cast<bool>(op->backward);
    fmt::print(
        "{:<28} {:<9} {:<17} {:<8} {}\n", op->name, differentiable ? "yes" : "NO", kernels,
        differentiable ? (op->second_order ? "yes" : "no") : "-",
        differentiable ? op->formula : op->formula + "  [no gradient: " + op->no_gradient + "]");
  }
  fmt::print("\n{} ops registered\n", ops.size());

  // Functions built from the ops above: their gradients (and second order) come from their
  // parts, which the registry-wide tests check; their own tests live in tests/test_loss.cpp,
  // test_normalization.cpp, test_indexing.cpp and test_conv.cpp.
  struct Composite {
    const char* name;
    const char* made_of;
  };
  const Composite composites[] = {
      {"mse", "sub, square, mean (reduction none/mean/sum, per-example weights)"},
      {"sum_of_squares", "½ Σ (y − t)², the course's E"},
      {"mae", "sub, abs, mean"},
      {"binary_cross_entropy", "clip (p to [1e-7, 1]), log, mul"},
      {"binary_cross_entropy_with_logits", "logistic_loss (stable for |z| up to 100)"},
      {"cross_entropy", "clip, log, mul, sum over classes (one-hot or probability targets)"},
      {"cross_entropy_with_logits", "log_softmax, mul, sum over classes"},
      {"sparse_cross_entropy", "log_softmax, pick (i32 labels, checked at run time)"},
      {"l1_penalty / l2_penalty / elastic_net_penalty", "relu, mul, sum over parameters"},
      {"global_avg_pool", "mean over H, W"},
      {"flatten / squeeze / unsqueeze", "reshape"},
  };
  fmt::print("\n{:<46} {}\n{}\n", "composite function", "built from", std::string(110, '-'));
  for (const auto& c : composites) fmt::print("{:<46} {}\n", c.name, c.made_of);
  return 0;
}
