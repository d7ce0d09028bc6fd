// dropout, dropconnect, batch_norm, layer_norm and the weight penalties: statistics, known
// answers, training/inference behaviour, side effects on running statistics, errors, and
// gradients against central differences (the registry tests cover samples and oneDNN vs
// reference in training mode; these add what needs a specific setup).
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <random>

#include "dagrad.hpp"
#include "registry_support.hpp"

namespace dagrad {
namespace {

RunOptions training(std::uint64_t seed = 0) {
  return RunOptions{.training = true, .seed = seed};
}
RunOptions inference() {
  return RunOptions{.training = false, .seed = 0};
}

std::vector<double> run_one(Graph& g, const Value& out, const Feeds& feeds,
                            const RunOptions& options, Backend backend = Backend::onednn) {
  Plan plan = compile(g, {out}, {.backend = backend});
  return plan.run(feeds, options)[0].to_doubles();
}

Tensor iota_tensor(Shape shape, DType dtype = DType::f32, double start = 1.0) {
  std::vector<double> values(static_cast<std::size_t>(shape.numel()));
  std::iota(values.begin(), values.end(), start);
  return Tensor::from(values, std::move(shape), dtype);
}

// ---- dropout ------------------------------------------------------------------------------

TEST(Dropout, KeepsAboutOneMinusRateAndPreservesTheMeanOn100kElements) {
  Graph g;
  Value x = g.input("x", {100000});
  Value y = dropout(x, 0.3, /*seed=*/42);
  auto values = run_one(g, y, {{x, Tensor::full({100000}, 1.0)}}, training(5));
  std::size_t kept = 0;
  double total = 0.0;
  for (double v : values) {
    if (v != 0.0) {
      ++kept;
      EXPECT_NEAR(v, 1.0 / 0.7, 1e-6);  // inverted dropout: survivors scaled by 1/(1 − p)
    }
    total += v;
  }
  // Binomial(1e5, 0.7): standard deviation of the kept fraction ≈ 0.00145.
  EXPECT_NEAR(static_cast<double>(kept) / 1e5, 0.7, 0.01);
  EXPECT_NEAR(total / 1e5, 1.0, 0.02);
}

TEST(Dropout, IsTheIdentityInInferenceWithAMaskOfOnes) {
  Graph g;
  Value x = g.input("x", {3, 4});
  auto outputs = dropout_with_mask(x, 0.5, 1);
  Tensor fed = iota_tensor({3, 4});
  Plan plan = compile(g, outputs);
  auto result = plan.run({{x, fed}}, inference());
  EXPECT_EQ(result[0].to_doubles(), fed.to_doubles());
  EXPECT_EQ(result[1].to_doubles(), std::vector<double>(12, 1.0));
}

TEST(Dropout, RateZeroKeepsEverythingInTraining) {
  Graph g;
  Value x = g.input("x", {50});
  Tensor fed = iota_tensor({50});
  EXPECT_EQ(run_one(g, dropout(x, 0.0), {{x, fed}}, training(3)), fed.to_doubles());
}

TEST(Dropout, SameSeedGivesTheSameMaskAndOtherSeedsOtherMasks) {
  Graph g;
  Value x = g.input("x", {1000});
  auto outputs = dropout_with_mask(x, 0.5, 7);
  Feeds feeds{{x, Tensor::full({1000}, 1.0)}};
  Plan plan = compile(g, {outputs[1]});
  auto first = plan.run(feeds, training(11))[0].to_doubles();
  auto again = plan.run(feeds, training(11))[0].to_doubles();  // a later run, same options
  Plan other_plan = compile(g, {outputs[1]}, {.backend = Backend::reference});
  auto other_plan_mask = other_plan.run(feeds, training(11))[0].to_doubles();
  auto other_run_seed = plan.run(feeds, training(12))[0].to_doubles();
  EXPECT_EQ(first, again);
  EXPECT_EQ(first, other_plan_mask);
  EXPECT_NE(first, other_run_seed);

  Value z = dropout_with_mask(x, 0.5, 8)[1];  // another attribute seed (and another node)
  EXPECT_NE(first, run_one(g, z, feeds, training(11)));
}

// The f32 kernel (parallel, AVX2: eight splitmix64 at a time and an integer threshold) against
// the reference's scalar double test, bit for bit, on 1 and 2 threads, with a ragged tail and
// rates whose threshold rate · 2⁵³ is exact (0.5), tiny or close to 1.
TEST(Dropout, TheFastKernelDrawsTheReferenceMaskBitForBit) {
  const int saved_threads = num_threads();
  const std::int64_t n = 100003;
  std::vector<double> values(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < values.size(); ++i)
    values[i] = std::sin(0.1 * static_cast<double>(i));
  const Tensor fed = Tensor::from(values, {n}, DType::f32);
  for (double rate : {0.5, 0.3, 0.1, 0.9, 1e-9, 0.999999}) {
    Graph g;
    Value x = g.input("x", {n});
    auto outputs = dropout_with_mask(x, rate, 11);
    Plan reference = compile(g, outputs, {.backend = Backend::reference});
    const auto expected = reference.run({{x, fed}}, training(4));
    const std::vector<double> expected_y = expected[0].to_doubles();
    const std::vector<double> expected_mask = expected[1].to_doubles();
    for (int threads : {1, 2}) {
      set_num_threads(threads);
      Plan fast = compile(g, outputs);
      const auto got = fast.run({{x, fed}}, training(4));
      ASSERT_EQ(got[1].to_doubles(), expected_mask) << "rate " << rate << ", " << threads;
      ASSERT_EQ(got[0].to_doubles(), expected_y) << "rate " << rate << ", " << threads;
    }
    set_num_threads(saved_threads);
  }
}

TEST(Dropout, TwoNodesWithOneSeedDrawDifferentMasks) {
  Graph g;
  Value x = g.input("x", {1000});
  Value a = dropout_with_mask(x, 0.5, 7)[1];
  Value b = dropout_with_mask(x, 0.5, 7)[1];
  Plan plan = compile(g, {a, b});
  auto result = plan.run({{x, Tensor::full({1000}, 1.0)}}, training(1));
  EXPECT_NE(result[0].to_doubles(), result[1].to_doubles());
}

TEST(Dropout, VaryWithStepDrawsAFreshMaskOnEveryRun) {
  Graph g;
  Value x = g.input("x", {1000});
  Value mask = dropout_with_mask(x, 0.5, 7, /*vary_with_step=*/true)[1];
  Feeds feeds{{x, Tensor::full({1000}, 1.0)}};
  Plan plan = compile(g, {mask});
  auto first = plan.run(feeds, training(3))[0].to_doubles();
  auto second = plan.run(feeds, training(3))[0].to_doubles();
  EXPECT_NE(first, second);
  // A fresh plan replays the same sequence: reproducible.
  Plan replay = compile(g, {mask});
  EXPECT_EQ(replay.run(feeds, training(3))[0].to_doubles(), first);
}

TEST(Dropout, TheMaskIsTheSameInF32AndF64) {
  std::vector<double> masks[2];
  int k = 0;
  for (DType dtype : {DType::f32, DType::f64}) {
    Graph g;
    Value x = g.input("x", {500}, dtype);
    Value mask = dropout_with_mask(x, 0.4, 3)[1];
    masks[k++] = run_one(g, mask, {{x, Tensor::full({500}, 1.0, dtype)}}, training(9));
  }
  ASSERT_EQ(masks[0].size(), masks[1].size());
  for (std::size_t i = 0; i < masks[0].size(); ++i)
    EXPECT_NEAR(masks[0][i], masks[1][i], 1e-6) << i;
}

TEST(Dropout, RefusesRatesOutsideZeroToOne) {
  Graph g;
  Value x = g.input("x", {3});
  for (double rate : {1.0, 1.5, -0.1}) {
    try {
      dropout(x, rate);
      ADD_FAILURE() << "rate " << rate << " was accepted";
    } catch (const ShapeError& e) {
      EXPECT_NE(std::string(e.what()).find(fmt::format("rate {} is outside [0, 1)", rate)),
                std::string::npos)
          << e.what();
      EXPECT_NE(std::string(e.what()).find("dropout"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(dropconnect(x, 1.0), ShapeError);
}

TEST(Dropout, GradientIsTheGradientTimesTheForwardMask) {
  Graph g;
  Value x = g.input("x", {4, 5}, DType::f64);
  Value y = dropout(x, 0.5, 2);
  Tensor fed = iota_tensor({4, 5}, DType::f64);
  GradcheckOptions options;
  options.run = training(4);
  EXPECT_TRUE(gradcheck(g, y, {{x, fed}}, options).ok);

  // dL/dx for L = Σ y equals the scaled mask, element by element.
  Value dx = grad(sum(y), {x})[0];
  Plan plan = compile(g, {y, dx});
  auto result = plan.run({{x, fed}}, training(4));
  for (std::int64_t i = 0; i < fed.numel(); ++i) {
    EXPECT_DOUBLE_EQ(result[1].at(i), result[0].at(i) / fed.at(i)) << i;
  }
}

TEST(DropConnect, MasksWeightsInTrainingAndIsTheIdentityInInference) {
  Graph g;
  Value w = g.parameter("w", Tensor::full({20, 30}, 2.0));
  Value masked = dropconnect(w, 0.25, 5);
  auto trained = run_one(g, masked, {}, training(1));
  std::size_t kept = 0;
  for (double v : trained) {
    EXPECT_TRUE(v == 0.0 || std::abs(v - 2.0 / 0.75) < 1e-6) << v;
    kept += v != 0.0;
  }
  EXPECT_GT(kept, 0u);
  EXPECT_LT(kept, 600u);
  EXPECT_EQ(run_one(g, masked, {}, inference()), std::vector<double>(600, 2.0));
}

// ---- batch_norm ---------------------------------------------------------------------------

struct BatchNormGraph {
  Graph g;
  Value x, gamma, beta, running_mean, running_var, y;
  BatchNormGraph(Shape x_shape, std::vector<double> mean0, std::vector<double> var0,
                 double gamma_value = 1.0, double beta_value = 0.0, double momentum = 0.1) {
    const std::int64_t c = x_shape[1];
    x = g.input("x", x_shape);
    gamma = g.parameter("gamma", Tensor::full({c}, gamma_value));
    beta = g.parameter("beta", Tensor::full({c}, beta_value));
    running_mean = g.parameter("running_mean", Tensor::from(mean0, {c}), false);
    running_var = g.parameter("running_var", Tensor::from(var0, {c}), false);
    y = batch_norm(x, gamma, beta, running_mean, running_var, momentum);
  }
};

Tensor random_tensor(Shape shape, std::uint64_t seed, double low, double high,
                     DType dtype = DType::f32) {
  return testing::uniform_tensor(std::move(shape), seed, low, high, dtype);
}

class BatchNormBackends : public ::testing::TestWithParam<Backend> {};

TEST_P(BatchNormBackends, TrainingNormalisesEachChannelToMeanZeroVarianceOne) {
  for (Shape shape : {Shape{16, 3}, Shape{4, 3, 5, 5}}) {
    SCOPED_TRACE(shape.str());
    BatchNormGraph bn(shape, {0, 0, 0}, {1, 1, 1});
    Tensor fed = random_tensor(shape, 3, -4.0, 10.0);
    auto y = run_one(bn.g, bn.y, {{bn.x, fed}}, training(), GetParam());
    const std::int64_t spatial = shape.rank() == 4 ? shape[2] * shape[3] : 1;
    const double count = static_cast<double>(shape[0] * spatial);
    for (std::int64_t c = 0; c < 3; ++c) {
      double total = 0.0, squares = 0.0;
      for (std::int64_t n = 0; n < shape[0]; ++n) {
        for (std::int64_t s = 0; s < spatial; ++s) {
          const double v = y[static_cast<std::size_t>((n * 3 + c) * spatial + s)];
          total += v;
          squares += v * v;
        }
      }
      EXPECT_NEAR(total / count, 0.0, 1e-5) << "channel " << c;
      EXPECT_NEAR(squares / count, 1.0, 1e-4) << "channel " << c;  // σ²/(σ² + ε) ≈ 1
    }
  }
}

TEST_P(BatchNormBackends, TrainingUpdatesRunningStatisticsInPlaceWithMomentum) {
  // Channel 0: 1, 3, 5, 7 (mean 4, unbiased variance 20/3);
  // channel 1: 2, 4, 6, 10 (mean 5.5, unbiased variance 35/3).
  BatchNormGraph bn({4, 2}, {1.0, -1.0}, {2.0, 0.5});
  Tensor fed = Tensor::from({1, 2, 3, 4, 5, 6, 7, 10}, {4, 2});
  run_one(bn.g, bn.y, {{bn.x, fed}}, training(), GetParam());
  auto mean = bn.g.value_of(bn.running_mean).to_doubles();
  auto var = bn.g.value_of(bn.running_var).to_doubles();
  EXPECT_NEAR(mean[0], 0.9 * 1.0 + 0.1 * 4.0, 1e-6);
  EXPECT_NEAR(mean[1], 0.9 * -1.0 + 0.1 * 5.5, 1e-6);
  EXPECT_NEAR(var[0], 0.9 * 2.0 + 0.1 * 20.0 / 3.0, 1e-5);
  EXPECT_NEAR(var[1], 0.9 * 0.5 + 0.1 * 35.0 / 3.0, 1e-5);
}

TEST_P(BatchNormBackends, InferenceUsesRunningStatisticsAndLeavesThemAlone) {
  BatchNormGraph bn({2, 2}, {1.0, -2.0}, {3.0, 0.25}, /*gamma=*/2.0, /*beta=*/0.5);
  Tensor fed = Tensor::from({1, 0, 5, 2}, {2, 2});
  auto y = run_one(bn.g, bn.y, {{bn.x, fed}}, inference(), GetParam());
  const double eps = 1e-5;
  EXPECT_NEAR(y[0], 2.0 * (1 - 1.0) / std::sqrt(3.0 + eps) + 0.5, 1e-5);
  EXPECT_NEAR(y[1], 2.0 * (0 + 2.0) / std::sqrt(0.25 + eps) + 0.5, 1e-5);
  EXPECT_NEAR(y[2], 2.0 * (5 - 1.0) / std::sqrt(3.0 + eps) + 0.5, 1e-5);
  EXPECT_NEAR(y[3], 2.0 * (2 + 2.0) / std::sqrt(0.25 + eps) + 0.5, 1e-5);
  EXPECT_EQ(bn.g.value_of(bn.running_mean).to_doubles(), (std::vector<double>{1.0, -2.0}));
  EXPECT_EQ(bn.g.value_of(bn.running_var).to_doubles(), (std::vector<double>{3.0, 0.25}));
}

TEST_P(BatchNormBackends, ABatchOfOneRefusesTrainingButRunsInInference) {
  BatchNormGraph bn({1, 3}, {0, 0, 0}, {1, 1, 1});
  Feeds feeds{{bn.x, Tensor::from({1, 2, 3}, {1, 3})}};
  try {
    run_one(bn.g, bn.y, feeds, training(), GetParam());
    ADD_FAILURE() << "training on a batch of one was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("batch_norm"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("more than one value per channel"), std::string::npos)
        << e.what();
  }
  EXPECT_EQ(bn.g.value_of(bn.running_mean).to_doubles(), std::vector<double>(3, 0.0));
  auto y = run_one(bn.g, bn.y, feeds, inference(), GetParam());
  for (int c = 0; c < 3; ++c)
    EXPECT_NEAR(y[static_cast<std::size_t>(c)], (c + 1) / std::sqrt(1 + 1e-5), 1e-5);

  // One image with several pixels has N·H·W > 1: training works.
  BatchNormGraph image({1, 2, 2, 2}, {0, 0}, {1, 1});
  auto z =
      run_one(image.g, image.y, {{image.x, iota_tensor({1, 2, 2, 2})}}, training(), GetParam());
  EXPECT_NEAR(z[0] + z[1] + z[2] + z[3], 0.0, 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Backends, BatchNormBackends,
                         ::testing::Values(Backend::onednn, Backend::reference),
                         [](const auto& info) {
                           return info.param == Backend::onednn ? "onednn" : "reference";
                         });

// x, gamma, beta, running_mean, running_var as f64 inputs, for gradcheck.
struct BatchNormF64 {
  Graph g;
  std::vector<Value> inputs;
  Feeds feeds;
  Value y;
  explicit BatchNormF64(Shape shape) {
    const std::int64_t c = shape[1];
    const Shape channel{c};
    const std::vector<std::pair<Shape, std::pair<double, double>>> specs{{shape, {-2, 2}},
                                                                         {channel, {0.5, 1.5}},
                                                                         {channel, {-1, 1}},
                                                                         {channel, {-1, 1}},
                                                                         {channel, {0.5, 1.5}}};
    const char* names[] = {"x", "gamma", "beta", "running_mean", "running_var"};
    for (std::size_t i = 0; i < specs.size(); ++i) {
      Value v = g.input(names[i], specs[i].first, DType::f64);
      inputs.push_back(v);
      feeds.emplace_back(v, random_tensor(specs[i].first, 20 + i, specs[i].second.first,
                                          specs[i].second.second, DType::f64));
    }
    y = batch_norm(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4]);
  }
};

TEST(BatchNorm, GradientsMatchCentralDifferencesInTrainingAndInference) {
  for (Shape shape : {Shape{5, 3}, Shape{2, 2, 3, 2}}) {
    for (bool is_training : {true, false}) {
      SCOPED_TRACE(fmt::format("{} training={}", shape, is_training));
      BatchNormF64 bn(shape);
      GradcheckOptions options;
      options.run = RunOptions{.training = is_training, .seed = 0};
      GradcheckResult result = gradcheck(bn.g, bn.y, bn.feeds, options);
      EXPECT_TRUE(result.ok) << result.report();
      EXPECT_EQ(result.elements_checked, static_cast<std::size_t>(shape.numel() + 4 * shape[1]));
    }
  }
}

// The registry compares kernels on small channel counts; this covers inference and images whose
// channels fill whole blocks of 8 and 16 (the layouts oneDNN's kernels used to reorder to; the
// onednn slot now holds dagrad's own loops), in both modes, forward and backward.
TEST(BatchNorm, FastKernelsMatchReferenceWithFewAndManyChannels) {
  for (const Shape& shape : {Shape{3, 4, 2, 2}, Shape{3, 16, 3, 5}}) {
    for (bool training : {false, true}) {
      const std::int64_t c = shape[1];
      Graph g;
      Value x = g.input("x", shape);
      Value gamma = g.input("gamma", {c});
      Value beta = g.input("beta", {c});
      Value mean = g.input("mean", {c});
      Value var = g.input("var", {c});
      Value y = batch_norm(x, gamma, beta, mean, var);
      Value loss = sum(mul(y, g.constant(random_tensor(shape, 5, -1, 1))));
      auto grads = grad(loss, {x, gamma, beta, mean, var});
      // Fresh running statistics for each plan: training updates them in place.
      auto feeds = [&] {
        return Feeds{{x, random_tensor(shape, 1, -2, 2)},
                     {gamma, random_tensor({c}, 2, 0.5, 1.5)},
                     {beta, random_tensor({c}, 3, -1, 1)},
                     {mean, random_tensor({c}, 4, -1, 1)},
                     {var, random_tensor({c}, 6, 0.5, 1.5)}};
      };
      std::vector<Value> outputs{y};
      outputs.insert(outputs.end(), grads.begin(), grads.end());
      Plan onednn = compile(g, outputs);
      Plan reference = compile(g, outputs, {.backend = Backend::reference});
      const RunOptions options{.training = training};
      const Feeds onednn_feeds = feeds(), reference_feeds = feeds();
      auto actual = onednn.run(onednn_feeds, options);
      auto expected = reference.run(reference_feeds, options);
      EXPECT_GE(onednn.num_onednn_steps(), 2u);  // forward and backward batch norm
      for (std::size_t k = 0; k < expected.size(); ++k) {
        for (std::int64_t i = 0; i < expected[k].numel(); ++i) {
          EXPECT_NEAR(actual[k].at(i), expected[k].at(i), 1e-4 * (1 + std::abs(expected[k].at(i))))
              << shape.str() << (training ? " training" : " inference") << " output " << k
              << " element " << i;
        }
      }
      for (int k : {3, 4}) {  // the running statistics, updated in training
        for (std::int64_t i = 0; i < c; ++i) {
          EXPECT_NEAR(onednn_feeds[static_cast<std::size_t>(k)].second.at(i),
                      reference_feeds[static_cast<std::size_t>(k)].second.at(i), 1e-5)
              << shape.str() << " running statistic " << k;
        }
      }
      // In inference the gradient in x is γ dy / √(var + ε): not zero, independent of the batch.
      if (!training) {
        EXPECT_NE(expected[1].at(0), 0.0);
      }
    }
  }
}

// The backward reads the statistics the forward saved: batch_norm_grad's inputs 5 and 6 are
// batch_norm's outputs 1 and 2, and no node of the gradient computes a mean of x.
TEST(BatchNorm, BackwardReadsTheStatisticsTheForwardSaved) {
  BatchNormGraph bn({4, 3, 2, 2}, {0, 0, 0}, {1, 1, 1});
  Value loss = sum(mul(bn.y, bn.y));
  const std::size_t before = bn.g.size();
  auto grads = grad(loss, {bn.x, bn.gamma, bn.beta});
  const Node& forward = bn.g.node(bn.y.node_id());
  ASSERT_EQ(forward.outputs.size(), 3u);  // y, saved mean, saved variance
  const Node* backward = nullptr;
  for (NodeId id = before; id < bn.g.size(); ++id) {
    const Node& n = bn.g.node(id);
    EXPECT_NE(n.op, "mean") << "a gradient node computes a mean";
    if (n.op == "batch_norm_grad") backward = &n;
  }
  ASSERT_NE(backward, nullptr);
  ASSERT_EQ(backward->inputs.size(), 7u);  // the saved statistics do not reach the loss
  EXPECT_EQ(backward->inputs[5], bn.g.output(forward.id, 1));
  EXPECT_EQ(backward->inputs[6], bn.g.output(forward.id, 2));
}

class BatchNormGradBackends : public ::testing::TestWithParam<Backend> {};

// batch_norm_grad given statistics that are NOT those of x must use them: a kernel that
// recomputed μ, σ² from x would give other values. Expected values from the formula in double.
TEST_P(BatchNormGradBackends, TrainingUsesTheSavedStatisticsItIsGiven) {
  for (const Shape& shape : {Shape{6, 3}, Shape{3, 16, 3, 5}}) {
    SCOPED_TRACE(shape.str());
    const std::int64_t channels = shape[1];
    Graph g;
    Value dy = g.input("dy", shape), x = g.input("x", shape);
    Value gamma = g.input("gamma", {channels});
    Value running_mean = g.input("running_mean", {channels});
    Value running_var = g.input("running_var", {channels});
    Value saved_mean = g.input("saved_mean", {channels});
    Value saved_variance = g.input("saved_variance", {channels});
    auto grads =
        batch_norm_grad(dy, x, gamma, running_mean, running_var, saved_mean, saved_variance);
    const Tensor dy_value = random_tensor(shape, 1, -1, 1), x_value = random_tensor(shape, 2, 1, 5);
    const Tensor gamma_value = random_tensor({channels}, 3, 0.5, 1.5);
    // Far from x's statistics (mean ~3, variance ~1.3).
    const Tensor mean_value = random_tensor({channels}, 4, -1, 0);
    const Tensor variance_value = random_tensor({channels}, 5, 4, 6);
    Plan plan = compile(g, grads, {.backend = GetParam()});
    auto out = plan.run({{dy, dy_value},
                         {x, x_value},
                         {gamma, gamma_value},
                         {running_mean, Tensor::full({channels}, 0.0)},
                         {running_var, Tensor::full({channels}, 1.0)},
                         {saved_mean, mean_value},
                         {saved_variance, variance_value}},
                        training());
    const std::int64_t spatial = shape.rank() == 4 ? shape[2] * shape[3] : 1;
    const double count = static_cast<double>(shape[0] * spatial);
    for (std::int64_t c = 0; c < channels; ++c) {
      const double mu = mean_value.at(c);
      const double inverse_std = 1.0 / std::sqrt(variance_value.at(c) + 1e-5);
      auto index = [&](std::int64_t n, std::int64_t s) { return (n * channels + c) * spatial + s; };
      double sum_dy = 0.0, sum_dy_xhat = 0.0;
      for (std::int64_t n = 0; n < shape[0]; ++n) {
        for (std::int64_t s = 0; s < spatial; ++s) {
          sum_dy += dy_value.at(index(n, s));
          sum_dy_xhat += dy_value.at(index(n, s)) * (x_value.at(index(n, s)) - mu) * inverse_std;
        }
      }
      EXPECT_NEAR(out[2].at(c), sum_dy, 1e-4 * (1 + std::abs(sum_dy))) << "dbeta " << c;
      EXPECT_NEAR(out[1].at(c), sum_dy_xhat, 1e-4 * (1 + std::abs(sum_dy_xhat))) << "dgamma " << c;
      for (std::int64_t n = 0; n < shape[0]; ++n) {
        for (std::int64_t s = 0; s < spatial; ++s) {
          const double xhat = (x_value.at(index(n, s)) - mu) * inverse_std;
          const double expected = gamma_value.at(c) * inverse_std / count *
                                  (count * dy_value.at(index(n, s)) - sum_dy - xhat * sum_dy_xhat);
          EXPECT_NEAR(out[0].at(index(n, s)), expected, 1e-4 * (1 + std::abs(expected)))
              << "dx at n " << n << " c " << c << " s " << s;
        }
      }
      EXPECT_EQ(out[3].at(c), 0.0);
      EXPECT_EQ(out[4].at(c), 0.0);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, BatchNormGradBackends,
                         ::testing::Values(Backend::onednn, Backend::reference),
                         [](const auto& info) {
                           return info.param == Backend::onednn ? "onednn" : "reference";
                         });

// Training on inputs far from zero mean and unit variance (mean ~6, variance ~12 per channel,
// 16 channels), forward and backward: the onednn slot's kernels against the reference ones, and
// the saved statistics against the mean and biased variance of x computed here in double.
TEST(BatchNorm, FastKernelsMatchReferenceWithFarFromStandardStatistics) {
  const Shape shape{8, 16, 6, 5};
  const std::int64_t c = shape[1];
  Graph g;
  Value x = g.input("x", shape);
  Value gamma = g.input("gamma", {c});
  Value beta = g.input("beta", {c});
  Value mean = g.input("mean", {c});
  Value var = g.input("var", {c});
  auto outputs = batch_norm_with_statistics(x, gamma, beta, mean, var);
  Value loss = sum(mul(outputs[0], g.constant(random_tensor(shape, 5, -1, 1))));
  for (const Value& v : grad(loss, {x, gamma, beta})) outputs.push_back(v);
  const Tensor x_value = random_tensor(shape, 1, 0, 12);
  auto feeds = [&] {
    return Feeds{{x, x_value},
                 {gamma, random_tensor({c}, 2, 0.5, 1.5)},
                 {beta, random_tensor({c}, 3, -1, 1)},
                 {mean, Tensor::full({c}, 0.0)},
                 {var, Tensor::full({c}, 1.0)}};
  };
  Plan onednn = compile(g, outputs);
  Plan reference = compile(g, outputs, {.backend = Backend::reference});
  auto actual = onednn.run(feeds(), training());
  auto expected = reference.run(feeds(), training());
  EXPECT_GE(onednn.num_onednn_steps(), 2u);  // forward and backward batch norm
  const char* names[] = {"y", "saved mean", "saved variance", "dx", "dgamma", "dbeta"};
  for (std::size_t k = 0; k < expected.size(); ++k) {
    for (std::int64_t i = 0; i < expected[k].numel(); ++i) {
      ASSERT_NEAR(actual[k].at(i), expected[k].at(i), 1e-4 * (1 + std::abs(expected[k].at(i))))
          << names[k] << " element " << i;
    }
  }
  const std::int64_t spatial = shape[2] * shape[3];
  const double count = static_cast<double>(shape[0] * spatial);
  for (std::int64_t ch = 0; ch < c; ++ch) {
    double total = 0.0, squares = 0.0;
    for (std::int64_t n = 0; n < shape[0]; ++n) {
      for (std::int64_t s = 0; s < spatial; ++s) total += x_value.at((n * c + ch) * spatial + s);
    }
    const double mu = total / count;
    for (std::int64_t n = 0; n < shape[0]; ++n) {
      for (std::int64_t s = 0; s < spatial; ++s) {
        const double d = x_value.at((n * c + ch) * spatial + s) - mu;
        squares += d * d;
      }
    }
    EXPECT_NEAR(actual[1].at(ch), mu, 1e-5 * mu) << "channel " << ch;
    EXPECT_NEAR(actual[2].at(ch), squares / count, 1e-5 * squares / count) << "channel " << ch;
  }
}

TEST_P(BatchNormBackends, InferenceSavesCopiesOfTheRunningStatistics) {
  Graph g;
  Value x = g.input("x", {2, 2});
  auto outputs = batch_norm_with_statistics(
      x, g.constant(Tensor::full({2}, 1.0)), g.constant(Tensor::full({2}, 0.0)),
      g.constant(Tensor::from({1.0, -2.0}, {2})), g.constant(Tensor::from({3.0, 0.25}, {2})));
  Plan plan = compile(g, outputs, {.backend = GetParam()});
  auto out = plan.run({{x, Tensor::from({1, 0, 5, 2}, {2, 2})}}, inference());
  EXPECT_EQ(out[1].to_doubles(), (std::vector<double>{1.0, -2.0}));
  EXPECT_EQ(out[2].to_doubles(), (std::vector<double>{3.0, 0.25}));
}

// batch_norm and batch_norm_grad's own f32 loops (the onednn slot) against the reference kernels,
// on shapes that leave every vector remainder (planes of 63 and 784 floats, 67 channels of
// [N, C]: a full block of 64 and 3 more) and on data far from standard (mean ~5, variance ~10),
// with the gradients of all three outputs (so batch_norm_grad gets inputs 7 and 8), in training
// and inference; then the same plan on 1 and 2 threads gives the same bits.
struct BatchNormLoopCase {
  Graph g;
  Value x, gamma, beta, mean, var;
  std::vector<Value> outputs;  // y, saved mean, saved variance, dx, dγ, dβ, drunning_*
  explicit BatchNormLoopCase(const Shape& shape) {
    const std::int64_t c = shape[1];
    x = g.input("x", shape);
    gamma = g.input("gamma", {c});
    beta = g.input("beta", {c});
    mean = g.input("mean", {c});
    var = g.input("var", {c});
    outputs = batch_norm_with_statistics(x, gamma, beta, mean, var, 0.1, 1e-5);
    Value loss = add(add(sum(mul(outputs[0], g.constant(random_tensor(shape, 7, -1, 1)))),
                         sum(mul(outputs[1], g.constant(random_tensor({c}, 8, -1, 1))))),
                     sum(mul(outputs[2], g.constant(random_tensor({c}, 9, -1, 1)))));
    for (const Value& v : grad(loss, {x, gamma, beta, mean, var})) outputs.push_back(v);
  }
  // Fresh tensors on each call: training updates the running statistics in place.
  Feeds feeds() const {
    const std::int64_t c = x.shape()[1];
    return Feeds{{x, random_tensor(x.shape(), 1, -0.5, 10.5)},  // mean 5, variance ~10
                 {gamma, random_tensor({c}, 2, 0.5, 1.5)},
                 {beta, random_tensor({c}, 3, -1, 1)},
                 {mean, random_tensor({c}, 4, 3, 7)},
                 {var, random_tensor({c}, 6, 5, 15)}};
  }
};

using testing::bytes_of;

TEST(BatchNorm, OwnLoopsMatchReferenceOnEveryRemainderWithLargeStatistics) {
  const int saved_threads = num_threads();
  for (const Shape& shape : {Shape{3, 5, 7, 9}, Shape{2, 16, 28, 28}, Shape{7, 67}, Shape{2, 3}}) {
    for (bool is_training : {true, false}) {
      SCOPED_TRACE(fmt::format("{} training={}", shape, is_training));
      BatchNormLoopCase bn(shape);
      // No single-thread cut-off: the 2-thread run must really split the channels.
      Plan loops = compile(bn.g, bn.outputs, {.single_thread_below_bytes = 0});
      Plan reference = compile(bn.g, bn.outputs, {.backend = Backend::reference});
      const RunOptions options{.training = is_training};
      const Feeds loop_feeds = bn.feeds(), reference_feeds = bn.feeds();
      set_num_threads(1);
      std::vector<Tensor> actual;  // clones: the plan's next run reuses its output tensors
      for (const Tensor& t : loops.run(loop_feeds, options)) actual.push_back(t.clone());
      auto expected = reference.run(reference_feeds, options);
      int batch_norm_steps = 0;  // batch_norm and batch_norm_grad, on the onednn slot's loops
      for (const StepProfile& step : loops.profile()) {
        if (!step.op.starts_with("batch_norm")) continue;
        ++batch_norm_steps;
        EXPECT_EQ(step.kernel, "dagrad") << step.op;  // dagrad's loops in the oneDNN backend
      }
      EXPECT_EQ(batch_norm_steps, 2);
      const char* names[] = {"y",      "saved mean", "saved variance", "dx",
                             "dgamma", "dbeta",      "drunning_mean",  "drunning_var"};
      ASSERT_EQ(actual.size(), 8u);
      for (std::size_t k = 0; k < expected.size(); ++k) {
        double scale = 0.0;  // dx sums terms that cancel: compare to the output's magnitude
        for (std::int64_t i = 0; i < expected[k].numel(); ++i) {
          scale = std::max(scale, std::abs(expected[k].at(i)));
        }
        for (std::int64_t i = 0; i < expected[k].numel(); ++i) {
          ASSERT_NEAR(actual[k].at(i), expected[k].at(i),
                      2e-6 * scale + 2e-6 * std::abs(expected[k].at(i)))
              << names[k] << " element " << i;
        }
      }
      for (std::size_t k : {3u, 4u}) {  // running statistics (updated in training only)
        for (std::int64_t i = 0; i < shape[1]; ++i) {
          ASSERT_NEAR(loop_feeds[k].second.at(i), reference_feeds[k].second.at(i),
                      1e-6 * std::abs(reference_feeds[k].second.at(i)))
              << "running statistic " << k << " channel " << i;
        }
      }
      // 2 threads: the same bits as 1, outputs and running statistics.
      const Feeds parallel_feeds = bn.feeds();
      set_num_threads(2);
      auto parallel = loops.run(parallel_feeds, options);
      set_num_threads(saved_threads);
      for (std::size_t k = 0; k < actual.size(); ++k) {
        EXPECT_EQ(bytes_of(parallel[k]), bytes_of(actual[k])) << names[k] << " on 2 threads";
      }
      for (std::size_t k : {3u, 4u}) {
        EXPECT_EQ(bytes_of(parallel_feeds[k].second), bytes_of(loop_feeds[k].second))
            << "running statistic " << k << " on 2 threads";
      }
    }
  }
}

TEST(BatchNorm, RefusesMismatchedShapesNamingTheInput) {
  Graph g;
  Value x = g.input("x", {4, 3});
  Value c3 = g.input("c3", {3});
  Value c2 = g.input("c2", {2});
  try {
    batch_norm(x, c3, c3, c2, c3);
    ADD_FAILURE() << "running_mean of 2 channels was accepted";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("running_mean must be [3]"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(batch_norm(g.input("x3", {4, 3, 2}), c3, c3, c3, c3), ShapeError);
  EXPECT_THROW(batch_norm(x, c3, c3, c3, c3, /*momentum=*/-0.5), ShapeError);
}

// ---- layer_norm ---------------------------------------------------------------------------

TEST(LayerNorm, NormalisesEachRowWithKnownValues) {
  Graph g;
  Value x = g.input("x", {2, 3});
  Value gamma = g.constant(Tensor::from({1, 2, 3}, {3}));
  Value beta = g.constant(Tensor::from({0, 0, 0.5}, {3}));
  Value y = layer_norm(x, gamma, beta);
  auto values = run_one(g, y, {{x, Tensor::from({1, 2, 3, 4, 4, 4}, {2, 3})}}, inference());
  const double s = std::sqrt(2.0 / 3.0 + 1e-5);  // row 0: mean 2, biased variance 2/3
  EXPECT_NEAR(values[0], -1.0 / s, 1e-5);
  EXPECT_NEAR(values[1], 0.0, 1e-5);
  EXPECT_NEAR(values[2], 3.0 / s + 0.5, 1e-5);
  // A constant row normalises to 0: y = β.
  EXPECT_NEAR(values[3], 0.0, 1e-5);
  EXPECT_NEAR(values[4], 0.0, 1e-5);
  EXPECT_NEAR(values[5], 0.5, 1e-5);
}

TEST(LayerNorm, GradientsMatchCentralDifferences) {
  for (std::int64_t axis : {-1, 1}) {
    SCOPED_TRACE(axis);
    Graph g;
    Value x = g.input("x", {2, 3, 4}, DType::f64);
    const Shape normalized = axis == -1 ? Shape{4} : Shape{3, 4};
    Value gamma = g.input("gamma", normalized, DType::f64);
    Value beta = g.input("beta", normalized, DType::f64);
    Value y = layer_norm(x, gamma, beta, axis);
    Feeds feeds{{x, random_tensor({2, 3, 4}, 1, -2, 2, DType::f64)},
                {gamma, random_tensor(normalized, 2, 0.5, 1.5, DType::f64)},
                {beta, random_tensor(normalized, 3, -1, 1, DType::f64)}};
    GradcheckResult result = gradcheck(g, y, feeds);
    EXPECT_TRUE(result.ok) << result.report();
    GradcheckResult second = gradgradcheck(g, y, feeds, {.tolerance = 1e-5});
    EXPECT_TRUE(second.ok) << second.report();
  }
}

TEST(LayerNorm, RefusesGammaOfTheWrongShape) {
  Graph g;
  Value x = g.input("x", {2, 3, 4});
  try {
    layer_norm(x, g.input("gamma", {3}), g.input("beta", {4}));
    ADD_FAILURE() << "gamma [3] was accepted for x [2,3,4] over the last axis";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("layer_norm"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("[4]"), std::string::npos) << e.what();
  }
  EXPECT_THROW(layer_norm(x, g.input("g2", {4}), g.input("b2", {4}), 3), ShapeError);
}

// ---- penalties ----------------------------------------------------------------------------

TEST(Penalties, HaveKnownValuesAndGradients) {
  Graph g;
  Value w1 = g.parameter("w1", Tensor::from({1, -2}, {2}));
  Value w2 = g.parameter("w2", Tensor::from({0.5, -0.5, 0, 3}, {2, 2}));
  const std::vector<Value> params{w1, w2};
  Value l1 = l1_penalty(params, 0.1);
  Value l2 = l2_penalty(params, 0.2);
  Value elastic = elastic_net_penalty(params, 0.1, 0.2);
  auto l1_grads = grad(l1, params);
  auto l2_grads = grad(l2, params);
  Plan plan = compile(g, {l1, l2, elastic, l1_grads[0], l1_grads[1], l2_grads[1]});
  auto r = plan.run({});
  // Σ|w| = 1 + 2 + 0.5 + 0.5 + 0 + 3 = 7; Σw² = 1 + 4 + 0.25 + 0.25 + 0 + 9 = 14.5.
  EXPECT_NEAR(r[0].item(), 0.1 * 7.0, 1e-6);
  EXPECT_NEAR(r[1].item(), 0.2 / 2 * 14.5, 1e-6);
  EXPECT_NEAR(r[2].item(), 0.1 * 7.0 + 0.2 / 2 * 14.5, 1e-6);
  // d(λΣ|w|)/dw = λ sign(w), 0 at w = 0; d(λ/2 Σw²)/dw = λ w.
  EXPECT_EQ(r[3].to_doubles().size(), 2u);
  EXPECT_NEAR(r[3].at(0), 0.1, 1e-7);
  EXPECT_NEAR(r[3].at(1), -0.1, 1e-7);
  const std::vector<double> sign_w2{0.1, -0.1, 0.0, 0.1};
  for (int i = 0; i < 4; ++i)
    EXPECT_NEAR(r[4].at(i), sign_w2[static_cast<std::size_t>(i)], 1e-7) << i;
  const std::vector<double> w2_values{0.5, -0.5, 0, 3};
  for (int i = 0; i < 4; ++i)
    EXPECT_NEAR(r[5].at(i), 0.2 * w2_values[static_cast<std::size_t>(i)], 1e-6) << i;
}

TEST(Penalties, RefuseAnEmptyListOrMixedDtypes) {
  Graph g;
  EXPECT_THROW(l1_penalty({}, 0.1), GraphError);
  EXPECT_THROW(l2_penalty({g.input("a", {2}), g.input("b", {2}, DType::f64)}, 0.1), GraphError);
}

}  // namespace
}  // namespace dagrad
