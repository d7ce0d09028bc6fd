// OpDef: everything about one op in one record (shape rule, backward rule, kernels, samples).
// Declared in graph/ so the graph can run shape rules when a node is added; the records
// themselves are written in ops/<family>.cpp. Kernel types are only forward-declared here:
// graph/ knows nothing of oneDNN.
#pragma once

#include <fmt/format.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "graph/attrs.hpp"
#include "graph/error.hpp"
#include "graph/shape.hpp"
#include "graph/tensor.hpp"

namespace dagrad {

class Graph;
class Value;
struct Node;
struct RunContext;
class Kernel;
struct KernelBuild;

// Arguments of a shape rule. `site` names the op and node ("matmul \"fc2\"") for messages.
struct ShapeCall {
  const Attrs& attrs;
  std::span<const TensorDesc> inputs;
  std::string_view site;

  template <class... Args>
  [[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) const {
    throw ShapeError(fmt::format("{}: {}", site, fmt::format(format, std::forward<Args>(args)...)));
  }
};
using ShapeFn = std::function<std::vector<TensorDesc>(const ShapeCall&)>;

// Arguments of a backward rule: the node, its inputs and outputs as values, the gradients
// flowing into its outputs (nullopt: that output does not reach the loss) and which inputs
// need a gradient. The rule returns one optional gradient per input, built from ops.
struct BackwardCall {
  const Node& node;
  Graph& graph;
  std::span<const Value> inputs;
  std::span<const Value> outputs;
  std::span<const std::optional<Value>> output_grads;
  const std::vector<bool>& needs;

  // Gradient of output `i`, zeros of the output's shape when it does not reach the loss.
  Value grad(int i = 0) const;
  const Attrs& attrs() const;
};
using BackwardFn = std::function<std::vector<std::optional<Value>>(const BackwardCall&)>;

// Arguments of a kernel call. Tensors are row-major views into the plan's buffers.
struct KernelCall {
  const Node& node;
  std::span<const Tensor> inputs;
  std::span<Tensor> outputs;
  RunContext& context;
  const Attrs& attrs() const;
};
using ReferenceFn = std::function<void(const KernelCall&)>;
// Creates a prepared kernel for concrete input and output descs, or returns nullptr when
// this configuration is not supported (the runtime then falls back to the reference kernel).
using KernelFactory = std::function<std::unique_ptr<Kernel>(const KernelBuild&)>;

// How a test fills one input of a sample.
struct InputSpec {
  Shape shape;
  std::optional<DType> dtype;  // nullopt: the floating dtype under test (f32 or f64)
  double low = -1.0;           // uniform in [low, high)
  double high = 1.0;
  double min_magnitude = 0.0;                 // keep |x| >= this (away from kinks such as relu's 0)
  bool differentiable = true;                 // gradcheck perturbs this input
  std::optional<std::vector<double>> values;  // exact values instead of random ones
};

inline InputSpec spec(Shape shape, double low = -1.0, double high = 1.0) {
  return InputSpec{std::move(shape), std::nullopt, low, high};
}
inline InputSpec labels(Shape shape, int classes) {
  return InputSpec{std::move(shape), DType::i32, 0, static_cast<double>(classes), 0, false};
}

struct Sample {
  std::string label;
  std::vector<InputSpec> inputs;
  Attrs attrs;
  double tolerance = 1e-6;  // gradcheck: allowed |analytic - numeric| / (1 + |numeric|)
  double step = 1e-6;       // gradcheck: central-difference step
};

// Inputs the op must refuse with a dagrad::Error (at build time, or at run time when
// `at_run` is set), and a fragment the message must contain.
struct ErrorSample {
  std::string label;
  std::vector<InputSpec> inputs;
  Attrs attrs;
  std::string message_contains;
  bool at_run = false;
};

struct OpDef {
  std::string name;
  std::string formula;  // what the op computes, shown by dagrad-info
  int min_inputs = 1;
  int max_inputs = 1;  // -1: any number
  ShapeFn shape;
  BackwardFn backward;  // empty: the op has no gradient, and `no_gradient` says why
  std::string no_gradient;
  bool second_order = false;  // its backward is built from differentiable ops
  ReferenceFn reference;      // plain loops, f32 and f64
  KernelFactory onednn;       // optional
  // Optional, for the plan's fusion pass: a kernel computing `consumer`(this op(inputs...)) in
  // one pass, for a `consumer` node that is the only reader of this op's output (its other
  // inputs, if any, must be among this op's inputs: the hook checks). The kernel reads this
  // op's inputs and writes the consumer's outputs; KernelBuild::node is this op's node and
  // KernelBuild::outputs the consumer's descs. nullptr when the pair cannot be fused.
  std::function<std::unique_ptr<Kernel>(const KernelBuild&, const Node& consumer)> fuse_consumer;
  std::function<std::vector<Sample>()> samples;
  std::function<std::vector<ErrorSample>()> error_samples;
  bool random = false;  // output depends on RunContext's seed (dropout)
  // Element-wise: output element i depends only on element i of input 0 (and of inputs of the
  // output's shape, or broadcast ones), and every kernel of the op (oneDNN and reference)
  // reads element i of input 0 before writing element i of the output. The plan then lets
  // the output overwrite input 0 when input 0 has the output's desc and dies at this step.
  bool in_place = false;
};

// All registered ops, by name.
class OpRegistry {
 public:
  void add(OpDef def);
  // Throws GraphError naming the op when it is not registered.
  const OpDef& get(std::string_view name) const;
  const OpDef* find(std::string_view name) const;
  std::vector<const OpDef*> all() const;

 private:
  std::map<std::string, OpDef, std::less<>> ops_;
};

// The process-wide registry, filled with every op on first use.
const OpRegistry& op_registry();

}  // namespace dagrad
