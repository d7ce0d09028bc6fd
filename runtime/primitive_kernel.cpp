#include "runtime/primitive_kernel.hpp"

namespace dagrad {

PrimitiveKernel::PrimitiveKernel(dnnl::primitive primitive, std::vector<PrimitiveArg> args)
    : primitive_(std::move(primitive)), args_(std::move(args)) {
  for (const auto& a : args_) {
    memories_.emplace_back(a.md, cpu_engine(), static_cast<void*>(nullptr));
    arg_map_[a.arg] = memories_.back();
  }
}

void PrimitiveKernel::run(const KernelCall& call) {
  for (std::size_t i = 0; i < args_.size(); ++i) {
    const auto& a = args_[i];
    const Tensor& t = a.output ? call.outputs[static_cast<std::size_t>(a.index)]
                               : call.inputs[static_cast<std::size_t>(a.index)];
    memories_[i].set_data_handle(const_cast<void*>(t.raw()));
  }
  primitive_.execute(*call.context.stream, arg_map_);
}

}  // namespace dagrad
