// Learning-rate schedules against their formulas at several points.
#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

#include "nn/optimizer.hpp"
#include "nn/schedule.hpp"

namespace dagrad {
namespace {

TEST(Schedule, ConstantIsTheBaseRateAtEveryStep) {
  ConstantSchedule schedule(0.05);
  for (std::int64_t t : {0, 1, 1000, 1000000}) EXPECT_EQ(schedule.learning_rate(t), 0.05);
}

TEST(Schedule, StepDecayMultipliesByGammaAtEachMilestone) {
  StepDecay schedule(0.1, {30, 60, 90}, 0.1);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(0), 0.1);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(29), 0.1);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(30), 0.01);  // the milestone itself is decayed
  EXPECT_DOUBLE_EQ(schedule.learning_rate(59), 0.01);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(60), 0.001);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(90), 0.0001);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(500), 0.0001);
}

TEST(Schedule, ExponentialDecaysByGammaPerEpoch) {
  ExponentialDecay schedule(0.1, 0.98);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(0), 0.1);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(1), 0.098);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(2), 0.1 * 0.98 * 0.98);
  EXPECT_NEAR(schedule.learning_rate(50), 0.1 * std::pow(0.98, 50), 1e-15);
}

TEST(Schedule, CosineGoesFromBaseToFloorOverThePeriod) {
  CosineDecay schedule(0.1, 100, 0.001);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(0), 0.1);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(50), 0.001 + 0.099 * 0.5);  // cos(π/2) = 0
  EXPECT_NEAR(schedule.learning_rate(25),
              0.001 + 0.099 * 0.5 * (1 + std::cos(std::numbers::pi / 4)), 1e-15);
  EXPECT_NEAR(schedule.learning_rate(99),
              0.001 + 0.099 * 0.5 * (1 + std::cos(0.99 * std::numbers::pi)), 1e-15);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(100), 0.001);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(1000), 0.001);
}

TEST(Schedule, LinearDecayInterpolatesToTheEndRate) {
  LinearDecay schedule(0.1, 10, 0.02);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(0), 0.1);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(5), 0.06);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(9), 0.1 - 0.08 * 0.9);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(10), 0.02);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(11), 0.02);
}

TEST(Schedule, InverseSqrtDecaysLikeOneOverRootT) {
  InverseSqrtDecay schedule(1.0, 4.0);  // η0 / √(1 + t/4)
  EXPECT_DOUBLE_EQ(schedule.learning_rate(0), 1.0);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(12), 0.5);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(60), 0.25);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(5), 1 / std::sqrt(1 + 5 / 4.0));
}

TEST(Schedule, WarmupRisesLinearlyFromZeroThenStartsTheInnerSchedule) {
  Warmup schedule(10, std::make_shared<CosineDecay>(0.1, 100));
  EXPECT_EQ(schedule.name(), "warmup+cosine");
  EXPECT_DOUBLE_EQ(schedule.learning_rate(0), 0.0);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(1), 0.01);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(5), 0.05);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(9), 0.09);
  EXPECT_DOUBLE_EQ(schedule.learning_rate(10), 0.1);   // the cosine's own step 0
  EXPECT_DOUBLE_EQ(schedule.learning_rate(60), 0.05);  // the cosine's step 50
  EXPECT_DOUBLE_EQ(schedule.learning_rate(110), 0.0);
  // Zero warm-up steps is the inner schedule itself.
  Warmup none(0, std::make_shared<ExponentialDecay>(0.1, 0.5));
  EXPECT_DOUBLE_EQ(none.learning_rate(0), 0.1);
  EXPECT_DOUBLE_EQ(none.learning_rate(2), 0.025);
}

TEST(Schedule, DrivesAnOptimiserLearningRate) {
  StepDecay schedule(0.1, {2}, 0.5);
  SGD sgd({.learning_rate = schedule.learning_rate(0)});
  std::vector<Tensor> w = {Tensor::from({1.0}, {1}, DType::f64)};
  const std::vector<Tensor> g = {Tensor::from({1.0}, {1}, DType::f64)};
  for (std::int64_t t = 0; t < 4; ++t) {
    sgd.set_learning_rate(schedule.learning_rate(t));
    sgd.step(w, g);
  }
  EXPECT_DOUBLE_EQ(w[0].at(0), 1 - 0.1 - 0.1 - 0.05 - 0.05);
}

void expect_error(const std::function<void()>& f, std::initializer_list<std::string> fragments) {
  try {
    f();
    ADD_FAILURE() << "no error raised";
  } catch (const Error& e) {
    for (const auto& fragment : fragments) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos)
          << "\"" << e.what() << "\" lacks \"" << fragment << "\"";
    }
  }
}

TEST(Schedule, StepsBeforeTheStartAreErrors) {
  expect_error([] { CosineDecay(0.1, 10).learning_rate(-1); },
               {"cosine schedule", "step -1 is before the start"});
  expect_error([] { Warmup(5, std::make_shared<ConstantSchedule>(0.1)).learning_rate(-3); },
               {"warmup+constant", "step -3"});
}

TEST(Schedule, BadParametersAreErrors) {
  expect_error([] { ConstantSchedule(0); }, {"constant schedule", "got 0"});
  expect_error([] { StepDecay(0.1, {60, 30}); }, {"step_decay", "[60, 30]"});
  expect_error([] { StepDecay(0.1, {30}, 1.5); }, {"gamma", "got 1.5"});
  expect_error([] { ExponentialDecay(0.1, 0); }, {"exponential", "gamma"});
  expect_error([] { CosineDecay(0.1, 0); }, {"cosine", "period"});
  expect_error([] { CosineDecay(0.1, 10, 0.5); }, {"floor", "got 0.5"});
  expect_error([] { LinearDecay(NAN, 10); }, {"linear", "got nan"});
  expect_error([] { InverseSqrtDecay(0.1, -1); }, {"inverse_sqrt", "scale"});
  expect_error([] { Warmup(-1, std::make_shared<ConstantSchedule>(0.1)); }, {"warm-up steps"});
  expect_error([] { Warmup(3, nullptr); }, {"warmup schedule"});
}

}  // namespace
}  // namespace dagrad
