// Fused and unfused plans give the same results (a test for each fusion pattern), and the
// plan really runs the fused kernels.
#include <gtest/gtest.h>

#include <algorithm>

#include "dagrad.hpp"
#include "registry_support.hpp"

namespace dagrad {
namespace {

Tensor random_tensor(Shape shape, std::uint64_t seed) {
  return testing::uniform_tensor(std::move(shape), seed);
}

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
  Graph g;
  Value x = g.input("x", {8, 12});
  Value w = g.parameter("w", random_tensor({12, 5}, 7));
  Value loss = sum(matmul(x, w));
  auto grads = grad(loss, {w, x});  // dW = Xᵀ·dY, dX = dY·Wᵀ
  expect_same_results(g, {loss, grads[0], grads[1]}, {{x, random_tensor({8, 12}, 8)}},
                      "transposed-A matmul");
  Plan fused = compile(g, {grads[1]});
  auto patterns = fused.fused_patterns();
  EXPECT_NE(std::find(patterns.begin(), patterns.end(), "transposed-B matmul"), patterns.end());
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
    expect_same_results(g, {loss, grads[0], grads[1], grads[2]}, feeds,
                        "max_pool2d_backward+relu_grad");
    expect_same_results(g, {loss, grads[0], grads[1], grads[2]}, feeds, "conv2d+relu");
    expect_same_results(g, {loss, grads[0], grads[1], grads[2]}, feeds,
                        "conv2d_backward_weights+data");
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
