// Helpers shared by the tests: turning a Sample into a graph and feeds (registry-wide tests),
// and seeded random tensors.
#pragma once

#include <functional>
#include <memory>
#include <random>

#include "dagrad.hpp"

namespace dagrad::testing {

// Values uniform in [low, high), drawn in element order from mt19937_64(seed).
// The bytes of t's elements, to compare results bit for bit.
std::vector<std::uint8_t> bytes_of(const Tensor& t);

Tensor uniform_tensor(Shape shape, std::uint64_t seed, double low = -1.0, double high = 1.0,
                      DType dtype = DType::f32);

// Random (or exact) values for one input spec, in `float_dtype` for floating inputs.
Tensor make_input(const InputSpec& spec, DType float_dtype, std::mt19937_64& rng);

struct BuiltSample {
  std::vector<Value> inputs;
  std::vector<Value> outputs;
  Feeds feeds;
};

// Adds the sample's inputs and one node of `op` to `graph`, with feeds for a run.
BuiltSample build_sample(Graph& graph, const OpDef& op, const std::vector<InputSpec>& inputs,
                         const Attrs& attrs, DType float_dtype, std::uint64_t seed);

// Σ_k Σ output_k · w_k over the floating outputs, a scalar to differentiate.
Value combine_outputs(Graph& graph, const std::vector<Value>& outputs, std::uint64_t seed);

// A graph built for one batch size (batch-size tests): `batched` are the inputs whose first
// axis is the batch (fed with deterministic values: sin for floating, i % 2 for i32); `fixed`
// feeds the rest.
struct BatchGraph {
  Graph graph;
  std::vector<Value> batched;
  Feeds fixed;
  std::vector<Value> outputs;
};
using BatchGraphBuilder =
    std::function<std::unique_ptr<BatchGraph>(std::int64_t batch, bool batch_dynamic)>;

// The graph declared at batches[0] with its batched inputs batch_dynamic, compiled once and run
// at every batch, must give what the same graph declared at that batch gives (within 1e-6
// relative). Not the reference backend: a gradient rule that builds its graph from the declared
// batch is wrong in every backend alike.
void expect_follows_the_batch(const BatchGraphBuilder& build,
                              std::vector<std::int64_t> batches = {4, 2, 7});

}  // namespace dagrad::testing
