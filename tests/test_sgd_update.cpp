// The plan's own SGD update (SGDUpdate, runtime/plan.hpp): fused into the small-batch weight
// gradient kernel or run as a step per parameter, it must leave the parameters with the same
// bits as a plan returning the gradients followed by nn::SGD::step.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "dagrad.hpp"
#include "ops/small_gemm.hpp"
#include "registry_support.hpp"

namespace dagrad {
namespace {

using testing::bytes_of;
using testing::uniform_tensor;

// A dense network in its own graph: x [batch, sizes[0]] through dense layers (relu between
// them) to a sparse cross-entropy loss over sizes.back() classes.
struct Net {
  Graph graph;
  Value x, labels, loss;
  std::vector<Value> params;
  std::vector<Value> hidden;  // each layer's output before its activation
};

void build(Net& net, std::int64_t batch, const std::vector<std::int64_t>& sizes, bool bias,
           DType dtype = DType::f32) {
  net.x = net.graph.input("x", {batch, sizes[0]}, dtype);
  net.labels = net.graph.input("labels", {batch}, DType::i32);
  Value h = net.x;
  for (std::size_t l = 1; l < sizes.size(); ++l) {
    Value w = net.graph.parameter(
        fmt::format("w{}", l), uniform_tensor({sizes[l - 1], sizes[l]}, 10 + l, -0.2, 0.2, dtype));
    net.params.push_back(w);
    h = matmul(h, w);
    if (bias) {
      Value b = net.graph.parameter(fmt::format("b{}", l),
                                    uniform_tensor({sizes[l]}, 20 + l, -0.1, 0.1, dtype));
      net.params.push_back(b);
      h = h + b;
    }
    net.hidden.push_back(h);
    if (l + 1 < sizes.size()) h = relu(h);
  }
  net.loss = sparse_cross_entropy(h, net.labels);
}

// A batch for nets of one shape: inputs in [0, 1), labels spread over the classes.
struct Batch {
  Tensor x, labels;
};
Batch batch_for(const Net& net, std::uint64_t seed, DType dtype = DType::f32) {
  Tensor labels(net.labels.shape(), DType::i32);
  const std::int64_t classes = net.hidden.back().shape()[1];
  for (std::int64_t i = 0; i < labels.numel(); ++i) {
    labels.data<std::int32_t>()[i] = static_cast<std::int32_t>((i * 7 + seed) % classes);
  }
  return {uniform_tensor(net.x.shape(), seed, 0.0, 1.0, dtype), labels};
}
Feeds feeds(const Net& net, const Batch& b) {
  return {{net.x, b.x}, {net.labels, b.labels}};
}

std::vector<std::uint8_t> parameter_bits(Net& net) {
  std::vector<std::uint8_t> bits;
  for (const Value& p : net.params) {
    const auto b = bytes_of(net.graph.value_of(p));
    bits.insert(bits.end(), b.begin(), b.end());
  }
  return bits;
}

// Trains `steps` steps with nn::SGD after a plan returning the gradients.
void train_with_optimizer(Net& net, const std::vector<Batch>& batches, double lr,
                          double weight_decay, CompileOptions options = {}) {
  std::vector<Value> outputs{net.loss};
  for (const Value& g : grad(net.loss, net.params)) outputs.push_back(g);
  Plan plan = compile(net.graph, outputs, options);
  std::vector<Tensor> params;
  for (const Value& p : net.params) params.push_back(net.graph.value_of(p));
  SGD sgd({.learning_rate = lr, .weight_decay = weight_decay});
  for (const Batch& b : batches) {
    const auto& out = plan.run(feeds(net, b), {.training = true});
    sgd.step(params, std::span<const Tensor>(out).subspan(1));
  }
}

const bool small_gemm_available = transposed_a_small_k_kernel(1, 1, 1, false) != nullptr;

TEST(SGDUpdate, FusedIntoTheWeightGradientGivesTheOptimizersBits) {
  struct Case {
    std::int64_t batch;
    bool bias;
    double weight_decay;
  };
  // Batch 200 sums k in two chunks (partial sums in the kernel's scratch); 37 and 13 leave
  // masked column blocks and short row blocks.
  for (const Case& k : {Case{32, true, 0.0}, Case{200, true, 1e-2}, Case{7, false, 0.0},
                        Case{small_k_limit, true, 0.0}}) {
    const std::vector<std::int64_t> sizes{50, 37, 24, 13};
    for (int threads : {1, 2}) {
      set_num_threads(threads);  // oneDNN's matmuls may round differently on other counts
      std::vector<Batch> batches;
      Net expected;
      build(expected, k.batch, sizes, k.bias);
      for (std::uint64_t s = 1; s <= 3; ++s) batches.push_back(batch_for(expected, s));
      train_with_optimizer(expected, batches, 0.05, k.weight_decay,
                           {.single_thread_below_bytes = 0});
      Net net;
      build(net, k.batch, sizes, k.bias);
      Plan plan = compile(net.graph, {net.loss},
                          SGDUpdate{.params = net.params,
                                    .grads = grad(net.loss, net.params),
                                    .weight_decay = k.weight_decay},
                          {.single_thread_below_bytes = 0});
      // Every weight and bias is updated inside its layer's weight-gradient kernel.
      EXPECT_EQ(plan.num_fused_updates(), small_gemm_available ? net.params.size() : 0)
          << "batch " << k.batch;
      for (const Batch& b : batches) {
        // The loss is computed from the parameters before this run's update.
        Net before;
        build(before, k.batch, sizes, k.bias);
        for (std::size_t i = 0; i < net.params.size(); ++i) {
          before.graph.value_of(before.params[i]) = net.graph.value_of(net.params[i]).clone();
        }
        Plan loss_only = compile(before.graph, {before.loss});
        const double loss_before = loss_only.run(feeds(before, b))[0].item();
        EXPECT_EQ(plan.run(feeds(net, b), {.training = true, .learning_rate = 0.05})[0].item(),
                  loss_before);
      }
      EXPECT_EQ(parameter_bits(net), parameter_bits(expected))
          << "batch " << k.batch << ", " << threads << " threads";
    }
    set_num_threads(0);
  }
}

TEST(SGDUpdate, StepsOfTheirOwnMatchTheOptimizerOnEveryBackend) {
  // Without fusion, on the reference backend and in f64, every parameter gets an update step at
  // the end of the run.
  struct Case {
    CompileOptions options;
    DType dtype;
  };
  for (const Case& k :
       {Case{{.fuse = false}, DType::f32}, Case{{.backend = Backend::reference}, DType::f32},
        Case{{.backend = Backend::reference}, DType::f64},
        Case{{.reuse_memory = false}, DType::f32}}) {
    const std::vector<std::int64_t> sizes{20, 16, 5};
    Net expected;
    build(expected, 9, sizes, true, k.dtype);
    std::vector<Batch> batches;
    for (std::uint64_t s = 1; s <= 2; ++s) batches.push_back(batch_for(expected, s, k.dtype));
    train_with_optimizer(expected, batches, 0.1, 1e-3, k.options);
    Net net;
    build(net, 9, sizes, true, k.dtype);
    Plan plan = compile(
        net.graph, {net.loss},
        SGDUpdate{.params = net.params, .grads = grad(net.loss, net.params), .weight_decay = 1e-3},
        k.options);
    for (const Batch& b : batches) plan.run(feeds(net, b), {.learning_rate = 0.1});
    const bool fused = k.options.fuse && k.options.backend == Backend::onednn &&
                       k.dtype == DType::f32 && small_gemm_available;
    EXPECT_EQ(plan.num_fused_updates(), fused ? net.params.size() : 0);
    EXPECT_EQ(parameter_bits(net), parameter_bits(expected)) << to_string(k.dtype);
  }
}

TEST(SGDUpdate, RequestedValuesAreThoseBeforeTheUpdate) {
  // The first layer's output, the last weight gradient and the last bias are requested: the
  // output and the gradient come from the weights before the update, the requested parameter
  // is returned updated, and the requested gradient's update runs as a step of its own.
  const std::vector<std::int64_t> sizes{30, 20, 6};
  Net expected;
  build(expected, 16, sizes, true);
  const Batch batch = batch_for(expected, 5);
  const auto expected_grads = grad(expected.loss, expected.params);
  Plan reference = compile(expected.graph, {expected.hidden[0], expected_grads[2]});
  const auto before = reference.run(feeds(expected, batch));
  const Tensor hidden = before[0].clone(), w2_grad = before[1].clone();
  train_with_optimizer(expected, {batch}, 0.2, 0.0);

  Net net;
  build(net, 16, sizes, true);
  const auto grads = grad(net.loss, net.params);
  Plan plan = compile(net.graph, {net.hidden[0], grads[2], net.params[3]},
                      SGDUpdate{.params = net.params, .grads = grads});
  const auto& out = plan.run(feeds(net, batch), {.learning_rate = 0.2});
  EXPECT_EQ(bytes_of(out[0]), bytes_of(hidden));
  EXPECT_EQ(bytes_of(out[1]), bytes_of(w2_grad));
  EXPECT_EQ(bytes_of(out[2]), bytes_of(net.graph.value_of(net.params[3])));
  EXPECT_EQ(bytes_of(out[2]), bytes_of(expected.graph.value_of(expected.params[3])));
  EXPECT_EQ(parameter_bits(net), parameter_bits(expected));
  // Layer 1's weights and bias are fused; layer 2's gradient is an output, so both of its
  // parameters are updated by steps of their own.
  EXPECT_EQ(plan.num_fused_updates(), small_gemm_available ? 2u : 0u);
  // The profile names the update steps and the parameters they change.
  std::vector<std::string> updates;
  for (const StepProfile& step : plan.profile()) {
    if (step.output.ends_with(" (updated)")) updates.push_back(step.op + ": " + step.output);
  }
  std::sort(updates.begin(), updates.end());
  std::vector<std::string> expected_updates{"sgd update: f32[20,6] (updated)",
                                            "sgd update: f32[6] (updated)"};
  if (small_gemm_available) {
    expected_updates.push_back("transposed-A matmul (small batch)+sum+sgd: f32[30,20] (updated)");
  } else {
    expected_updates.push_back("sgd update: f32[20] (updated)");
    expected_updates.push_back("sgd update: f32[30,20] (updated)");
  }
  std::sort(expected_updates.begin(), expected_updates.end());
  EXPECT_EQ(updates, expected_updates);
}

TEST(SGDUpdate, UpdatesParametersTheOutputsDoNotRead) {
  // W and b appear only in the update, their gradients computed from inputs: xᵀ dy and the
  // column sums of dy, against the same values computed by a plan without the update.
  for (std::int64_t k : {std::int64_t{24}, small_k_chunk + 9}) {
    Graph g;
    Value x = g.input("x", {k, 40});
    Value dy = g.input("dy", {k, 19});
    Value w = g.parameter("w", uniform_tensor({40, 19}, 1));
    Value b = g.parameter("b", uniform_tensor({19}, 2));
    const std::vector<Value> grads{matmul(transpose(x), dy), sum(dy, {0})};
    const Feeds feeds{{x, uniform_tensor({k, 40}, 3)}, {dy, uniform_tensor({k, 19}, 4)}};
    Plan gradients = compile(g, grads);
    const auto& expected_grads = gradients.run(feeds);
    std::vector<Tensor> expected{g.value_of(w).clone(), g.value_of(b).clone()};
    SGD({.learning_rate = 0.3, .weight_decay = 0.5}).step(expected, expected_grads);

    Plan plan =
        compile(g, {sum(x, {0})}, SGDUpdate{.params = {w, b}, .grads = grads, .weight_decay = 0.5});
    plan.run(feeds, {.learning_rate = 0.3});
    EXPECT_EQ(plan.num_fused_updates(), small_gemm_available ? 2u : 0u);
    EXPECT_EQ(bytes_of(g.value_of(w)), bytes_of(expected[0])) << "k " << k;
    EXPECT_EQ(bytes_of(g.value_of(b)), bytes_of(expected[1])) << "k " << k;
  }
}

TEST(SGDUpdate, EveryBatchSizeOfADynamicInputGetsTheUpdate) {
  // A trainer's last batch is often smaller: each batch size is a specialisation with its own
  // fused kernels (K 24 and 150, the latter in two chunks), and both update the same weights.
  const auto make = [](Graph& g, Value& x, Value& labels, std::vector<Value>& params) {
    x = g.input("x", {24, 30}, DType::f32, /*batch_dynamic=*/true);
    labels = g.input("labels", {24}, DType::i32, /*batch_dynamic=*/true);
    params = {g.parameter("w1", uniform_tensor({30, 20}, 1, -0.3, 0.3)),
              g.parameter("b1", uniform_tensor({20}, 2, -0.1, 0.1)),
              g.parameter("w2", uniform_tensor({20, 7}, 3, -0.3, 0.3))};
    return sparse_cross_entropy(matmul(relu(matmul(x, params[0]) + params[1]), params[2]), labels);
  };
  std::vector<std::pair<Tensor, Tensor>> batches;
  for (std::int64_t rows : {24, 150, 24}) {
    Tensor labels({rows}, DType::i32);
    for (std::int64_t i = 0; i < rows; ++i) labels.data<std::int32_t>()[i] = (i * 5 + 1) % 7;
    batches.emplace_back(uniform_tensor({rows, 30}, 40 + rows, 0.0, 1.0), labels);
  }
  Graph expected_graph;
  Value ex, el;
  std::vector<Value> eparams;
  Value eloss = make(expected_graph, ex, el, eparams);
  std::vector<Value> outputs{eloss};
  for (const Value& gv : grad(eloss, eparams)) outputs.push_back(gv);
  Plan reference = compile(expected_graph, outputs);
  std::vector<Tensor> param_tensors;
  for (const Value& p : eparams) param_tensors.push_back(expected_graph.value_of(p));
  SGD sgd({.learning_rate = 0.2});

  Graph g;
  Value x, labels;
  std::vector<Value> params;
  Value loss = make(g, x, labels, params);
  Plan plan = compile(g, {loss}, SGDUpdate{.params = params, .grads = grad(loss, params)});
  for (const auto& [xs, ls] : batches) {
    const auto& out = reference.run({{ex, xs}, {el, ls}});
    sgd.step(param_tensors, std::span<const Tensor>(out).subspan(1));
    plan.run({{x, xs}, {labels, ls}}, {.learning_rate = 0.2});
    for (std::size_t i = 0; i < params.size(); ++i) {
      EXPECT_EQ(bytes_of(g.value_of(params[i])), bytes_of(param_tensors[i]))
          << "parameter " << i << " after the batch of " << xs.shape()[0];
    }
  }
  EXPECT_EQ(plan.num_specializations(), 2u);
}

TEST(SGDUpdate, MomentumAndNesterovGiveTheOptimizersBitsAndVelocities) {
  // Three steps against nn::Momentum and nn::Nesterov (with weight decay): fused at batch 32
  // and 200 (two chunks), on 1 and 2 threads, and unfused; the plan's velocities equal the
  // optimiser's "velocity.<i>" state.
  struct Case {
    std::int64_t batch;
    bool nesterov;
    bool fuse;
  };
  for (const Case& k : {Case{32, false, true}, Case{32, true, true}, Case{200, false, true},
                        Case{200, true, true}, Case{13, true, false}}) {
    for (int threads : {1, 2}) {
      set_num_threads(threads);
      const std::vector<std::int64_t> sizes{50, 37, 24, 13};
      const CompileOptions options{.fuse = k.fuse, .single_thread_below_bytes = 0};
      Net expected;
      build(expected, k.batch, sizes, true);
      std::vector<Batch> batches;
      for (std::uint64_t s = 1; s <= 3; ++s) batches.push_back(batch_for(expected, s));
      std::vector<Value> outputs{expected.loss};
      for (const Value& g : grad(expected.loss, expected.params)) outputs.push_back(g);
      Plan reference = compile(expected.graph, outputs, options);
      std::vector<Tensor> params;
      for (const Value& p : expected.params) params.push_back(expected.graph.value_of(p));
      const MomentumOptions momentum{.learning_rate = 0.05, .momentum = 0.9, .weight_decay = 1e-3};
      std::unique_ptr<Optimizer> optimizer =
          k.nesterov ? std::unique_ptr<Optimizer>(new Nesterov(momentum))
                     : std::unique_ptr<Optimizer>(new Momentum(momentum));
      Net net;
      build(net, k.batch, sizes, true);
      Plan plan = compile(net.graph, {net.loss},
                          SGDUpdate{.params = net.params,
                                    .grads = grad(net.loss, net.params),
                                    .weight_decay = 1e-3,
                                    .momentum = 0.9,
                                    .nesterov = k.nesterov},
                          options);
      ASSERT_EQ(plan.velocities().size(), net.params.size());
      for (const Batch& b : batches) {
        const auto& out = reference.run(feeds(expected, b));
        optimizer->step(params, std::span<const Tensor>(out).subspan(1));
        plan.run(feeds(net, b), {.learning_rate = 0.05});
      }
      EXPECT_EQ(plan.num_fused_updates(), k.fuse && small_gemm_available ? net.params.size() : 0);
      const std::string where =
          fmt::format("batch {}, {}, {}, {} threads", k.batch, k.nesterov ? "Nesterov" : "momentum",
                      k.fuse ? "fused" : "unfused", threads);
      EXPECT_EQ(parameter_bits(net), parameter_bits(expected)) << where;
      const NamedTensors state = optimizer->state();
      for (std::size_t i = 0; i < net.params.size(); ++i) {
        const auto it = std::find_if(state.begin(), state.end(), [&](const auto& entry) {
          return entry.first == fmt::format("velocity.{}", i);
        });
        ASSERT_NE(it, state.end());
        EXPECT_EQ(bytes_of(plan.velocities()[i]), bytes_of(it->second))
            << where << ", velocity " << i;
      }
    }
  }
  set_num_threads(0);
}

TEST(SGDUpdate, LoadedVelocitiesContinueARun) {
  // Two steps with momentum, then the parameters and velocities go to a new plan on a new
  // graph, which takes the third step: the same bits as three steps of one plan.
  const std::vector<std::int64_t> sizes{20, 12, 5};
  const auto compile_momentum = [](Net& net) {
    return compile(net.graph, {net.loss},
                   SGDUpdate{.params = net.params,
                             .grads = grad(net.loss, net.params),
                             .momentum = 0.8,
                             .nesterov = true});
  };
  Net whole, first, second;
  for (Net* net : {&whole, &first, &second}) build(*net, 32, sizes, true);
  std::vector<Batch> batches;
  for (std::uint64_t s = 1; s <= 3; ++s) batches.push_back(batch_for(whole, s));
  Plan all = compile_momentum(whole);
  for (const Batch& b : batches) all.run(feeds(whole, b), {.learning_rate = 0.1});
  Plan two = compile_momentum(first);
  for (std::size_t s = 0; s < 2; ++s) two.run(feeds(first, batches[s]), {.learning_rate = 0.1});

  Plan last = compile_momentum(second);
  for (std::size_t i = 0; i < second.params.size(); ++i) {
    second.graph.value_of(second.params[i]).copy_from(first.graph.value_of(first.params[i]));
  }
  last.load_velocities(two.velocities());
  last.run(feeds(second, batches[2]), {.learning_rate = 0.1});
  EXPECT_EQ(parameter_bits(second), parameter_bits(whole));
  for (std::size_t i = 0; i < whole.params.size(); ++i) {
    EXPECT_EQ(bytes_of(last.velocities()[i]), bytes_of(all.velocities()[i])) << i;
  }

  // Wrong counts and shapes change nothing.
  const auto refused = [](Plan& plan, std::span<const Tensor> values, const std::string& fragment) {
    try {
      plan.load_velocities(values);
      ADD_FAILURE() << "no Error for " << fragment;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    }
  };
  std::vector<Tensor> values(two.velocities().begin(), two.velocities().end());
  values.pop_back();
  refused(last, values, "the plan has 4 velocities, got 3");
  values.push_back(Tensor({4}, DType::f32));
  refused(last, values, "velocity 3 (parameter \"b2\") is f32[5], got f32[4]");
  Plan plain =
      compile(second.graph, {second.loss},
              SGDUpdate{.params = second.params, .grads = grad(second.loss, second.params)});
  EXPECT_TRUE(plain.velocities().empty());
  refused(plain, two.velocities(), "has 0 velocities (its SGDUpdate has no momentum), got 4");
}

TEST(SGDUpdate, RefusesBadUpdatesAndLearningRates) {
  Net net;
  build(net, 4, {6, 5, 3}, true);
  const auto grads = grad(net.loss, net.params);
  Value frozen = net.graph.parameter("frozen", Tensor::full({5, 3}, 1.0), false);
  Value other_shape = net.graph.parameter("other", Tensor::full({5}, 1.0));
  const auto refused = [&](SGDUpdate update, const std::string& fragment) {
    try {
      compile(net.graph, {net.loss}, std::move(update));
      ADD_FAILURE() << "no Error for " << fragment;
    } catch (const GraphError& e) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    }
  };
  refused({.params = net.params, .grads = {grads[0]}}, "has 4 parameters but 1 gradients");
  refused({.params = {net.x}, .grads = {net.x}}, "\"x\", an input");
  refused({.params = {frozen}, .grads = {net.params[2]}}, "a non-trainable parameter");
  refused({.params = {net.params[0], net.params[0]}, .grads = {grads[0], grads[0]}},
          "\"w1\" appears twice (positions 0 and 1)");
  refused({.params = {other_shape}, .grads = {grads[0]}},
          "is f32[6,5] but parameter \"other\" is f32[5]");
  refused({.params = {net.params[1], other_shape}, .grads = {other_shape, grads[1]}},
          "gradient 0 is parameter \"other\", which the update changes");
  refused({.params = net.params, .grads = grads, .weight_decay = -1},
          "weight decay -1 must be finite and >= 0");
  refused({.params = net.params,
           .grads = grads,
           .weight_decay = std::numeric_limits<double>::quiet_NaN()},
          "weight decay nan");
  refused({.params = net.params, .grads = grads, .momentum = 1.0}, "momentum 1 is outside [0, 1)");
  refused({.params = net.params, .grads = grads, .momentum = -0.5},
          "momentum -0.5 is outside [0, 1)");

  Plan plan = compile(net.graph, {net.loss}, SGDUpdate{.params = net.params, .grads = grads});
  const Batch batch = batch_for(net, 1);
  const auto bits = parameter_bits(net);
  for (double lr : {0.0, -0.1, std::numeric_limits<double>::infinity()}) {
    try {
      plan.run(feeds(net, batch), {.learning_rate = lr});
      ADD_FAILURE() << "no Error for learning rate " << lr;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("RunOptions::learning_rate must be finite and > 0"),
                std::string::npos)
          << e.what();
    }
  }
  EXPECT_EQ(parameter_bits(net), bits);  // nothing ran
  plan.run(feeds(net, batch), {.learning_rate = 0.1});
  EXPECT_NE(parameter_bits(net), bits);
}

TEST(SGDUpdate, CheckFiniteNamesTheParameterAnUpdateBroke) {
  // A learning rate of 1e300 (infinite in f32) sends the first weights to infinity or NaN:
  // check_finite names them, on the fused and on the unfused path.
  for (bool fuse : {true, false}) {
    Net net;
    build(net, 8, {12, 6, 4}, true);
    Plan plan = compile(net.graph, {net.loss},
                        SGDUpdate{.params = net.params, .grads = grad(net.loss, net.params)},
                        {.fuse = fuse, .check_finite = true});
    const Batch batch = batch_for(net, 2);
    plan.run(feeds(net, batch), {.learning_rate = 0.1});
    try {
      plan.run(feeds(net, batch), {.learning_rate = 1e300});
      ADD_FAILURE() << "no Error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("check_finite: parameter \"w"), std::string::npos)
          << e.what();
      EXPECT_NE(std::string(e.what()).find("after its SGD update"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace dagrad
