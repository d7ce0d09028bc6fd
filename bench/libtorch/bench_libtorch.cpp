// The training steps of bench_train.cpp in libtorch, for comparison (same models, batch sizes,
// loss, SGD with lr 0.01 and thread count), named like dagrad's with a `torch_` prefix:
//   torch_mlp_train_step/<batch>, torch_cnn_train_step/<batch>,
//   torch_cnn_bn_train_step/<batch> (the CNN with BatchNorm2d after each convolution, before
//   its relu), torch_mlp_train_step_threads/<batch>/<threads>
// One iteration = zero_grad + forward + cross_entropy + backward + SGD step: the idiomatic
// libtorch step. items_per_second = samples/s; GFLOPs uses the same analytic count as dagrad's.
// Threads: DAGRAD_THREADS (0 or unset = all cores), applied with at::set_num_threads.
// Built only with -DDAGRAD_BENCH_LIBTORCH=ON (needs Debian's libtorch-dev).
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cstdlib>
#include <thread>

namespace {

constexpr double learning_rate = 0.01;
constexpr std::int64_t classes = 10;
constexpr int warmup_steps = 3;

int threads_from_env() {
  const char* text = std::getenv("DAGRAD_THREADS");
  const int threads = text == nullptr ? 0 : std::atoi(text);
  return threads > 0 ? threads : static_cast<int>(std::thread::hardware_concurrency());
}

// Forward 2·batch·in·out per dense layer; backward dX and dW, each as much again.
double dense_flops(std::int64_t batch, std::int64_t in, std::int64_t out) {
  return 3.0 * 2.0 * static_cast<double>(batch * in * out);
}
// Forward 2·N·O·OH·OW·C·KH·KW per 5x5 same convolution; backward data and weights likewise.
double conv5x5_flops(std::int64_t batch, std::int64_t in, std::int64_t out, std::int64_t size) {
  return 3.0 * 2.0 * static_cast<double>(batch * out * size * size * in * 5 * 5);
}

struct MlpImpl : torch::nn::Module {
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, fc3{nullptr};
  MlpImpl() {
    fc1 = register_module("fc1", torch::nn::Linear(784, 256));
    fc2 = register_module("fc2", torch::nn::Linear(256, 128));
    fc3 = register_module("fc3", torch::nn::Linear(128, classes));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return fc3(torch::relu(fc2(torch::relu(fc1(x)))));
  }
  static double flops(std::int64_t batch) {
    return dense_flops(batch, 784, 256) + dense_flops(batch, 256, 128) +
           dense_flops(batch, 128, classes);
  }
  static std::vector<std::int64_t> input_shape(std::int64_t batch) { return {batch, 784}; }
};
TORCH_MODULE(Mlp);

struct CnnImpl : torch::nn::Module {
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  CnnImpl() {
    conv1 =
        register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 32, 5).padding(2)));
    conv2 =
        register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 64, 5).padding(2)));
    fc1 = register_module("fc1", torch::nn::Linear(64 * 7 * 7, 1024));
    fc2 = register_module("fc2", torch::nn::Linear(1024, classes));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = torch::max_pool2d(torch::relu(conv1(x)), 2, 2);  // 14x14
    h = torch::max_pool2d(torch::relu(conv2(h)), 2, 2);       // 7x7
    return fc2(torch::relu(fc1(h.flatten(1))));
  }
  static double flops(std::int64_t batch) {
    return conv5x5_flops(batch, 1, 32, 28) + conv5x5_flops(batch, 32, 64, 14) +
           dense_flops(batch, 64 * 7 * 7, 1024) + dense_flops(batch, 1024, classes);
  }
  static std::vector<std::int64_t> input_shape(std::int64_t batch) { return {batch, 1, 28, 28}; }
};
TORCH_MODULE(Cnn);

// The CNN with batch normalisation (torch::nn::BatchNorm2d: affine γ, β; momentum 0.1; ε 1e-5,
// as dagrad's defaults) after each convolution, before its relu. Trained in training mode.
struct CnnBnImpl : torch::nn::Module {
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  CnnBnImpl() {
    conv1 =
        register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 32, 5).padding(2)));
    bn1 = register_module("bn1", torch::nn::BatchNorm2d(32));
    conv2 =
        register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 64, 5).padding(2)));
    bn2 = register_module("bn2", torch::nn::BatchNorm2d(64));
    fc1 = register_module("fc1", torch::nn::Linear(64 * 7 * 7, 1024));
    fc2 = register_module("fc2", torch::nn::Linear(1024, classes));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = torch::max_pool2d(torch::relu(bn1(conv1(x))), 2, 2);  // 14x14
    h = torch::max_pool2d(torch::relu(bn2(conv2(h))), 2, 2);       // 7x7
    return fc2(torch::relu(fc1(h.flatten(1))));
  }
  static double flops(std::int64_t batch) { return CnnImpl::flops(batch); }  // BN not counted
  static std::vector<std::int64_t> input_shape(std::int64_t batch) { return {batch, 1, 28, 28}; }
};
TORCH_MODULE(CnnBn);

template <class Model>
void run_train_step(benchmark::State& state, int threads) {
  at::set_num_threads(threads);
  const std::int64_t batch = state.range(0);
  torch::manual_seed(42);
  Model model;
  torch::optim::SGD sgd(model->parameters(), torch::optim::SGDOptions(learning_rate));
  const torch::Tensor x = torch::rand(Model::Impl::input_shape(batch));
  const torch::Tensor labels = torch::randint(0, classes, {batch}, torch::kLong);

  auto step = [&] {
    sgd.zero_grad();
    torch::Tensor loss = torch::nn::functional::cross_entropy(model->forward(x), labels);
    loss.backward();
    sgd.step();
    return loss.item<double>();
  };
  double first_loss = 0;
  for (int i = 0; i < warmup_steps; ++i) {
    const double loss = step();
    if (i == 0) first_loss = loss;
  }
  for (auto _ : state) benchmark::DoNotOptimize(step());
  const double last_loss = step();

  state.SetItemsProcessed(state.iterations() * batch);
  state.counters["GFLOPs"] = benchmark::Counter(Model::Impl::flops(batch) * 1e-9,
                                                benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = at::get_num_threads();
  state.SetLabel("loss " + std::to_string(first_loss) + " -> " + std::to_string(last_loss));
}

void torch_mlp_train_step(benchmark::State& state) {
  run_train_step<Mlp>(state, threads_from_env());
}
void torch_cnn_train_step(benchmark::State& state) {
  run_train_step<Cnn>(state, threads_from_env());
}
void torch_cnn_bn_train_step(benchmark::State& state) {
  run_train_step<CnnBn>(state, threads_from_env());
}
void torch_mlp_train_step_threads(benchmark::State& state) {
  run_train_step<Mlp>(state, static_cast<int>(state.range(1)));
}

BENCHMARK(torch_mlp_train_step)
    ->Arg(32)
    ->Arg(128)
    ->Arg(512)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(torch_cnn_train_step)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(torch_cnn_bn_train_step)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(torch_mlp_train_step_threads)
    ->Args({128, 1})
    ->Args({128, 2})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
