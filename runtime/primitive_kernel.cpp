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

StagedMemory::StagedMemory(const dnnl::memory::desc& plain, const dnnl::memory::desc& chosen,
                           dnnl::engine& engine)
    : user_(plain, engine, nullptr) {
  if (chosen != plain) {
    internal_ = dnnl::memory(chosen, engine, nullptr);  // placed in scratch by place()
    to_internal_ = PreparedPrimitive(dnnl::reorder(user_, internal_),
                                     {{DNNL_ARG_FROM, user_}, {DNNL_ARG_TO, internal_}});
    to_user_ = PreparedPrimitive(dnnl::reorder(internal_, user_),
                                 {{DNNL_ARG_FROM, internal_}, {DNNL_ARG_TO, user_}});
  }
}

void StagedMemory::load(dnnl::stream& stream, const void* data) {
  user_.set_data_handle(const_cast<void*>(data));
  if (internal_) to_internal_.execute(stream, "reorder");
}

void StagedMemory::store(dnnl::stream& stream) {
  if (internal_) to_user_.execute(stream, "reorder");
}

dnnl::memory::desc channel_blocked_md(const dnnl::memory::desc& plain) {
  using tag = dnnl::memory::format_tag;
  const dnnl::memory::dims dims = plain.dims();
  const bool wide = dnnl::get_effective_cpu_isa() >= dnnl::cpu_isa::avx512_core &&
                    dnnl::get_effective_cpu_isa() != dnnl::cpu_isa::avx2_vnni;
  const std::int64_t block = wide ? 16 : 8;
  if (dims.size() != 4 || dims[1] % block != 0) return plain;
  return dnnl::memory::desc(dims, plain.data_type(), wide ? tag::nChw16c : tag::nChw8c);
}

}  // namespace dagrad
