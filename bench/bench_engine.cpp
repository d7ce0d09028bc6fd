// Engine figures: per-op dispatch overhead of a compiled plan on tiny tensors, matmul GFLOP/s
// through a plan against a raw oneDNN matmul primitive of the same shape, a dense layer's
// weight gradient at a small batch (dagrad's kernel against oneDNN's), the sparse cross-entropy
// loss fused and unfused, and the optimiser step.
//   ./build/bench/bench_engine --benchmark_filter=. [--benchmark_format=json]
#include <benchmark/benchmark.h>

#include <oneapi/dnnl/dnnl.hpp>
#include <optional>

#include "dagrad.hpp"

using namespace dagrad;

namespace {

Tensor filled_tensor(Shape shape, double scale) {
  Tensor t(std::move(shape), DType::f32);
  for (std::int64_t i = 0; i < t.numel(); ++i)
    t.set(i, scale * static_cast<double>((i * 7919) % 97) / 97.0 - scale / 2);
  return t;
}

// Tiny graph: forward 4 ops (matmul, add, tanh, sum) and their backward, on 8×8 tensors.
void tiny_graph_forward_backward(benchmark::State& state) {
  set_num_threads(static_cast<int>(state.range(0)));
  Graph g;
  Value x = g.input("x", {8, 8});
  Value w = g.parameter("w", filled_tensor({8, 8}, 1.0));
  Value b = g.parameter("b", filled_tensor({8}, 1.0));
  Value loss = sum(tanh(matmul(x, w) + b));
  auto grads = grad(loss, {w, b});
  Plan plan = compile(g, {loss, grads[0], grads[1]});
  Tensor xs = filled_tensor({8, 8}, 1.0);
  Feeds feeds{{x, xs}};
  plan.run(feeds);
  for (auto _ : state) benchmark::DoNotOptimize(plan.run(feeds));
  const double steps = static_cast<double>(plan.num_steps());
  state.counters["ops"] = steps;
  // Seconds per executed op (printed with an SI prefix, e.g. 900n = 0.9 µs).
  state.counters["time_per_op"] =
      benchmark::Counter(steps * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}
BENCHMARK(tiny_graph_forward_backward)
    ->Arg(1)
    ->Arg(2)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

void matmul_plan(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  set_num_threads(static_cast<int>(state.range(1)));
  Graph g;
  Value a = g.input("a", {n, n});
  Value b = g.input("b", {n, n});
  Plan plan = compile(g, {matmul(a, b)});
  Feeds feeds{{a, filled_tensor({n, n}, 1.0)}, {b, filled_tensor({n, n}, 1.0)}};
  plan.run(feeds);
  for (auto _ : state) benchmark::DoNotOptimize(plan.run(feeds));
  state.counters["GFLOPs"] = benchmark::Counter(
      2.0 * n * n * n * static_cast<double>(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}
BENCHMARK(matmul_plan)
    ->Args({512, 1})
    ->Args({512, 2})
    ->Args({2048, 1})
    ->Args({2048, 2})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Runs `primitive` once, then once per benchmark iteration, waiting for each run.
void time_primitive(benchmark::State& state, dnnl::engine& engine, const dnnl::primitive& primitive,
                    const std::unordered_map<int, dnnl::memory>& args) {
  dnnl::stream stream(engine);
  primitive.execute(stream, args);
  stream.wait();
  for (auto _ : state) {
    primitive.execute(stream, args);
    stream.wait();
  }
}

void matmul_raw_onednn(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  set_num_threads(static_cast<int>(state.range(1)));
  dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  dnnl::memory::desc md({n, n}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::ab);
  Tensor a = filled_tensor({n, n}, 1.0), b = filled_tensor({n, n}, 1.0), c({n, n}, DType::f32);
  dnnl::memory a_mem(md, engine, a.raw()), b_mem(md, engine, b.raw()), c_mem(md, engine, c.raw());
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(md, md, md), engine);
  time_primitive(state, engine, dnnl::matmul(pd),
                 {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, c_mem}});
  state.counters["GFLOPs"] = benchmark::Counter(
      2.0 * n * n * n * static_cast<double>(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
}
BENCHMARK(matmul_raw_onednn)
    ->Args({512, 1})
    ->Args({512, 2})
    ->Args({2048, 1})
    ->Args({2048, 2})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// A dense layer's weight and bias gradients at a small batch: dW = xᵀ dy [m, n] and
// db = sum(dy, {0}) for x [k, m], dy [k, n]. own = 1: a plan, whose fusion runs both in one
// step of dagrad's kernel (ops/small_gemm.hpp, used for k <= 128); own = 0: oneDNN's matmul
// primitive reading x through swapped strides (what the plan ran before), dW alone.
// Shapes: the MLP's three layers at batches 32 and 128.
void weight_gradient(benchmark::State& state) {
  const std::int64_t m = state.range(0), k = state.range(1), n = state.range(2);
  const bool own = state.range(3) != 0;
  set_num_threads(2);
  const Tensor x = filled_tensor({k, m}, 1.0), dy = filled_tensor({k, n}, 1.0);
  if (own) {
    Graph g;
    Value xv = g.input("x", {k, m});
    Value dyv = g.input("dy", {k, n});
    Plan plan = compile(g, {matmul(transpose(xv), dyv), sum(dyv, {0})});
    const Feeds feeds{{xv, x}, {dyv, dy}};
    plan.run(feeds);
    for (auto _ : state) benchmark::DoNotOptimize(plan.run(feeds));
    const auto patterns = plan.fused_patterns();
    state.SetLabel(patterns.empty() ? "" : patterns.front());
  } else {
    dnnl::engine engine(dnnl::engine::kind::cpu, 0);
    using dt = dnnl::memory::data_type;
    dnnl::memory::desc a_md({m, k}, dt::f32, dnnl::memory::dims{1, m});
    dnnl::memory::desc b_md({k, n}, dt::f32, dnnl::memory::format_tag::ab);
    dnnl::memory::desc c_md({m, n}, dt::f32, dnnl::memory::format_tag::ab);
    Tensor c({m, n}, DType::f32);
    dnnl::memory a_mem(a_md, engine, const_cast<void*>(x.raw()));
    dnnl::memory b_mem(b_md, engine, const_cast<void*>(dy.raw())), c_mem(c_md, engine, c.raw());
    time_primitive(
        state, engine,
        dnnl::matmul(dnnl::matmul::primitive_desc(dnnl::matmul::desc(a_md, b_md, c_md), engine)),
        {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, c_mem}});
    state.SetLabel("oneDNN matmul");
  }
  state.counters["GFLOPs"] = benchmark::Counter(2.0 * static_cast<double>(m * k * n) * 1e-9,
                                                benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(weight_gradient)
    ->ArgsProduct({{784}, {32, 128, 512}, {256}, {0, 1}})
    ->ArgsProduct({{256}, {32, 128, 512}, {128}, {0, 1}})
    ->ArgsProduct({{128}, {32, 128, 512}, {10}, {0, 1}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

// A dense layer's weight and bias gradients followed by an SGD update of W [m, n] and b [n] from
// x [k, m] and dy [k, n]. Mode: 0 the plan returning dW and db, then nn::SGD::step; 1 the plan's
// SGDUpdate (fused into the weight-gradient kernel); 2 and 3 the same with momentum 0.9
// (nn::Momentum against SGDUpdate{.momentum = 0.9}). The plans also output the column sums of x
// (a cheap value that does not read dW): a plan needs one.
void weight_update(benchmark::State& state) {
  const std::int64_t m = state.range(0), k = state.range(1), n = state.range(2);
  const std::int64_t mode = state.range(3);
  const bool in_plan = mode % 2 == 1;
  const double momentum = mode >= 2 ? 0.9 : 0.0;
  set_num_threads(2);
  Graph g;
  Value xv = g.input("x", {k, m});
  Value dyv = g.input("dy", {k, n});
  Value w = g.parameter("w", filled_tensor({m, n}, 0.1));
  Value b = g.parameter("b", filled_tensor({n}, 0.1));
  const std::vector<Value> grads{matmul(transpose(xv), dyv), sum(dyv, {0})};
  Value other = sum(xv, {0});
  const Feeds feeds{{xv, filled_tensor({k, m}, 1e-3)}, {dyv, filled_tensor({k, n}, 1e-3)}};
  std::vector<Tensor> params{g.value_of(w), g.value_of(b)};
  std::unique_ptr<Optimizer> optimizer;
  if (momentum > 0) {
    optimizer = std::make_unique<Momentum>(MomentumOptions{.learning_rate = 1e-3});
  } else {
    optimizer = std::make_unique<SGD>(SGDOptions{.learning_rate = 1e-3});
  }
  std::optional<Plan> plan;
  if (in_plan) {
    plan.emplace(
        compile(g, {other}, SGDUpdate{.params = {w, b}, .grads = grads, .momentum = momentum}));
  } else {
    plan.emplace(compile(g, {other, grads[0], grads[1]}));
  }
  const RunOptions options{.learning_rate = 1e-3};
  auto step = [&] {
    const auto& out = plan->run(feeds, options);
    if (!in_plan) optimizer->step(params, std::span<const Tensor>(out).subspan(1));
  };
  step();
  for (auto _ : state) step();
  state.counters["GFLOPs"] = benchmark::Counter(2.0 * static_cast<double>(m * k * n) * 1e-9,
                                                benchmark::Counter::kIsIterationInvariantRate);
  const auto patterns = plan->fused_patterns();
  state.SetLabel(patterns.empty() ? "" : patterns.back());
}
BENCHMARK(weight_update)
    ->ArgsProduct({{784}, {32, 128, 512}, {256}, {0, 1, 2, 3}})
    ->ArgsProduct({{256}, {32, 128}, {128}, {0, 1, 2, 3}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

// The mean sparse cross-entropy of logits [rows, classes] and its gradient, through a plan:
// fused (two steps of dagrad's kernels, ops/cross_entropy_kernels.hpp) against unfused (nine
// steps, oneDNN and reference kernels). Default threads; the plan runs small steps on one.
void cross_entropy(benchmark::State& state) {
  const std::int64_t rows = state.range(0), classes = state.range(1);
  const bool fuse = state.range(2) != 0;
  Graph g;
  Value z = g.input("z", {rows, classes});
  Value labels = g.input("labels", {rows}, DType::i32);
  Value loss = sparse_cross_entropy(z, labels);
  Plan plan = compile(g, {loss, grad(loss, {z})[0]}, {.fuse = fuse});
  Tensor label_values({rows}, DType::i32);
  auto span = label_values.span<std::int32_t>();
  for (std::int64_t i = 0; i < rows; ++i) span[i] = static_cast<std::int32_t>(i % classes);
  const Feeds feeds{{z, filled_tensor({rows, classes}, 0.5)}, {labels, label_values}};
  plan.run(feeds);
  for (auto _ : state) benchmark::DoNotOptimize(plan.run(feeds));
  state.SetItemsProcessed(state.iterations() * rows);
  state.SetLabel(fmt::format("{} steps", plan.num_steps()));
}
BENCHMARK(cross_entropy)
    ->ArgsProduct({{32, 128, 512}, {10}, {0, 1}})
    ->ArgsProduct({{256}, {1000}, {0, 1}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

// One optimiser step over the parameters of an MLP 784-256-128-10 (235,146 f32 values), the
// update each training step ends with: threads, then the optimiser (0 SGD, 1 momentum, 2 Adam,
// 3 RMSProp). items_per_second counts parameter values updated.
void optimizer_step(benchmark::State& state) {
  set_num_threads(static_cast<int>(state.range(0)));
  std::vector<Tensor> params, grads;
  std::int64_t values = 0;
  for (const Shape& shape :
       std::vector<Shape>{{784, 256}, {256}, {256, 128}, {128}, {128, 10}, {10}}) {
    params.push_back(filled_tensor(shape, 0.1));
    grads.push_back(filled_tensor(shape, 0.01));
    values += shape.numel();
  }
  std::unique_ptr<Optimizer> optimizer;
  switch (state.range(1)) {
    case 0:
      optimizer = std::make_unique<SGD>(SGDOptions{.learning_rate = 1e-3});
      break;
    case 1:
      optimizer = std::make_unique<Momentum>(MomentumOptions{.learning_rate = 1e-3});
      break;
    case 2:
      optimizer = std::make_unique<Adam>(AdamOptions{.learning_rate = 1e-3});
      break;
    default:
      optimizer = std::make_unique<RMSProp>(RMSPropOptions{.learning_rate = 1e-3});
      break;
  }
  optimizer->step(params, grads);  // creates the state
  for (auto _ : state) {
    optimizer->step(params, grads);
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * values);
  state.SetLabel(optimizer->name());
}
BENCHMARK(optimizer_step)
    ->ArgsProduct({{1, 2}, {0, 1, 2, 3}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

// Gradient clipping by global norm over the gradients of an MLP 784-256-128-10 (235,146 f32
// values), the Trainer's step with clip_norm: threads, then 0 for global_norm alone, 1 for
// clip_grad_norm scaling every step (the threshold just under the norm each time).
void gradient_clipping(benchmark::State& state) {
  set_num_threads(static_cast<int>(state.range(0)));
  std::vector<Tensor> grads;
  std::int64_t values = 0;
  for (const Shape& shape :
       std::vector<Shape>{{784, 256}, {256}, {256, 128}, {128}, {128, 10}, {10}}) {
    grads.push_back(filled_tensor(shape, 0.01));
    values += shape.numel();
  }
  double threshold = global_norm(grads);
  for (auto _ : state) {
    if (state.range(1) == 0) {
      benchmark::DoNotOptimize(global_norm(grads));
    } else {
      threshold *= 0.999999;
      benchmark::DoNotOptimize(clip_grad_norm(grads, threshold));
    }
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * values);
}
BENCHMARK(gradient_clipping)
    ->ArgsProduct({{1, 2}, {0, 1}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

void compile_time_mlp(benchmark::State& state) {
  for (auto _ : state) {
    Graph g;
    Value x = g.input("x", {128, 784});
    Value w1 = g.parameter("w1", filled_tensor({784, 256}, 0.1));
    Value w2 = g.parameter("w2", filled_tensor({256, 10}, 0.1));
    Value loss = mean(tanh(matmul(relu(matmul(x, w1)), w2)));
    auto grads = grad(loss, {w1, w2});
    Plan plan = compile(g, {loss, grads[0], grads[1]});
    benchmark::DoNotOptimize(plan.planned_peak_bytes());
  }
}
BENCHMARK(compile_time_mlp)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
