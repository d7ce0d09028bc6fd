// Training-step throughput of the Fashion-MNIST models, built directly from ops:
//   mlp_train_step/<batch>              784-256-128-10 with biases and ReLU
//   cnn_train_step/<batch>              conv5x5x32(pad 2)-relu-maxpool2-conv5x5x64(pad 2)-relu-
//                                       maxpool2-flatten-dense1024-relu-dense10
//   cnn_bn_train_step/<batch>           the CNN with batch_norm (training mode, trainable γ and β,
//                                       running statistics updated) after each convolution,
//                                       before its relu
//   mlp_train_step_threads/<batch>/<t>  the MLP step with t threads (ignores DAGRAD_THREADS)
//   mlp_train_step_optimizer/<batch>    the MLP step with the update as a separate nn::SGD step
//   trainer_epoch/<batch>/<opt>/<plan>  one epoch of Trainer::fit on the `mlp` preset (100
//                                       batches; opt 0 SGD, 1 momentum, 2 Adam; plan 1: the
//                                       update inside the plan)
// One iteration = plan.run: forward + backward (loss sparse_cross_entropy) + a plain SGD update
// (lr 0.01) of every parameter, run by the plan itself (SGDUpdate, runtime/plan.hpp). The
// *_optimizer variant runs the same update as most frameworks do, after the run, with
// nn::SGD::step on the gradients the plan returned.
//
// Figures: items_per_second = samples/s; GFLOPs = analytic matmul/conv FLOPs per second
// (forward 2·m·k·n per matmul, backward twice that; convolutions likewise; batch norm, like relu
// and pooling, is not counted); allocs_per_step =
// calls of the global operator new inside the timed loop, per step (after a warm-up);
// peak_bytes = the plan's planned arena + parameter bytes; measured_peak_bytes = how far the
// process's peak resident memory (VmHWM) rose while the model was built and trained (see
// bench/README.md).
// Threads: DAGRAD_THREADS (0 or unset = all cores).
//   ./build/bench/bench_train [--benchmark_filter=mlp] [--benchmark_repetitions=5]
#include <benchmark/benchmark.h>
#include <fmt/format.h>
#include <malloc.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <new>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "dagrad.hpp"
#include "nn/init.hpp"
#include "nn/optimizer.hpp"

// Allocation counting: the replaced global operator new forwards to malloc and counts calls
// while `counting` is set (from any thread). Allocations oneDNN makes with malloc directly
// are not seen.
namespace {
std::atomic<bool> counting{false};
std::atomic<std::uint64_t> allocations{0};

void* counted_alloc(std::size_t size) {
  if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(size == 0 ? 1 : size);
}
void* counted_aligned_alloc(std::size_t size, std::align_val_t alignment) {
  if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
  void* p = nullptr;
  const auto align = std::max(static_cast<std::size_t>(alignment), sizeof(void*));
  if (posix_memalign(&p, align, size == 0 ? 1 : size) != 0) return nullptr;
  return p;
}
// Not inlined: GCC would otherwise see free() of an operator-new pointer at each inlined
// delete and warn (-Wmismatched-new-delete), although new is malloc here.
[[gnu::noinline]] void counted_free(void* p) noexcept {
  std::free(p);
}
}  // namespace

void* operator new(std::size_t size) {
  if (void* p = counted_alloc(size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) {
  if (void* p = counted_alloc(size)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  return counted_alloc(size);
}
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
  return counted_alloc(size);
}
void* operator new(std::size_t size, std::align_val_t alignment) {
  if (void* p = counted_aligned_alloc(size, alignment)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size, std::align_val_t alignment) {
  if (void* p = counted_aligned_alloc(size, alignment)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t size, std::align_val_t alignment, const std::nothrow_t&) noexcept {
  return counted_aligned_alloc(size, alignment);
}
void* operator new[](std::size_t size, std::align_val_t alignment, const std::nothrow_t&) noexcept {
  return counted_aligned_alloc(size, alignment);
}
void operator delete(void* p) noexcept {
  counted_free(p);
}
void operator delete[](void* p) noexcept {
  counted_free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  counted_free(p);
}
void operator delete[](void* p, std::size_t) noexcept {
  counted_free(p);
}
void operator delete(void* p, const std::nothrow_t&) noexcept {
  counted_free(p);
}
void operator delete[](void* p, const std::nothrow_t&) noexcept {
  counted_free(p);
}
void operator delete(void* p, std::align_val_t) noexcept {
  counted_free(p);
}
void operator delete[](void* p, std::align_val_t) noexcept {
  counted_free(p);
}
void operator delete(void* p, std::size_t, std::align_val_t) noexcept {
  counted_free(p);
}
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept {
  counted_free(p);
}
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept {
  counted_free(p);
}
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept {
  counted_free(p);
}

namespace {

using namespace dagrad;

constexpr int warmup_steps = 3;
constexpr double learning_rate = 0.01;
constexpr std::int64_t classes = 10;

// DAGRAD_THREADS: threads for oneDNN and dagrad's loops; unset or 0 = all cores.
int threads_from_env() {
  const char* text = std::getenv("DAGRAD_THREADS");
  return text == nullptr ? 0 : std::atoi(text);
}

// DAGRAD_SINGLE_THREAD_BELOW=<bytes>: CompileOptions::single_thread_below_bytes (0: every step
// uses all threads).
// DAGRAD_PROFILE=1: compile with CompileOptions::profile and print the plan's per-step times
// to stderr after each benchmark (profiling waits after every step, so throughput drops).
bool profile_from_env() {
  const char* text = std::getenv("DAGRAD_PROFILE");
  return text != nullptr && std::atoi(text) != 0;
}

// Resident memory of this process from /proc/self/status ("VmRSS:", "VmHWM:"), in bytes; 0
// where the file is missing. Writing "5" to /proc/self/clear_refs resets VmHWM (the peak) to
// the current resident size (Linux 4.0+).
std::size_t status_bytes(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(field, 0) == 0) return std::stoull(line.substr(field.size())) * 1024;
  }
  return 0;
}
// Returns the heap's free pages to the system first (memory freed by an earlier run of the
// benchmark would otherwise be reused without raising the resident size).
void reset_peak_rss() {
  malloc_trim(0);
  std::ofstream("/proc/self/clear_refs") << "5";
}

// A model as a graph: its inputs, parameters, loss, and the analytic FLOPs of one step.
struct TrainGraph {
  Graph graph;
  Value x, labels, loss;
  std::vector<Value> params;
  double flops_per_step = 0;
};

Value dense(TrainGraph& m, const Value& x, std::int64_t in, std::int64_t out, std::int64_t batch,
            const std::string& name, std::uint64_t seed) {
  Value w = m.graph.parameter(name + ".w", init::he_uniform({in, out}, seed));
  Value b = m.graph.parameter(name + ".b", init::zeros({out}));
  m.params.push_back(w);
  m.params.push_back(b);
  // forward 2·batch·in·out; backward dW and (unless x is the fed input, which needs no
  // gradient) dX, each as much again.
  const double passes = x == m.x ? 2.0 : 3.0;
  m.flops_per_step += passes * 2.0 * static_cast<double>(batch * in * out);
  return matmul(x, w) + b;
}

Value conv_same5x5(TrainGraph& m, const Value& x, std::int64_t in_channels, std::int64_t filters,
                   std::int64_t batch, std::int64_t size, const std::string& name,
                   std::uint64_t seed) {
  Value w = m.graph.parameter(name + ".w", init::he_uniform({filters, in_channels, 5, 5}, seed));
  Value b = m.graph.parameter(name + ".b", init::zeros({filters}));
  m.params.push_back(w);
  m.params.push_back(b);
  // forward 2·N·O·OH·OW·C·KH·KW; backward weights and (unless x is the fed input) backward
  // data, each as much again.
  const double passes = x == m.x ? 2.0 : 3.0;
  m.flops_per_step +=
      passes * 2.0 * static_cast<double>(batch * filters * size * size * in_channels * 5 * 5);
  return conv2d(x, w, b, {.padding = {2, 2}});
}

// batch_norm over the channels of x: trainable γ (ones) and β (zeros), running statistics as
// non-trainable parameters (updated in place by every training step).
Value batch_norm_layer(TrainGraph& m, const Value& x, std::int64_t channels,
                       const std::string& name) {
  Value gamma = m.graph.parameter(name + ".gamma", Tensor::full({channels}, 1.0));
  Value beta = m.graph.parameter(name + ".beta", init::zeros({channels}));
  m.params.push_back(gamma);
  m.params.push_back(beta);
  Value running_mean = m.graph.parameter(name + ".running_mean", init::zeros({channels}), false);
  Value running_var =
      m.graph.parameter(name + ".running_var", Tensor::full({channels}, 1.0), false);
  return batch_norm(x, gamma, beta, running_mean, running_var);
}

void build_mlp(TrainGraph& m, std::int64_t batch) {
  m.x = m.graph.input("x", {batch, 784});
  m.labels = m.graph.input("labels", {batch}, DType::i32);
  Value h = relu(dense(m, m.x, 784, 256, batch, "fc1", 1));
  h = relu(dense(m, h, 256, 128, batch, "fc2", 2));
  m.loss = sparse_cross_entropy(dense(m, h, 128, classes, batch, "fc3", 3), m.labels);
}

void build_cnn(TrainGraph& m, std::int64_t batch) {
  m.x = m.graph.input("x", {batch, 1, 28, 28});
  m.labels = m.graph.input("labels", {batch}, DType::i32);
  Value h = relu(conv_same5x5(m, m.x, 1, 32, batch, 28, "conv1", 1));
  h = max_pool2d(h, {2, 2}, {2, 2});  // 14x14
  h = relu(conv_same5x5(m, h, 32, 64, batch, 14, "conv2", 2));
  h = flatten(max_pool2d(h, {2, 2}, {2, 2}));  // 64·7·7 = 3136
  h = relu(dense(m, h, 64 * 7 * 7, 1024, batch, "fc1", 3));
  m.loss = sparse_cross_entropy(dense(m, h, 1024, classes, batch, "fc2", 4), m.labels);
}

void build_cnn_bn(TrainGraph& m, std::int64_t batch) {
  m.x = m.graph.input("x", {batch, 1, 28, 28});
  m.labels = m.graph.input("labels", {batch}, DType::i32);
  Value h = conv_same5x5(m, m.x, 1, 32, batch, 28, "conv1", 1);
  h = relu(batch_norm_layer(m, h, 32, "bn1"));
  h = max_pool2d(h, {2, 2}, {2, 2});  // 14x14
  h = conv_same5x5(m, h, 32, 64, batch, 14, "conv2", 2);
  h = relu(batch_norm_layer(m, h, 64, "bn2"));
  h = flatten(max_pool2d(h, {2, 2}, {2, 2}));  // 64·7·7 = 3136
  h = relu(dense(m, h, 64 * 7 * 7, 1024, batch, "fc1", 3));
  m.loss = sparse_cross_entropy(dense(m, h, 1024, classes, batch, "fc2", 4), m.labels);
}

// Pixel-like inputs in [0, 1) and labels in [0, classes), fixed by the seed.
Feeds make_feeds(const TrainGraph& m, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> pixel(0.0, 1.0);
  std::uniform_int_distribution<std::int32_t> label(0, classes - 1);
  Tensor x(m.x.shape(), DType::f32);
  for (float& v : x.span<float>()) v = static_cast<float>(pixel(rng));
  Tensor labels(m.labels.shape(), DType::i32);
  for (std::int32_t& v : labels.span<std::int32_t>()) v = label(rng);
  return {{m.x, x}, {m.labels, labels}};
}

enum class Update { in_plan, optimizer };

void run_train_step(benchmark::State& state, void (*build)(TrainGraph&, std::int64_t), int threads,
                    Update update = Update::in_plan) {
  set_num_threads(threads);
  reset_peak_rss();
  const std::size_t rss_before = status_bytes("VmRSS:");
  const std::int64_t batch = state.range(0);
  TrainGraph m;
  build(m, batch);
  std::vector<Value> outputs{m.loss};
  const std::vector<Value> grads = grad(m.loss, m.params);
  if (update == Update::optimizer) outputs.insert(outputs.end(), grads.begin(), grads.end());
  const bool profile = profile_from_env();
  CompileOptions compile_options{.profile = profile};
  if (const char* text = std::getenv("DAGRAD_SINGLE_THREAD_BELOW")) {
    compile_options.single_thread_below_bytes = static_cast<std::size_t>(std::atoll(text));
  }
  Plan plan = update == Update::in_plan
                  ? compile(m.graph, outputs, SGDUpdate{.params = m.params, .grads = grads},
                            compile_options)
                  : compile(m.graph, outputs, compile_options);
  std::vector<Tensor> param_tensors;
  for (const Value& p : m.params) param_tensors.push_back(m.graph.value_of(p));  // shares storage
  SGD sgd({.learning_rate = learning_rate});
  const Feeds feeds = make_feeds(m, 42);
  const RunOptions options{.training = true, .learning_rate = learning_rate};

  auto step = [&] {
    const std::vector<Tensor>& out = plan.run(feeds, options);
    if (update == Update::optimizer)
      sgd.step(param_tensors, std::span<const Tensor>(out).subspan(1));
    return out[0].at(0);
  };
  double first_loss = 0;
  for (int i = 0; i < warmup_steps; ++i) {
    const double loss = step();
    if (i == 0) first_loss = loss;
  }

  allocations.store(0);
  counting.store(true);
  for (auto _ : state) benchmark::DoNotOptimize(step());
  counting.store(false);
  const double last_loss = step();

  const auto iterations = static_cast<double>(state.iterations());
  std::size_t param_bytes = 0;
  for (const Tensor& p : param_tensors) param_bytes += p.bytes();
  state.SetItemsProcessed(state.iterations() * batch);
  state.counters["GFLOPs"] =
      benchmark::Counter(m.flops_per_step * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["allocs_per_step"] = static_cast<double>(allocations.load()) / iterations;
  state.counters["peak_bytes"] = static_cast<double>(plan.planned_peak_bytes() + param_bytes);
  // Measured: how far the process's peak resident memory rose above its size before the model
  // was built (graph, parameters, feeds, the plan's arena, oneDNN's primitives and scratchpads).
  const std::size_t rss_peak = status_bytes("VmHWM:");
  state.counters["measured_peak_bytes"] =
      static_cast<double>(rss_peak > rss_before ? rss_peak - rss_before : 0);
  state.counters["threads"] = num_threads();
  state.counters["steps"] = static_cast<double>(plan.num_steps());
  state.counters["onednn_steps"] = static_cast<double>(plan.num_onednn_steps());
  // The loss of the first and the last step on the fixed batch: a sanity check that training
  // moves, not a timing.
  state.SetLabel(fmt::format("loss {:.3f} -> {:.3f}", first_loss, last_loss));
  if (profile)
    fmt::print(stderr, "{} (batch {}):\n{}\n", "train step", batch, plan.profile_report(60));
}

void mlp_train_step(benchmark::State& state) {
  run_train_step(state, build_mlp, threads_from_env());
}
void cnn_train_step(benchmark::State& state) {
  run_train_step(state, build_cnn, threads_from_env());
}
void cnn_bn_train_step(benchmark::State& state) {
  run_train_step(state, build_cnn_bn, threads_from_env());
}
void mlp_train_step_threads(benchmark::State& state) {
  run_train_step(state, build_mlp, static_cast<int>(state.range(1)));
}
void mlp_train_step_optimizer(benchmark::State& state) {
  run_train_step(state, build_mlp, threads_from_env(), Update::optimizer);
}

// One epoch of Trainer::fit (nn/trainer.hpp) on the `mlp` preset (nn/model.hpp: the same
// 784-256-128-10 MLP, He-normal weights) over 100 batches of random pixels and labels, no
// validation, nothing written: the step a user of the Trainer (and dagrad-train) gets, with the
// loader's shuffled batches, the loss and error read back, the gradient norm and the optimiser.
// Optimiser: 0 SGD (lr 0.01), 1 momentum 0.9 (lr 0.01), 2 Adam (lr 1e-3, dagrad-train's
// default). Last argument: TrainerOptions::update_in_plan (1: SGD and momentum run inside the
// plan; 0: nn::SGD / nn::Momentum after it, the Trainer's only path before the fifth session).
// Compare its samples/s with mlp_train_step's at the same batch.
void trainer_epoch(benchmark::State& state) {
  set_num_threads(threads_from_env());
  const std::int64_t batch = state.range(0), examples = 100 * batch;
  Model model(parse_layers(preset_layers("mlp")),
              {.example_shape = {784}, .batch_size = batch, .seed = 1});
  data::Dataset train;
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> pixel(0.0, 1.0);
  std::uniform_int_distribution<std::int32_t> label(0, classes - 1);
  train.images = Tensor({examples, 784}, DType::f32);
  for (float& v : train.images.span<float>()) v = static_cast<float>(pixel(rng));
  train.labels = Tensor({examples}, DType::i32);
  for (std::int32_t& v : train.labels.span<std::int32_t>()) v = label(rng);
  train.num_classes = classes;
  std::unique_ptr<Optimizer> optimizer;
  switch (state.range(1)) {
    case 0:
      optimizer = std::make_unique<SGD>(SGDOptions{.learning_rate = learning_rate});
      break;
    case 1:
      optimizer = std::make_unique<Momentum>(MomentumOptions{.learning_rate = learning_rate});
      break;
    default:
      optimizer = std::make_unique<Adam>(AdamOptions{.learning_rate = 1e-3});
      break;
  }
  Trainer trainer(model, *optimizer, nullptr,
                  {.epochs = 1,
                   .batch_size = batch,
                   .seed = 1,
                   .progress = 0,
                   .quiet = true,
                   .update_in_plan = state.range(2) != 0});
  trainer.fit(train);  // warm-up: plans specialised, optimiser state created
  double last_loss = 0;
  for (auto _ : state) last_loss = trainer.fit(train).epochs.back().train_loss;
  state.SetItemsProcessed(state.iterations() * examples);
  state.counters["threads"] = num_threads();
  state.SetLabel(fmt::format("{}{}, epoch loss {:.3f}", optimizer->name(),
                             trainer.updates_in_plan() ? " in the plan" : "", last_loss));
}

BENCHMARK(mlp_train_step)
    ->Arg(32)
    ->Arg(128)
    ->Arg(512)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(cnn_train_step)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(cnn_bn_train_step)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(mlp_train_step_optimizer)
    ->Arg(32)
    ->Arg(128)
    ->Arg(512)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(trainer_epoch)
    ->ArgsProduct({{32, 128, 512}, {0, 1}, {0, 1}})
    ->Args({32, 2, 0})
    ->Args({128, 2, 0})
    ->Args({512, 2, 0})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(mlp_train_step_threads)
    ->Args({128, 1})
    ->Args({128, 2})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
