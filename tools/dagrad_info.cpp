// dagrad-info: versions, the CPU ISA oneDNN dispatches to, threads, and the op registry.
#include <cstdio>
#include <string>

#include <fmt/format.h>

#include "dagrad.hpp"

namespace {

std::string isa_name(dnnl::cpu_isa isa) {
  switch (isa) {
    case dnnl::cpu_isa::sse41: return "SSE4.1";
    case dnnl::cpu_isa::avx: return "AVX";
    case dnnl::cpu_isa::avx2: return "AVX2";
    case dnnl::cpu_isa::avx512_core: return "AVX-512 core";
    case dnnl::cpu_isa::avx512_core_vnni: return "AVX-512 core VNNI";
    case dnnl::cpu_isa::avx512_core_bf16: return "AVX-512 core BF16";
    case dnnl::cpu_isa::avx512_core_amx: return "AVX-512 core AMX";
    case dnnl::cpu_isa::avx2_vnni: return "AVX2 VNNI";
    default: return fmt::format("isa code {}", static_cast<int>(isa));
  }
}

}  // namespace

int main() {
  const dnnl_version_t* v = dnnl_version();
  fmt::print("dagrad {}\n", dagrad::version);
  fmt::print("oneDNN {}.{}.{} (CPU runtime OpenMP)\n", v->major, v->minor, v->patch);
  fmt::print("CPU ISA: {}\n", isa_name(dnnl::get_effective_cpu_isa()));
  fmt::print("threads: {}\n\n", dagrad::num_threads());

  const auto ops = dagrad::op_registry().all();
  fmt::print("{:<28} {:<9} {:<17} {:<8} {}\n", "op", "gradient", "kernels", "2nd ord", "computes / why no gradient");
  fmt::print("{}\n", std::string(110, '-'));
  for (const dagrad::OpDef* op : ops) {
    std::string kernels = op->reference ? "reference" : "";
    if (op->onednn) kernels = "oneDNN+" + kernels;
    const bool differentiable = static_cast<bool>(op->backward);
    fmt::print("{:<28} {:<9} {:<17} {:<8} {}\n", op->name, differentiable ? "yes" : "NO", kernels,
               differentiable ? (op->second_order ? "yes" : "no") : "-",
               differentiable ? op->formula : op->formula + "  [no gradient: " + op->no_gradient + "]");
  }
  fmt::print("\n{} ops registered\n", ops.size());
  return 0;
}
