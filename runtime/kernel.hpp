// The kernel interface shared by the runtime and the kernel half of each op.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <oneapi/dnnl/dnnl.hpp>
#include <span>
#include <string>

#include "graph/graph.hpp"

namespace dagrad {

// State of one run that kernels may read.
struct RunContext {
  bool training = false;     // dropout and batch_norm behave as in training
  std::uint64_t seed = 0;    // with `step`, seeds random ops (dropout) reproducibly
  std::uint64_t step = 0;    // counts training runs of the plan
  double learning_rate = 0;  // η of the plan's parameter updates (RunOptions::learning_rate)
  dnnl::stream* stream = nullptr;
  // The plan's scratch block (64-byte aligned), shared by all its steps: see
  // Kernel::scratch_bytes.
  std::byte* scratch = nullptr;
  std::size_t scratch_bytes = 0;
};

// A prepared kernel for one node with fixed input and output descs. Created once when a plan
// is specialised and run on every execution.
class Kernel {
 public:
  virtual ~Kernel() = default;
  virtual void run(const KernelCall& call) = 0;
  // Bytes of temporary memory run() uses at the start of RunContext::scratch. A plan gives all
  // its steps one block, sized for the step that needs the most, so the contents do not survive
  // from one run() to the next: a kernel keeps there only what it writes before reading within
  // one run (reordered copies, padded copies, lists), and holds what must persist itself.
  virtual std::size_t scratch_bytes() const { return 0; }
  // Whose code does the work, for profiles: "oneDNN" for kernels running oneDNN primitives,
  // "dagrad" for dagrad's own loops (the default).
  virtual const char* library() const { return "dagrad"; }
};

// Where a kernel's temporary buffers lie in its scratch: reserve() each buffer when the kernel
// is built (offsets are 64-byte aligned), then base() in run().
class ScratchLayout {
 public:
  // Reserves `bytes` after the buffers reserved so far and returns their offset.
  std::size_t reserve(std::size_t bytes) {
    const std::size_t offset = bytes_;
    bytes_ += (bytes + 63) / 64 * 64;
    return offset;
  }
  std::size_t bytes() const { return bytes_; }
  // The start of the scratch. Error naming `what` when the block is smaller than bytes().
  std::byte* base(const RunContext& context, const char* what) const;

 private:
  std::size_t bytes_ = 0;
};

// What a kernel factory gets: the node, concrete descs and the oneDNN engine.
struct KernelBuild {
  const Node& node;
  std::span<const TensorDesc> inputs;
  std::span<const TensorDesc> outputs;
  dnnl::engine& engine;
};

// The process-wide CPU engine.
dnnl::engine& cpu_engine();

// Plain row-major memory descriptor of `desc` (a scalar becomes dims {1}).
dnnl::memory::desc plain_md(const TensorDesc& desc);
dnnl::memory::desc plain_md(const Shape& shape, DType dtype);
dnnl::memory::data_type to_dnnl(DType dtype);

// A kernel made of a lambda (for small kernels that need no prepared state).
template <class F>
class LambdaKernel final : public Kernel {
 public:
  explicit LambdaKernel(F f) : f_(std::move(f)) {}
  void run(const KernelCall& call) override { f_(call); }

 private:
  F f_;
};
template <class F>
std::unique_ptr<Kernel> make_kernel(F f) {
  return std::make_unique<LambdaKernel<F>>(std::move(f));
}

// Threads used by oneDNN and dagrad's own loops (OpenMP). 0 means all cores.
void set_num_threads(int threads);
int num_threads();

// How idle OpenMP threads wait: the OMP_WAIT_POLICY and GOMP_SPINCOUNT variables of this
// process's environment (libgomp reads them once, at program start), or, when neither is set,
// libgomp's default (spin ~300,000 iterations, ~3 ms, then sleep). libgomp has no call to change
// this after start. On a machine where other programs use the cores, start with
// GOMP_SPINCOUNT=1000: spinning threads burn the time slice their partner needs to reach the
// barrier, and a 2-thread training step measured up to 80 times slower (README, "Threads on a
// shared machine").
std::string openmp_wait_policy();

// While alive, the calling thread's OpenMP regions (oneDNN primitives created or run, and
// dagrad's loops) use `threads` threads; the previous setting comes back on destruction.
// threads == 0 leaves the setting alone.
class ThreadScope {
 public:
  explicit ThreadScope(int threads);
  ~ThreadScope();
  ThreadScope(const ThreadScope&) = delete;
  ThreadScope& operator=(const ThreadScope&) = delete;

 private:
  int saved_ = 0;
};

// Threads for a plan step whose inputs and outputs hold `bytes` bytes: 1 below `threshold`
// (CompileOptions::single_thread_below_bytes; 0 disables), else 0 (all threads).
inline int step_threads(std::size_t bytes, std::size_t threshold) {
  return threshold != 0 && bytes < threshold ? 1 : 0;
}

}  // namespace dagrad
