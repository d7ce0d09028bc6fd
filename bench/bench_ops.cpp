// Single ops through a compiled plan, at the shapes of the Fashion-MNIST models:
//   op_forward/<case>    the op alone
//   op_backward/<case>   the op and the gradient of sum(op(x) ⊙ c) with respect to x (and its
//                        parameters): forward, the op's backward and the few steps of the sum
// Counters: GB/s = bytes of the op's input and output per second of forward (a floor for a
// memory-bound op: what it must read and write once), steps = plan steps.
// Threads: DAGRAD_THREADS (unset or 0 = all cores).
//   ./build/bench/bench_ops [--benchmark_filter=relu]
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "dagrad.hpp"

namespace {

using namespace dagrad;

Tensor filled_tensor(Shape shape, double low, double high) {
  Tensor t(std::move(shape), DType::f32);
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    t.set(i, low + (high - low) * static_cast<double>((i * 7919) % 997) / 997.0);
  }
  return t;
}

struct OpCase {
  std::string name;
  Shape x;
  // Builds the op on input x; parameters it needs are created in the graph.
  std::function<Value(Graph&, const Value&)> build;
};

Value channel_parameter(Graph& g, const std::string& name, std::int64_t size, double value) {
  return g.parameter(name, Tensor::full({size}, value));
}

// batch_norm over `channels` channels, γ = 1, β = 0, running statistics 0 and 1.
std::function<Value(Graph&, const Value&)> batch_norm_case(std::int64_t channels) {
  return [channels](Graph& g, const Value& x) {
    return batch_norm(x, channel_parameter(g, "gamma", channels, 1.0),
                      channel_parameter(g, "beta", channels, 0.0),
                      g.parameter("mean", Tensor::full({channels}, 0.0), false),
                      g.parameter("var", Tensor::full({channels}, 1.0), false));
  };
}

std::vector<OpCase> op_cases() {
  const Shape dense{128, 1024}, image{64, 32, 28, 28};
  return {
      {"relu/128x1024", dense, [](Graph&, const Value& x) { return relu(x); }},
      {"sigmoid/128x1024", dense, [](Graph&, const Value& x) { return sigmoid(x); }},
      {"gelu/128x1024", dense, [](Graph&, const Value& x) { return gelu(x); }},
      {"add_bias/128x1024", dense,
       [](Graph& g, const Value& x) { return x + channel_parameter(g, "b", 1024, 0.5); }},
      {"log_softmax/128x1024", dense, [](Graph&, const Value& x) { return log_softmax(x); }},
      {"layer_norm/128x1024", dense,
       [](Graph& g, const Value& x) {
         return layer_norm(x, channel_parameter(g, "gamma", 1024, 1.0),
                           channel_parameter(g, "beta", 1024, 0.0));
       }},
      {"relu/64x32x28x28", image, [](Graph&, const Value& x) { return relu(x); }},
      {"max_pool2d/64x32x28x28", image,
       [](Graph&, const Value& x) {
         return max_pool2d(x, {2, 2}, {2, 2});
       }},
      {"batch_norm/64x32x28x28", image, batch_norm_case(32)},
      // The CNN's two batch-norm layers at batch 128 (after conv1 and conv2).
      {"batch_norm/128x32x28x28", Shape{128, 32, 28, 28}, batch_norm_case(32)},
      {"batch_norm/128x64x14x14", Shape{128, 64, 14, 14}, batch_norm_case(64)},
      // The CNN's second batch-norm layer at batch 64, and a dense layer's [N, C].
      {"batch_norm/64x64x14x14", Shape{64, 64, 14, 14}, batch_norm_case(64)},
      {"batch_norm/128x1024", dense, batch_norm_case(1024)},
  };
}

void run_op(benchmark::State& state, const OpCase& c, bool backward) {
  const char* threads = std::getenv("DAGRAD_THREADS");
  set_num_threads(threads == nullptr ? 0 : std::atoi(threads));
  Graph g;
  Value x = g.input("x", c.x);
  Value y = c.build(g, x);
  std::vector<Value> outputs{y};
  if (backward) {
    Value loss = sum(y * g.constant(filled_tensor(y.shape(), -1.0, 1.0)));
    outputs = {loss, grad(loss, {x})[0]};
  }
  Plan plan = compile(g, outputs);
  const Feeds feeds{{x, filled_tensor(c.x, -2.0, 2.0)}};
  const RunOptions options{.training = true};
  plan.run(feeds, options);
  for (auto _ : state) benchmark::DoNotOptimize(plan.run(feeds, options));
  const double bytes = static_cast<double>(x.desc().bytes() + y.desc().bytes());
  state.counters["GB/s"] =
      benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["steps"] = static_cast<double>(plan.num_steps());
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  static const std::vector<OpCase> cases = op_cases();
  for (const OpCase& c : cases) {
    benchmark::RegisterBenchmark(("op_forward/" + c.name).c_str(),
                                 [&c](benchmark::State& state) { run_op(state, c, false); })
        ->Unit(benchmark::kMicrosecond)
        ->UseRealTime();
    benchmark::RegisterBenchmark(("op_backward/" + c.name).c_str(),
                                 [&c](benchmark::State& state) { run_op(state, c, true); })
        ->Unit(benchmark::kMicrosecond)
        ->UseRealTime();
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
