#include "runtime/primitive_kernel.hpp"

#include <fmt/format.h>

namespace dagrad {

PrimitiveKernel::PrimitiveKernel(dnnl::primitive primitive, std::vector<PrimitiveArg> args)
    : primitive_(std::move(primitive)), args_(std::move(args)) {
  memories_.reserve(args_.size());
  for (const auto& a : args_) {
    memories_.emplace_back(a.md, cpu_engine(), static_cast<void*>(nullptr));
    exec_args_.push_back({a.arg, memories_.back().get()});
  }
}

void execute_primitive(const dnnl::primitive& primitive, dnnl::stream& stream,
                       const std::vector<dnnl_exec_arg_t>& args, const char* what) {
  const dnnl_status_t status = dnnl_primitive_execute(primitive.get(), stream.get(),
                                                      static_cast<int>(args.size()), args.data());
  if (status != dnnl_success) {
    throw Error(
        fmt::format("oneDNN {} primitive failed with status {}", what, static_cast<int>(status)));
  }
}

void PrimitiveKernel::run(const KernelCall& call) {
  for (std::size_t i = 0; i < args_.size(); ++i) {
    const auto& a = args_[i];
    const Tensor& t = a.output ? call.outputs[static_cast<std::size_t>(a.index)]
                               : call.inputs[static_cast<std::size_t>(a.index)];
    dnnl_memory_set_data_handle_v2(memories_[i].get(), const_cast<void*>(t.raw()), nullptr);
  }
  execute_primitive(primitive_, *call.context.stream, exec_args_, call.node.op.c_str());
}

}  // namespace dagrad
