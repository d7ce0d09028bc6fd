// A Kernel around one oneDNN primitive whose arguments are the node's row-major tensors.
// The primitive, its memory objects and its argument array are created once; each run only
// swaps data handles and executes (through the C API, so no map is built per call).
#pragma once

#include <utility>
#include <vector>

#include "runtime/kernel.hpp"

namespace dagrad {

// Binds primitive argument `arg` (DNNL_ARG_*) to input or output `index` of the node.
struct PrimitiveArg {
  int arg;
  bool output;
  int index;
  dnnl::memory::desc md;
};

class PrimitiveKernel final : public Kernel {
 public:
  PrimitiveKernel(dnnl::primitive primitive, std::vector<PrimitiveArg> args);
  void run(const KernelCall& call) override;
  const char* library() const override { return "oneDNN"; }

 private:
  dnnl::primitive primitive_;
  std::vector<PrimitiveArg> args_;
  std::vector<dnnl::memory> memories_;
  std::vector<dnnl_exec_arg_t> exec_args_;
};

inline PrimitiveArg input_arg(int arg, int index, dnnl::memory::desc md) {
  return {arg, false, index, std::move(md)};
}
inline PrimitiveArg output_arg(int arg, int index, dnnl::memory::desc md) {
  return {arg, true, index, std::move(md)};
}

// Executes `primitive` with a prepared argument array; throws Error naming `what` on failure.
void execute_primitive(const dnnl::primitive& primitive, dnnl::stream& stream,
                       const std::vector<dnnl_exec_arg_t>& args, const char* what);

// A primitive (or reorder) with its argument array built once from memory objects whose data
// handles the kernel swaps between runs: executing converts and allocates nothing on dagrad's
// side (the C++ API's execute(stream, map) builds a vector from the map on every call).
class PreparedPrimitive {
 public:
  PreparedPrimitive() = default;
  PreparedPrimitive(dnnl::primitive primitive,
                    const std::vector<std::pair<int, dnnl::memory>>& args)
      : primitive_(std::move(primitive)) {
    for (const auto& [arg, memory] : args) args_.push_back({arg, memory.get()});
  }
  void execute(dnnl::stream& stream, const char* what) const {
    execute_primitive(primitive_, stream, args_, what);
  }

 private:
  dnnl::primitive primitive_;
  std::vector<dnnl_exec_arg_t> args_;
};

// A node's plain tensor and, when a primitive wants another layout, an internal buffer in that
// layout with prepared reorders between the two. The internal buffer lies in the kernel's
// scratch: reserve() it when the kernel is built and place() it at the start of every run.
// load() points the plain side at an input and reorders it in; bind() points it at an output,
// which store() fills from the internal buffer.
class StagedMemory {
 public:
  StagedMemory() = default;
  StagedMemory(const dnnl::memory::desc& plain, const dnnl::memory::desc& chosen,
               dnnl::engine& engine);
  // The memory the primitive reads or writes: the internal buffer, or the plain tensor.
  const dnnl::memory& used() const { return internal_ ? internal_ : user_; }
  void reserve(ScratchLayout& layout) {
    if (internal_) offset_ = layout.reserve(internal_.get_desc().get_size());
  }
  void place(std::byte* scratch) {
    if (internal_) internal_.set_data_handle(scratch + offset_);
  }
  void load(dnnl::stream& stream, const void* data);
  void bind(void* data) { user_.set_data_handle(data); }
  void store(dnnl::stream& stream);

 private:
  dnnl::memory user_, internal_;
  std::size_t offset_ = 0;
  PreparedPrimitive to_internal_, to_user_;
};

// The channel-blocked layout oneDNN's JIT kernels prefer for a 4-D NCHW tensor (nChw8c, or
// nChw16c on AVX-512 machines) when the channels fill whole blocks; `plain` itself otherwise.
dnnl::memory::desc channel_blocked_md(const dnnl::memory::desc& plain);

}  // namespace dagrad
