// Fused and unfused plans give the same results (a test for each fusion pattern), and the
// plan really runs the fused kernels.
#include <gtest/gtest.h>

#include <algorithm>

#include "dagrad.hpp"
#include "ops/small_gemm.hpp"
#include "registry_support.hpp"

namespace dagrad {
namespace {

Tensor random_tensor(Shape shape, std::uint64_t seed) {
  return testing::uniform_tensor(std::move(shape), seed);
}

using testing::bytes_of;

void expect_same_results(Graph& g, const std::vector<Value>& outputs, const Feeds& feeds,
                         const std::string& expected_pattern) {
  Plan fused = compile(g, outputs);
  Plan plain = compile(g, outputs, {.fuse = false});
  auto a = fused.run(feeds);
  auto b = plain.run(feeds);
  ASSERT_EQ(a.size(), b.size());
  for (std::size_t k = 0; k < a.size(); ++k) {
    for (std::int64_t i = 0; i < a[k].numel(); ++i) {
      ASSERT_NEAR(a[k].at(i), b[k].at(i), 1e-4 * (1 + std::abs(b[k].at(i)))) << "output " << k;
    }
  }
  auto patterns = fused.fused_patterns();
  EXPECT_NE(std::find(patterns.begin(), patterns.end(), expected_pattern), patterns.end())
      << "expected a fused " << expected_pattern;
  EXPECT_TRUE(plain.fused_patterns().empty());
  EXPECT_LT(fused.num_steps(), plain.num_steps());
}

TEST(Fusion, MatmulBiasRelu) {
  Graph g;
  Value x = g.input("x", {16, 32});
  Value w = g.parameter("w", random_tensor({32, 8}, 1));
  Value b = g.parameter("b", random_tensor({8}, 2));
  Value y = relu(matmul(x, w) + b);
  expect_same_results(g, {y}, {{x, random_tensor({16, 32}, 3)}}, "matmul+bias+relu");
}

TEST(Fusion, MatmulBiasTanhAndSigmoid) {
  for (const char* activation : {"tanh", "sigmoid"}) {
    Graph g;
    Value x = g.input("x", {4, 6});
    Value w = g.parameter("w", random_tensor({6, 5}, 4));
    Value b = g.parameter("b", random_tensor({1, 5}, 5));
    Value y = g.apply(activation, {matmul(x, w) + b});
    expect_same_results(g, {y}, {{x, random_tensor({4, 6}, 6)}},
                        std::string("matmul+bias+") + activation);
  }
}

TEST(Fusion, TransposedOperandsAreReadInPlace) {
  // A batch above small_k_limit: dW = Xᵀ·dY on oneDNN, reading X through swapped strides.
  Graph g;
  Value x = g.input("x", {small_k_limit + 8, 12});
  Value w = g.parameter("w", random_tensor({12, 5}, 7));
  Value loss = sum(matmul(x, w));
  auto grads = grad(loss, {w, x});  // dW = Xᵀ·dY, dX = dY·Wᵀ
  expect_same_results(g, {loss, grads[0], grads[1]},
                      {{x, random_tensor({small_k_limit + 8, 12}, 8)}}, "transposed-A matmul");
  Plan fused = compile(g, {grads[1]});
  auto patterns = fused.fused_patterns();
  EXPECT_NE(std::find(patterns.begin(), patterns.end(), "transposed-B matmul"), patterns.end());
}

// A dense layer's weight gradient dW = xᵀ dy at a batch K <= small_k_limit, with its bias
// gradient sum(dy, {0}) in the same step: compared with the reference backend (sums in double)
// over row counts around the 6-row blocks, column counts around the 16-column blocks (masked
// last block), K from 1 to the limit; 1 and 2 threads give the same bits. One past either limit
// (K, or the elements of dW) the oneDNN matmul runs instead.
TEST(Fusion, SmallBatchWeightGradientWithItsBiasGradient) {
  struct Case {
    std::int64_t m, k, n;
    bool bias;
  };
  const std::vector<Case> cases{{1, 1, 1, true},
                                {5, 3, 10, true},
                                {6, 32, 16, true},
                                {7, 32, 17, false},
                                {13, small_k_limit, 33, true},
                                {784, 32, 256, true},
                                {130, 17, 40, false},
                                {20, small_k_chunk + 1, 24, true},  // a last chunk of one k
                                {9, 2 * small_k_chunk + 44, 16, false},
                                {12, small_k_limit + 1, 9, true},
                                {1024, 8, small_k_max_outputs / 1024 + 1, true}};
  std::uint64_t seed = 70;
  const int saved = num_threads();
  // The kernel needs AVX2 and FMA (its factory says whether this machine has them); elsewhere
  // the oneDNN matmul runs in every case.
  const bool available = transposed_a_small_k_kernel(1, 1, 1, false) != nullptr;
  for (const Case& k : cases) {
    Graph g;
    Value x = g.input("x", {k.k, k.m});
    Value t = g.input("t", {k.k, k.n});
    Value w = g.parameter("w", random_tensor({k.m, k.n}, seed++));
    Value b = g.parameter("b", random_tensor({k.n}, seed++));
    Value y = k.bias ? matmul(x, w) + b : matmul(x, w);
    Value loss = sum(y * t);  // dy = t
    const std::vector<Value> grads = k.bias ? grad(loss, {w, b}) : grad(loss, {w});
    const Feeds feeds{{x, random_tensor({k.k, k.m}, seed++)},
                      {t, random_tensor({k.k, k.n}, seed++)}};
    Plan reference = compile(g, grads, {.backend = Backend::reference});
    const auto expected = reference.run(feeds);
    std::vector<std::vector<std::uint8_t>> bits;
    for (int threads : {1, 2}) {
      set_num_threads(threads);
      Plan plan = compile(g, grads, {.single_thread_below_bytes = 0});
      const auto got = plan.run(feeds);
      for (std::size_t i = 0; i < grads.size(); ++i) {
        for (std::int64_t j = 0; j < expected[i].numel(); ++j) {
          ASSERT_NEAR(got[i].at(j), expected[i].at(j), 1e-5 * (1 + std::abs(expected[i].at(j))))
              << "m " << k.m << " k " << k.k << " n " << k.n << ", gradient " << i << ", element "
              << j;
        }
      }
      bits.push_back(bytes_of(got[0]));
      if (k.bias) {
        const auto b_bits = bytes_of(got[1]);
        bits.back().insert(bits.back().end(), b_bits.begin(), b_bits.end());
      }
      const auto patterns = plan.fused_patterns();
      const std::string small =
          std::string("transposed-A matmul (small batch)") + (k.bias ? "+sum" : "");
      const bool used = std::find(patterns.begin(), patterns.end(), small) != patterns.end();
      EXPECT_EQ(used, available && k.k <= small_k_limit && k.m * k.n <= small_k_max_outputs)
          << "m " << k.m << " k " << k.k << " n " << k.n;
      if (!used) bits.clear();  // oneDNN promises no equal bits across thread counts
    }
    if (bits.size() == 2) {
      EXPECT_EQ(bits[0], bits[1]) << "m " << k.m << " k " << k.k << " n " << k.n;
    }
  }
  set_num_threads(saved);
}

TEST(Fusion, AnIntermediateReadElsewhereIsNotFused) {
  Graph g;
  Value x = g.input("x", {4, 6});
  Value w = g.parameter("w", random_tensor({6, 5}, 9));
  Value pre = matmul(x, w);
  Value y = relu(pre);
  // `pre` is also a requested output, so matmul and relu must stay apart.
  Plan plan = compile(g, {y, pre});
  EXPECT_TRUE(plan.fused_patterns().empty());
}

// At batch 1 the sum of two products [1, N] looks like product + bias row from either side
// (a layer input read by two dense layers has dx = dz₁ W₁ᵀ + dz₂ W₂ᵀ): only one of them may
// take the add, or the other is absorbed into the step that reads it and the plan fails at its
// first run.
TEST(Fusion, TwoProductsAddedAtBatchOneFuseOnce) {
  for (bool relu_after : {false, true}) {
    Graph g;
    Value x = g.input("x", {1, 5});
    Value w1 = g.parameter("w1", random_tensor({5, 4}, 40));
    Value w2 = g.parameter("w2", random_tensor({5, 4}, 41));
    Value y = matmul(x, w1) + matmul(x, w2);
    if (relu_after) y = relu(y);
    Value loss = sum(y * y);
    auto grads = grad(loss, {x, w1, w2});
    expect_same_results(g, {y, grads[0], grads[1], grads[2]}, {{x, random_tensor({1, 5}, 42)}},
                        relu_after ? "matmul+bias+relu" : "matmul+bias");
  }
}

TEST(Fusion, TrainingGradientsMatchTheUnfusedPlan) {
  Graph g;
  Value x = g.input("x", {32, 20});
  Value w1 = g.parameter("w1", random_tensor({20, 16}, 10));
  Value b1 = g.parameter("b1", random_tensor({16}, 11));
  Value w2 = g.parameter("w2", random_tensor({16, 3}, 12));
  Value loss = mean(sigmoid(matmul(relu(matmul(x, w1) + b1), w2)));
  auto grads = grad(loss, {w1, b1, w2});
  expect_same_results(g, {loss, grads[0], grads[1], grads[2]}, {{x, random_tensor({32, 20}, 13)}},
                      "matmul+bias+relu");
}

TEST(Fusion, ConvolutionWithActivation) {
  for (const char* activation : {"relu", "tanh", "sigmoid"}) {
    Graph g;
    Value x = g.input("x", {2, 3, 9, 9});
    Value w = g.parameter("w", random_tensor({8, 3, 3, 3}, 14));
    Value b = g.parameter("b", random_tensor({8}, 15));
    Value y = g.apply(activation, {conv2d(x, w, b, {.padding = {1, 1}})});
    expect_same_results(g, {y}, {{x, random_tensor({2, 3, 9, 9}, 16)}},
                        std::string("conv2d+") + activation);
  }
}

// conv -> relu -> max_pool2d: forward conv2d+relu, backward max_pool2d_backward+relu_grad (the
// gradient lands on a window's maximum only when it is positive). Half the pre-activations are
// negative, so windows whose maximum is clipped to 0 occur.
TEST(Fusion, ConvReluMaxPoolTrainingGradients) {
  for (bool odd : {false, true}) {
    const std::int64_t size = odd ? 9 : 8;  // odd: the last row and column are read by no window
    Graph g;
    Value x = g.input("x", {2, 3, size, size});
    Value w = g.parameter("w", random_tensor({8, 3, 3, 3}, 17));
    Value b = g.parameter("b", random_tensor({8}, 18));
    Value h = max_pool2d(relu(conv2d(x, w, b, {.padding = {1, 1}})), {2, 2}, {2, 2});
    Value loss = sum(h * h);
    auto grads = grad(loss, {w, b, x});
    const Feeds feeds{{x, random_tensor({2, 3, size, size}, 19)}};
    expect_same_results(g, {loss, grads[0], grads[1], grads[2]}, feeds, "conv2d+relu");
    // The weights, bias and data gradients read the pooling's gradient; dy is not built.
    expect_same_results(g, {loss, grads[0], grads[1], grads[2]}, feeds,
                        "max_pool2d_backward+relu_grad+conv2d_backward_weights+data+sum");
  }
}

// conv -> relu -> 2x2 max pooling: the weights, bias and (when the input needs one) data
// gradients come from the pooling's gradient in one step, and neither max_pool2d_backward nor
// relu_grad runs. Cases: the CNN's first layer, an odd channel count (the AVX2 loop's blocks of
// two channels and a single remainder; channels not a multiple of 8 for the data gradient),
// kernels of 1, 3, 5, 7 and 8 rows and columns, unequal paddings, odd sizes whose last row and
// column no window reads, with and without bias, with and without the input's gradient.
// Compared with the reference backend (sums in double) and with 1 against 2 threads (the same
// bits).
struct PooledConvCase {
  std::int64_t channels, outputs, size;
  Size2 kernel, padding;
  bool bias;
};

TEST(Fusion, GradientsThroughReluAndPoolingSkipDy) {
  const int saved_threads = num_threads();
  const std::vector<PooledConvCase> cases{
      {1, 8, 28, {5, 5}, {2, 2}, true},   {3, 5, 9, {3, 3}, {1, 1}, true},
      {2, 4, 10, {7, 7}, {3, 3}, false},  {2, 3, 11, {8, 8}, {3, 4}, true},
      {4, 6, 8, {1, 1}, {0, 0}, true},    {2, 4, 9, {5, 3}, {2, 0}, true},
      {32, 16, 14, {5, 5}, {2, 2}, true}, {9, 5, 10, {3, 5}, {1, 2}, false},
  };
  std::uint64_t seed = 30;
  for (const PooledConvCase& k : cases) {
    for (bool input_gradient : {false, true}) {
      SCOPED_TRACE(fmt::format("C {} O {} size {} kernel {}x{} padding {}x{} bias {} dx {}",
                               k.channels, k.outputs, k.size, k.kernel[0], k.kernel[1],
                               k.padding[0], k.padding[1], k.bias, input_gradient));
      Graph g;
      const Shape x_shape{3, k.channels, k.size, k.size};
      Value x = g.input("x", x_shape);
      Value w = g.parameter(
          "w", random_tensor({k.outputs, k.channels, k.kernel[0], k.kernel[1]}, seed++));
      std::optional<Value> b;
      if (k.bias) b = g.parameter("b", random_tensor({k.outputs}, seed++));
      Value h = max_pool2d(relu(conv2d(x, w, b, {.padding = k.padding})), {2, 2}, {2, 2});
      Value loss = sum(h * g.constant(random_tensor(h.shape(), seed++), "m"));
      std::vector<Value> wrt{w};
      if (b) wrt.push_back(*b);
      if (input_gradient) wrt.push_back(x);
      std::vector<Value> outputs{loss};
      for (const Value& d : grad(loss, wrt)) outputs.push_back(d);
      const Feeds feeds{{x, random_tensor(x_shape, seed++)}};

      Plan fused = compile(g, outputs, {.single_thread_below_bytes = 0});
      Plan reference = compile(g, outputs, {.backend = Backend::reference});
      const std::string pattern =
          std::string("max_pool2d_backward+relu_grad+conv2d_backward_weights") +
          (input_gradient ? "+data" : "") + (k.bias ? "+sum" : "");
      auto patterns = fused.fused_patterns();
      EXPECT_NE(std::find(patterns.begin(), patterns.end(), pattern), patterns.end());
      EXPECT_EQ(std::find(patterns.begin(), patterns.end(), "max_pool2d_backward+relu_grad"),
                patterns.end());

      set_num_threads(1);
      std::vector<Tensor> one;
      for (const Tensor& t : fused.run(feeds)) one.push_back(t.clone());
      set_num_threads(2);
      auto two = fused.run(feeds);
      set_num_threads(saved_threads);
      auto expected = reference.run(feeds);
      for (const StepProfile& step : fused.profile()) {  // dy is not built
        EXPECT_NE(step.op, "max_pool2d_backward");
        EXPECT_NE(step.op, "relu_grad");
      }
      ASSERT_EQ(one.size(), expected.size());
      for (std::size_t i = 1; i < one.size(); ++i) {
        EXPECT_EQ(bytes_of(two[i]), bytes_of(one[i])) << "gradient " << i << " on 2 threads";
        double scale = 0.0;  // the sums cancel: compare to the gradient's magnitude
        for (std::int64_t j = 0; j < expected[i].numel(); ++j) {
          scale = std::max(scale, std::abs(expected[i].at(j)));
        }
        ASSERT_GT(scale, 0.0);
        for (std::int64_t j = 0; j < expected[i].numel(); ++j) {
          ASSERT_NEAR(one[i].at(j), expected[i].at(j), 1e-5 * scale)
              << "gradient " << i << " [" << j << "]";
        }
      }
    }
  }
}

// Windows with tied maxima (integer pixels and weights, biases in quarters, so every sum is
// exact in f32 in any order): the gradient must land on the first maximum, as
// max_pool2d_backward's does, and windows whose maximum is 0 get none.
TEST(Fusion, GradientsThroughPoolingTakeTheFirstOfTiedMaxima) {
  // Without the input's gradient the kernel reads x as NCHW rows (2 channels), with it as
  // channels-innermost images.
  for (bool input_gradient : {false, true}) {
    SCOPED_TRACE(input_gradient ? "with dx" : "without dx");
    Graph g;
    const Shape x_shape{2, 2, 8, 8};
    Tensor x_value(x_shape, DType::f32), w_value(Shape{4, 2, 3, 3}, DType::f32);
    for (std::int64_t i = 0; i < x_value.numel(); ++i) x_value.set(i, double((i * 7) % 3));
    for (std::int64_t i = 0; i < w_value.numel(); ++i) w_value.set(i, double((i * 5) % 3) - 1.0);
    Value x = g.input("x", x_shape);
    Value w = g.parameter("w", w_value);
    Tensor b_value(Shape{4}, DType::f32);
    for (std::int64_t i = 0; i < 4; ++i) b_value.set(i, 0.25 * double(i) - 0.5);
    Value b = g.parameter("b", b_value);
    Value h = max_pool2d(relu(conv2d(x, w, b, {.padding = {1, 1}})), {2, 2}, {2, 2});
    Value loss = sum(h * g.constant(random_tensor(h.shape(), 41), "m"));
    std::vector<Value> wrt{w, b};
    if (input_gradient) wrt.push_back(x);
    const std::vector<Value> grads = grad(loss, wrt);
    const Feeds feeds{{x, x_value}};
    Plan fused = compile(g, grads);
    Plan reference = compile(g, grads, {.backend = Backend::reference});
    auto patterns = fused.fused_patterns();
    const std::string pattern =
        input_gradient ? "max_pool2d_backward+relu_grad+conv2d_backward_weights+data+sum"
                       : "max_pool2d_backward+relu_grad+conv2d_backward_weights+sum";
    ASSERT_NE(std::find(patterns.begin(), patterns.end(), pattern), patterns.end());
    auto actual = fused.run(feeds);
    auto expected = reference.run(feeds);
    for (std::size_t i = 0; i < grads.size(); ++i) {
      for (std::int64_t j = 0; j < expected[i].numel(); ++j) {
        ASSERT_NEAR(actual[i].at(j), expected[i].at(j), 1e-5 * (1 + std::abs(expected[i].at(j))))
            << "gradient " << i << " [" << j << "]";
      }
    }
  }
}

// Configurations the kernel does not take (strided, dilated or grouped convolutions, 3x3
// pooling) keep the other steps and give the same results as the unfused plan.
TEST(Fusion, GradientsThroughPoolingOnlyForStrideOneConvolutions) {
  struct Case {
    Conv2dOptions conv;
    Size2 pool_kernel, pool_stride;
  };
  const std::vector<Case> cases{
      {{.stride = {2, 2}, .padding = {1, 1}}, {2, 2}, {2, 2}},
      {{.padding = {2, 2}, .dilation = {2, 2}}, {2, 2}, {2, 2}},
      {{.padding = {1, 1}, .groups = 2}, {2, 2}, {2, 2}},
      {{.padding = {1, 1}}, {3, 3}, {3, 3}},
  };
  std::uint64_t seed = 50;
  for (const Case& k : cases) {
    Graph g;
    Value x = g.input("x", {2, 4, 12, 12});
    Value w = g.parameter("w", random_tensor({6, 4 / k.conv.groups, 3, 3}, seed++));
    Value b = g.parameter("b", random_tensor({6}, seed++));
    Value h = max_pool2d(relu(conv2d(x, w, b, k.conv)), k.pool_kernel, k.pool_stride);
    Value loss = sum(h * h);
    const std::vector<Value> grads = grad(loss, {w, b, x});
    Plan fused = compile(g, grads);
    for (const std::string& pattern : fused.fused_patterns()) {
      EXPECT_EQ(pattern.find("relu_grad+conv2d_backward_weights"), std::string::npos) << pattern;
    }
    Plan plain = compile(g, grads, {.fuse = false});
    const Feeds feeds{{x, random_tensor({2, 4, 12, 12}, seed++)}};
    auto a = fused.run(feeds);
    auto e = plain.run(feeds);
    for (std::size_t i = 0; i < grads.size(); ++i) {
      for (std::int64_t j = 0; j < e[i].numel(); ++j) {
        ASSERT_NEAR(a[i].at(j), e[i].at(j), 1e-4 * (1 + std::abs(e[i].at(j))));
      }
    }
  }
}

// A grouped, strided convolution without bias: its weights and data gradients fuse.
TEST(Fusion, GroupedStridedConvolutionBackward) {
  Graph g;
  Value x = g.input("x", {2, 4, 9, 9});
  Value w = g.parameter("w", random_tensor({8, 2, 3, 3}, 23));
  Value loss = sum(square(conv2d(x, w, std::nullopt, {.stride = {2, 2}, .groups = 2})));
  auto grads = grad(loss, {w, x});
  expect_same_results(g, {loss, grads[0], grads[1]}, {{x, random_tensor({2, 4, 9, 9}, 24)}},
                      "conv2d_backward_weights+data");
}

// One input channel: the weights gradient reads x and dy as NHWC (oneDNN's fast case), the data
// gradient shares that dy.
TEST(Fusion, OneChannelConvolutionBackward) {
  Graph g;
  Value x = g.input("x", {2, 1, 9, 9});
  Value w = g.parameter("w", random_tensor({8, 1, 3, 3}, 25));
  Value loss = sum(square(conv2d(x, w, std::nullopt, {.padding = {1, 1}})));
  auto grads = grad(loss, {w, x});
  expect_same_results(g, {loss, grads[0], grads[1]}, {{x, random_tensor({2, 1, 9, 9}, 26)}},
                      "conv2d_backward_weights+data");
}

TEST(Fusion, MaxPoolBackwardFusesOnlyTheReluOfItsOwnInput) {
  // relu_grad masks by another tensor than the pooled one: no fusion.
  Graph g;
  Value x = g.input("x", {1, 2, 4, 4});
  Value other = g.input("other", {1, 2, 4, 4});
  Value dy = g.input("dy", {1, 2, 2, 2});
  Value dx = relu_grad(max_pool2d_backward(dy, x, {2, 2}, {2, 2}, {0, 0}), other);
  Plan plan = compile(g, {dx});
  auto patterns = plan.fused_patterns();
  EXPECT_EQ(std::find(patterns.begin(), patterns.end(), "max_pool2d_backward+relu_grad"),
            patterns.end());
}

}  // namespace
}  // namespace dagrad
