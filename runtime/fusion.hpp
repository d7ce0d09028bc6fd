// Kernel fusion at plan time. The plan knows the whole forward and backward graph, so it can
// hand oneDNN larger pieces of work than an eager framework:
//   - transpose folding: a 2-D matmul reading transpose(x) reads x through swapped strides
//     (the backward's dX = dY·Wᵀ and dW = Xᵀ·dY then copy nothing);
//   - post-ops: matmul [+ bias row] [+ relu | tanh | sigmoid] runs as one matmul primitive
//     with a bias and an eltwise post-op;
//   - a dense layer's weight gradient dW = xᵀ dy at a small batch, with its bias gradient
//     sum(dy, {0}), as one step of dagrad's own kernel (ops/small_gemm.hpp), faster than
//     oneDNN's SGEMM for short sums; with the plan's SGDUpdate, when the gradients serve only
//     the update, that kernel updates W and b in place instead of writing dW and db;
//   - an op absorbing its only reader through OpDef::fuse_consumer: conv2d + relu | tanh |
//     sigmoid (a post-op), max_pool2d_backward + relu_grad of the pooled input (one pass);
//   - a convolution's conv2d_backward_weights and conv2d_backward_data, which read the same
//     dy, as one kernel that reorders dy once (a step writing two nodes' outputs);
//   - conv -> relu -> 2x2 max pooling: the convolution's weights gradient (and its bias
//     gradient, a sum of dy over N, H, W, and its data gradient) computed from the pooling's
//     gradient, skipping the zeros of dy = relu_grad(max_pool2d_backward(dp, r), r); when
//     nothing else reads dy, max_pool2d_backward and relu_grad do not run at all.
//   - sparse cross-entropy: log_softmax -> pick [-> neg [-> mean]] as one pass of dagrad's own
//     kernel writing every value along the chain, and its backward [div (-> reshape) ->
//     broadcast_to |] [neg ->] pick_grad -> log_softmax_grad as another, dz = ±d_i ([j =
//     label_i] − e^y) (ops/cross_entropy_kernels.hpp): nine small steps become two.
// A pattern fuses only when the intermediate values are read by nothing else and are not
// requested outputs (the cross-entropy forward instead writes them all), so results are those
// of the unfused plan (within f32 rounding).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ops/sgd_update.hpp"
#include "runtime/kernel.hpp"

namespace dagrad {

using ValueKey = std::pair<NodeId, int>;

struct FusedStep {
  NodeId anchor;                 // the node whose outputs this step writes
  std::vector<ValueKey> inputs;  // what the fused kernel reads, in its own order
  std::unique_ptr<Kernel> kernel;
  std::vector<ValueKey> outputs;  // what the kernel writes, in its order; empty: the anchor's
  std::vector<NodeId> absorbed;   // nodes no longer executed on their own
  std::string pattern;            // e.g. "matmul+bias+relu"
  std::vector<NodeId> updated;    // parameters the kernel updates in place (SGDUpdate); a step
                                  // with these and no outputs writes no value
  int threads = 0;                // see step_threads()
};

struct FusionContext {
  const Graph& graph;
  const std::vector<NodeId>& order;
  const std::map<ValueKey, TensorDesc>& descs;
  const std::map<ValueKey, int>& consumers;  // number of reading input slots
  std::function<bool(const ValueKey&)> is_output;
  std::size_t single_thread_below_bytes = 0;  // CompileOptions; kernels are created under it
  // The plan's SGDUpdate: the parameter whose update uses `key` as its gradient when that is the
  // value's only use (no node reads it, it is not an output); whether a parameter is updated;
  // the update's rule.
  std::function<std::optional<NodeId>(const ValueKey&)> sole_update = [](const ValueKey&) {
    return std::optional<NodeId>();
  };
  std::function<bool(NodeId)> is_updated = [](NodeId) { return false; };
  SGDRule rule;
  // With momentum, the velocity of an updated f32 parameter (the plan's storage).
  std::function<float*(NodeId)> velocity_of = [](NodeId) -> float* { return nullptr; };
};

// Fused steps, plus in `dropped` the nodes that no step needs any more (folded transposes).
std::vector<FusedStep> plan_fusions(const FusionContext& context, std::vector<NodeId>& dropped);

}  // namespace dagrad
