// compile(graph, outputs) -> Plan; Plan::run(feeds) -> output tensors.
//
// A plan prunes the graph to what the outputs need, orders it, creates each node's kernel
// once (a oneDNN primitive where the op has one, its reference kernel otherwise) and plans
// memory by value lifetimes: an intermediate buffer is reused once its last reader ran.
// A plan keeps one specialisation per distinct set of input shapes (inputs declared
// `batch_dynamic` may change dimension 0 between runs).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "graph/graph.hpp"

namespace dagrad {

enum class Backend {
  onednn,     // oneDNN primitives where the op has one (f32), reference kernels elsewhere
  reference,  // plain-loop reference kernels only (ground truth in tests, f32 and f64)
};

struct CompileOptions {
  Backend backend = Backend::onednn;
  bool reuse_memory = true;   // off: every value gets its own buffer, no op runs in place and
                              // reshapes copy (for debugging)
  bool fuse = true;           // off: no kernel fusion (for debugging)
  bool check_finite = false;  // after each node, raise Error naming the first op whose output
                              // holds a NaN or infinity (and the first parameter an SGDUpdate
                              // step left so)
  bool profile = false;       // time every step (waits for each kernel); see Plan::profile()
  // Steps whose inputs and outputs together hold fewer bytes than this run on one thread; the
  // rest use all threads (set_num_threads). A parallel region costs a fork and a barrier, and on
  // a machine whose cores are busy with other processes every barrier may wait for a time
  // slice: small steps gain nothing from a second thread and can lose milliseconds. 0: every
  // step uses all threads. Measured (bench_train MLP step, 2 threads, DAGRAD_SINGLE_THREAD_BELOW,
  // two rounds, 2026-11-26): batch 32 0.375/0.626 ms with 0, 0.322/0.353 with 128 KiB,
  // 0.639/0.430 with 256 KiB; batch 512 4.26/4.71, 3.95/3.79, 3.98/3.96 ms.
  std::size_t single_thread_below_bytes = 128 * 1024;
};

// Time spent per step of a profiled plan, summed over its runs.
struct StepProfile {
  std::string node;    // node name
  std::string op;      // op name, or the fused pattern
  std::string kernel;  // "oneDNN" or "dagrad" (Kernel::library()), or "reference"
  int threads = 0;     // 1 for a step run on one thread, 0 for all threads
  std::string output;  // first output's desc ("<desc> (updated)": the first parameter an
                       // SGDUpdate step changes)
  double seconds = 0;  // total
  std::uint64_t runs = 0;
  std::size_t scratch_bytes = 0;  // the kernel's temporary memory (Kernel::scratch_bytes)
};

struct RunOptions {
  bool training = false;   // dropout and batch_norm in training mode
  std::uint64_t seed = 0;  // seeds random ops together with the plan's run counter
  // η of a plan compiled with an SGDUpdate: must then be finite and > 0 (Error otherwise).
  // Ignored by plans without one.
  double learning_rate = 0;
};

// SGD run by the plan itself: every run, after computing what the outputs need, sets
//   params[i] ← params[i] − η (grads[i] + λ params[i])
// in place (the nn::SGD update, the same bits), with η = RunOptions::learning_rate and
// λ = weight_decay; with `momentum`, nn::Momentum's or nn::Nesterov's update instead (below).
// grads[i] is any value of the graph with params[i]'s desc, usually grad(loss, params)[i]; the
// gradients need not be outputs.
//
// Why: a dense layer's weight gradient at batches up to 512 (dW = xᵀ dy, with its bias
// gradient) then updates the weights as it is summed, in registers, and is never written to
// memory; every other parameter is updated by a vectorised step of its own as soon as its
// gradient is computed and nothing else needs the parameter, while the gradient is in cache
// and before its buffer is reused. That saves the separate optimiser pass over every weight and
// gradient. Measured (bench_engine weight_update, 2 threads, bench/README.md): the MLP's first
// layer at batch 32 in 115–127 µs against 145–168 µs for the plan's dW and db plus
// nn::SGD::step, 412–448 against 429–470 µs at batch 128; with momentum, no gain on that layer
// (the epilogue's reads of W and v cost what the separate pass did).
//
// Order: outputs are computed from the parameters' values before the update (a step updating a
// parameter runs after every step that reads it); a parameter requested as an output is returned
// as its updated tensor. Error (GraphError) at compile when params and grads differ in count,
// a params[i] is not a trainable parameter of the graph or appears twice, a grads[i] has another
// dtype or shape than its parameter or is itself one of the params, weight_decay is negative or
// not finite, or momentum is outside [0, 1).
struct SGDUpdate {
  std::vector<Value> params;
  std::vector<Value> grads;
  double weight_decay = 0;
  // γ in [0, 1): with γ > 0 the update is nn::Momentum's (or, with nesterov, nn::Nesterov's),
  // the same bits: v ← γ v − η (g + λ w); w ← w + v (Nesterov: w ← w + γ v − η (g + λ w)),
  // the velocities v held by the plan (Plan::velocities()), zero at compile.
  double momentum = 0;
  bool nesterov = false;
};

using Feeds = std::vector<std::pair<Value, Tensor>>;

class Plan {
 public:
  Plan(Graph& graph, std::vector<Value> outputs, CompileOptions options, SGDUpdate update = {});
  ~Plan();
  Plan(Plan&&) noexcept;
  Plan& operator=(Plan&&) noexcept;

  // Checks every feed (unknown, missing, dtype, shape) before computing anything, then runs.
  // The returned tensors are views of the plan's output buffers, held in a vector the plan
  // reuses: the next run overwrites them, so clone() what must be kept. Nothing is allocated
  // on the heap per run once the plan has run with these input shapes.
  const std::vector<Tensor>& run(const Feeds& feeds, const RunOptions& options = {});

  const std::vector<Value>& outputs() const { return outputs_; }
  // Bytes of the arena planned for the last specialisation run (or for the declared shapes
  // before the first run): the intermediate values (and outputs) by lifetime, plus one scratch
  // block that all steps share for their kernels' temporary buffers (reordered and padded
  // copies, recomputed pooling maxima; see scratch_bytes()). Not in it: parameters, feeds,
  // state a kernel keeps between runs, and the scratchpads and packing buffers oneDNN manages
  // itself.
  std::size_t planned_peak_bytes();
  // The shared scratch block: the largest Kernel::scratch_bytes() of any step.
  std::size_t scratch_bytes();
  // Bytes the arena would need with no reuse: the sum of all intermediate values and of every
  // step's scratch.
  std::size_t unplanned_bytes();
  // Number of steps executed per run, and how many run the oneDNN backend's kernels (oneDNN
  // primitives or dagrad's own vectorised kernels) rather than reference kernels.
  std::size_t num_steps();
  std::size_t num_onednn_steps();
  // Memory reuse beyond lifetimes (both off with reuse_memory = false): element-wise steps that
  // write their output over their input 0 because that input dies there, and reshapes of
  // computed values that run as views of their input's buffer (no step, no copy).
  std::size_t num_in_place_steps();
  // Parameters of the SGDUpdate updated inside a fused weight-gradient step (the rest are
  // updated by a step of their own at the end of the run).
  std::size_t num_fused_updates();
  // With SGDUpdate::momentum > 0, the velocity of each parameter (in the update's order), zero
  // at compile and carried from run to run; empty otherwise. Views of the plan's storage:
  // clone() what must be kept.
  std::span<const Tensor> velocities() const { return velocities_; }
  // Copies `values` into the velocities (to restore a state, e.g. nn::Momentum's "velocity.<i>"
  // from a checkpoint). Error, before copying anything, when the count or a dtype or shape
  // differs.
  void load_velocities(std::span<const Tensor> values);
  std::size_t num_views();
  // The fused kernels the plan runs, e.g. "matmul+bias+relu", "transposed-A matmul".
  std::vector<std::string> fused_patterns();
  std::size_t num_specializations() const { return specializations_.size(); }
  std::uint64_t runs() const { return runs_; }
  // Per-step times of the specialisation that ran most often (the main batch size; compile
  // with profile = true), slowest first, and a printable table of them.
  std::vector<StepProfile> profile();
  std::string profile_report(std::size_t top = 25);

  struct Specialization;

 private:
  Specialization& specialize(const std::vector<Shape>& input_shapes);
  void check_update() const;

  Graph* graph_;
  std::vector<Value> outputs_;
  CompileOptions options_;
  SGDUpdate update_;
  std::vector<Tensor> velocities_;  // SGDUpdate with momentum: one per parameter
  std::vector<NodeId> order_;       // pruned, topological
  std::vector<NodeId> feed_nodes_;  // input leaves the outputs need
  std::map<std::vector<Shape>, std::unique_ptr<Specialization>> specializations_;
  Specialization* last_ = nullptr;
  std::vector<const Tensor*> fed_;  // per feed node, this run's tensor
  std::vector<Tensor> results_;
  std::uint64_t runs_ = 0;
};

Plan compile(Graph& graph, std::vector<Value> outputs, CompileOptions options = {});
// A plan that also applies `update` at every run (see SGDUpdate).
Plan compile(Graph& graph, std::vector<Value> outputs, SGDUpdate update,
             CompileOptions options = {});

}  // namespace dagrad
