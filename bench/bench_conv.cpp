// Convolution and pooling through dagrad against raw oneDNN.
//   BM_Conv2dForward/N        dagrad plan: conv2d + bias, f32, [N,32,28,28] * [64,32,3,3], pad 1
//   BM_Conv2dTrainingStep/N   the same conv with relu, 2x2 max pool and sum, forward and the
//                             gradients of x, w and b
//   BM_MaxPool2dBackward/N    dagrad plan: max_pool2d_backward, 2x2 stride 2, [N,32,28,28]
//                             (the CNN's first pooling layer)
//   BM_FirstLayerWeightsGradient/N  dagrad plan: conv2d_backward_weights of [N,1,28,28] by 32
//                             5x5 filters, pad 2 (the CNN's first convolution)
//   BM_PooledWeightsGradient/pooled  the weights and bias gradients of conv -> relu -> 2x2 max
//                             pool (the CNN's second layer: [64,32,14,14] by 64 5x5 filters, pad
//                             2) from the pooling's gradient dp: pooled = 1 the plan's fused step
//                             that skips dy's zeros; pooled = 0 the same graph with dy also
//                             requested, so the plan builds dy (max_pool2d_backward+relu_grad) and
//                             runs oneDNN's weights gradient and the bias sum on it
//   BM_RawOneDnnConv/N/any    raw oneDNN primitive; any = 1: layouts chosen by oneDNN (data
//                             reordered once, outside the timing), any = 0: plain NCHW/OIHW
// Counters: GFLOP/s of the convolution (2·N·O·OH·OW·C·KH·KW per forward).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <random>

#include "dagrad.hpp"

namespace {

using namespace dagrad;

constexpr std::int64_t channels = 32, filters = 64, size = 28, kernel = 3;

Tensor random_tensor(Shape shape, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  std::vector<double> values(static_cast<std::size_t>(shape.numel()));
  for (auto& v : values) v = dist(rng);
  return Tensor::from(values, std::move(shape), DType::f32);
}

double conv_flops(std::int64_t batch) {
  return 2.0 * static_cast<double>(batch * filters * size * size * channels * kernel * kernel);
}

void BM_Conv2dForward(benchmark::State& state) {
  const std::int64_t batch = state.range(0);
  Graph g;
  Value x = g.input("x", {batch, channels, size, size});
  Value w = g.input("w", {filters, channels, kernel, kernel});
  Value b = g.input("b", {filters});
  Value y = conv2d(x, w, b, {.padding = {1, 1}});
  Plan plan = compile(g, {y});
  Feeds feeds{{x, random_tensor(x.shape(), 1)},
              {w, random_tensor(w.shape(), 2)},
              {b, random_tensor(b.shape(), 3)}};
  for (auto _ : state) benchmark::DoNotOptimize(plan.run(feeds));
  state.counters["GFLOP/s"] =
      benchmark::Counter(conv_flops(batch) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Conv2dTrainingStep(benchmark::State& state) {
  const std::int64_t batch = state.range(0);
  Graph g;
  Value x = g.input("x", {batch, channels, size, size});
  Value w = g.input("w", {filters, channels, kernel, kernel});
  Value b = g.input("b", {filters});
  Value loss = sum(max_pool2d(relu(conv2d(x, w, b, {.padding = {1, 1}})), {2, 2}, {2, 2}));
  std::vector<Value> outputs = grad(loss, {x, w, b});
  outputs.push_back(loss);
  Plan plan = compile(g, outputs);
  Feeds feeds{{x, random_tensor(x.shape(), 1)},
              {w, random_tensor(w.shape(), 2)},
              {b, random_tensor(b.shape(), 3)}};
  for (auto _ : state) benchmark::DoNotOptimize(plan.run(feeds, {.training = true}));
  // forward + backward data + backward weights: three convolutions' worth of work.
  state.counters["GFLOP/s"] = benchmark::Counter(3 * conv_flops(batch) * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

void BM_MaxPool2dBackward(benchmark::State& state) {
  const std::int64_t batch = state.range(0);
  Graph g;
  Value x = g.input("x", {batch, 32, 28, 28});
  Value dy = g.input("dy", {batch, 32, 14, 14});
  Value dx = max_pool2d_backward(dy, x, {2, 2}, {2, 2});
  Plan plan = compile(g, {dx});
  Feeds feeds{{x, random_tensor(x.shape(), 1)}, {dy, random_tensor(dy.shape(), 2)}};
  for (auto _ : state) benchmark::DoNotOptimize(plan.run(feeds));
  // x and dx once each, dy once.
  state.counters["GB/s"] = benchmark::Counter(
      static_cast<double>(4 * (2 * x.shape().numel() + dy.shape().numel())) * 1e-9,
      benchmark::Counter::kIsIterationInvariantRate);
}

void BM_FirstLayerWeightsGradient(benchmark::State& state) {
  const std::int64_t batch = state.range(0);
  Graph g;
  Value x = g.input("x", {batch, 1, 28, 28});
  Value dy = g.input("dy", {batch, 32, 28, 28});
  Value dw = conv2d_backward_weights(x, dy, {5, 5}, {.padding = {2, 2}});
  Plan plan = compile(g, {dw});
  Feeds feeds{{x, random_tensor(x.shape(), 1)}, {dy, random_tensor(dy.shape(), 2)}};
  for (auto _ : state) benchmark::DoNotOptimize(plan.run(feeds));
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * static_cast<double>(batch * 32 * 28 * 28 * 25) * 1e-9,
                         benchmark::Counter::kIsIterationInvariantRate);
}

void BM_PooledWeightsGradient(benchmark::State& state) {
  const bool pooled = state.range(0) != 0;
  const std::int64_t batch = 64, in = 32, out = 64, side = 14;
  Graph g;
  Value x = g.input("x", {batch, in, side, side});
  Value r = g.input("r", {batch, out, side, side});  // the convolution's relu output
  Value dp = g.input("dp", {batch, out, side / 2, side / 2});
  Value dy = relu_grad(max_pool2d_backward(dp, r, {2, 2}, {2, 2}), r);
  Value dw = conv2d_backward_weights(x, dy, {5, 5}, {.padding = {2, 2}});
  Value db = sum(dy, {0, 2, 3});
  std::vector<Value> outputs{dw, db};
  if (!pooled) outputs.push_back(dy);
  Plan plan = compile(g, outputs);
  // r = relu(u), u uniform in [-1.5, 0.5): ~68 % of the windows have a positive maximum (55 %
  // in bench_train's CNN).
  Tensor r_value = random_tensor(r.shape(), 2);
  for (std::int64_t i = 0; i < r_value.numel(); ++i) {
    r_value.set(i, std::max(0.0, r_value.at(i) - 0.5));
  }
  Feeds feeds{{x, random_tensor(x.shape(), 1)}, {r, r_value}, {dp, random_tensor(dp.shape(), 3)}};
  for (auto _ : state) benchmark::DoNotOptimize(plan.run(feeds));
  const auto patterns = plan.fused_patterns();
  state.SetLabel(patterns.empty() ? "" : patterns.front());
  // The dense weights gradient's count, also for the pooled kernel (which does less).
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * static_cast<double>(batch * out * side * side * in * 25) * 1e-9,
                         benchmark::Counter::kIsIterationInvariantRate);
}

void BM_RawOneDnnConv(benchmark::State& state) {
  using tag = dnnl::memory::format_tag;
  using dt = dnnl::memory::data_type;
  const std::int64_t batch = state.range(0);
  const bool any = state.range(1) != 0;
  dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  dnnl::stream stream(engine);
  dnnl::memory::desc src_md({batch, channels, size, size}, dt::f32, any ? tag::any : tag::nchw);
  dnnl::memory::desc weights_md({filters, channels, kernel, kernel}, dt::f32,
                                any ? tag::any : tag::oihw);
  dnnl::memory::desc bias_md({filters}, dt::f32, tag::x);
  dnnl::memory::desc dst_md({batch, filters, size, size}, dt::f32, any ? tag::any : tag::nchw);
  dnnl::convolution_forward::primitive_desc pd(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference,
                                      dnnl::algorithm::convolution_direct, src_md, weights_md,
                                      bias_md, dst_md, {1, 1}, {1, 1}, {1, 1}),
      engine);
  dnnl::convolution_forward conv(pd);
  dnnl::memory src(pd.src_desc(), engine), weights(pd.weights_desc(), engine),
      bias(pd.bias_desc(), engine), dst(pd.dst_desc(), engine);
  for (auto* m : {&src, &weights, &bias}) {
    auto* p = static_cast<float*>(m->get_data_handle());
    const std::size_t n = m->get_desc().get_size() / sizeof(float);
    for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<float>(i % 7) * 0.1f - 0.3f;
  }
  for (auto _ : state) {
    conv.execute(stream, {{DNNL_ARG_SRC, src},
                          {DNNL_ARG_WEIGHTS, weights},
                          {DNNL_ARG_BIAS, bias},
                          {DNNL_ARG_DST, dst}});
    stream.wait();
  }
  state.SetLabel(pd.impl_info_str());
  state.counters["GFLOP/s"] =
      benchmark::Counter(conv_flops(batch) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

BENCHMARK(BM_Conv2dForward)->Arg(1)->Arg(16)->Arg(64)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Conv2dTrainingStep)->Arg(16)->Arg(64)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_MaxPool2dBackward)->Arg(128)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_FirstLayerWeightsGradient)->Arg(128)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_PooledWeightsGradient)
    ->ArgName("pooled")
    ->Arg(0)
    ->Arg(1)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_RawOneDnnConv)
    ->Args({1, 0})
    ->Args({1, 1})
    ->Args({16, 0})
    ->Args({16, 1})
    ->Args({64, 0})
    ->Args({64, 1})
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
