// Layers, models and the Trainer: layer text, presets, parameter counts, learning on a
// synthetic problem, early stopping, resume equivalence, NaN handling, outputs on disk.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <random>

#include "dagrad.hpp"
#include "nn/checkpoint.hpp"
#include "nn/model.hpp"
#include "nn/optimizer.hpp"
#include "nn/schedule.hpp"
#include "nn/trainer.hpp"

namespace dagrad {
namespace {

// Three Gaussian blobs in 8 dimensions, one per class.
data::Dataset blobs(std::int64_t n, std::uint64_t seed, double spread = 0.6) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> noise(0.0, spread);
  data::Dataset d;
  d.num_classes = 3;
  d.images = Tensor({n, 8}, DType::f32);
  d.labels = Tensor({n}, DType::i32);
  for (std::int64_t i = 0; i < n; ++i) {
    const int c = static_cast<int>(i % 3);
    d.labels.set(i, c);
    for (int j = 0; j < 8; ++j) d.images.set(i * 8 + j, (j % 3 == c ? 1.5 : -0.5) + noise(rng));
  }
  return d;
}

ModelOptions small_options() {
  ModelOptions o;
  o.example_shape = {8};
  o.classes = 3;
  o.batch_size = 16;
  o.seed = 3;
  return o;
}

std::filesystem::path temp_dir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() / ("dagrad_trainer_" + name);
  std::filesystem::remove_all(dir);
  return dir;
}

TEST(Layers, ParseTextIntoSpecs) {
  auto layers = parse_layers("conv:32:5, relu,maxpool:2,dense:10,dropout:0.25");
  ASSERT_EQ(layers.size(), 5u);
  EXPECT_EQ(layers[0].kind, "conv");
  EXPECT_EQ(layers[0].args, (std::vector<double>{32, 5}));
  EXPECT_EQ(layers[4].args, (std::vector<double>{0.25}));
  EXPECT_EQ(layers[0].str(), "conv:32:5");
}

TEST(Layers, BadTextIsAClearError) {
  EXPECT_THROW(parse_layers("dense:10,bogus"), Error);
  EXPECT_THROW(parse_layers("dense"), Error);
  EXPECT_THROW(parse_layers("dense:1.5"), Error);
  EXPECT_THROW(parse_layers("dropout:1"), Error);
  EXPECT_THROW(parse_layers("dense:10,,relu"), Error);
  try {
    parse_layers("dense:x");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("\"x\" is not a number"), std::string::npos) << e.what();
  }
  EXPECT_THROW(preset_layers("resnet"), Error);
}

TEST(Model, MlpPresetHasTheExpectedParameterCount) {
  ModelOptions o;
  o.example_shape = {784};
  Model model(parse_layers(preset_layers("mlp")), o);
  EXPECT_EQ(model.parameter_count(), 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10);
  EXPECT_EQ(model.logits().shape(), Shape({128, 10}));
  EXPECT_NE(model.summary().find("235146"), std::string::npos) << model.summary();
}

TEST(Model, CnnPresetBuildsWithSamePadding) {
  ModelOptions o;
  o.example_shape = {1, 28, 28};
  o.batch_size = 4;
  Model model(parse_layers(preset_layers("cnn")), o);
  // conv 5×5 32 (same) → pool → conv 5×5 64 → pool → 7×7×64 → 1024 → 10
  EXPECT_EQ(model.parameter_count(),
            (32 * 25 + 32) + (64 * 32 * 25 + 64) + (7 * 7 * 64 * 1024 + 1024) + (1024 * 10 + 10));
}

TEST(Model, AStackThatDoesNotEndInTheClassesIsRefused) {
  EXPECT_THROW(Model(parse_layers("dense:5"), small_options()), Error);
}

TEST(Trainer, LearnsSeparableBlobs) {
  auto train = blobs(300, 1);
  auto validation = blobs(90, 2);
  Model model(parse_layers("dense:16,relu,dense:3"), small_options());
  Adam adam(AdamOptions{.learning_rate = 0.01});
  Trainer trainer(model, adam, nullptr, {.epochs = 8, .batch_size = 16, .seed = 5, .quiet = true});
  History history = trainer.fit(train, &validation);
  ASSERT_EQ(history.epochs.size(), 8u);
  EXPECT_LT(history.epochs.back().train_loss, 0.5 * history.epochs.front().train_loss);
  EXPECT_GT(history.epochs.back().val_accuracy, 0.95);
  Evaluation e = trainer.evaluate(validation);
  EXPECT_EQ(e.examples, 90);
  std::int64_t total = 0, diagonal = 0;
  for (int t = 0; t < 3; ++t) {
    for (int p = 0; p < 3; ++p) total += e.confusion[t][p];
    diagonal += e.confusion[t][t];
  }
  EXPECT_EQ(total, 90);
  EXPECT_NEAR(static_cast<double>(diagonal) / 90.0, e.accuracy, 1e-12);
}

TEST(Trainer, FullBatchAndOneExampleModesRun) {
  auto train = blobs(30, 1);
  for (bool full : {true, false}) {
    Model model(parse_layers("dense:3"), small_options());
    SGD sgd(SGDOptions{.learning_rate = 0.05});
    Trainer trainer(model, sgd, nullptr,
                    {.epochs = 3, .batch_size = 1, .full_batch = full, .quiet = true});
    History h = trainer.fit(train);
    EXPECT_EQ(trainer.steps(), full ? 3 : 90);
    EXPECT_LT(h.epochs.back().train_loss, h.epochs.front().train_loss);
  }
}

TEST(Trainer, EarlyStoppingRestoresTheBestWeights) {
  auto train = blobs(120, 1, 1.5);
  auto validation = blobs(60, 9, 1.5);
  Model model(parse_layers("dense:32,relu,dense:3"), small_options());
  Adam adam(AdamOptions{.learning_rate = 0.05});
  Trainer trainer(model, adam, nullptr,
                  {.epochs = 25, .batch_size = 8, .patience = 2, .quiet = true});
  History h = trainer.fit(train, &validation);
  ASSERT_GT(h.best_epoch, 0);
  const double best = h.epochs[static_cast<std::size_t>(h.best_epoch - 1)].val_loss;
  for (const auto& r : h.epochs) EXPECT_GE(r.val_loss, best);
  EXPECT_NEAR(trainer.evaluate(validation).loss, best, 1e-5);
}

// Trains 4 epochs straight, then 2 + resume + 2 in fresh models; the parameters must match bit
// for bit. `make` builds the optimiser (its state must come back from the checkpoint too).
void expect_resume_matches(const std::function<std::unique_ptr<Optimizer>()>& make,
                           const std::string& name, bool in_plan) {
  auto train = blobs(96, 1);
  auto layers = parse_layers("dense:16,relu,dropout:0.2,dense:3");
  auto dir = temp_dir("resume_" + name);
  std::vector<double> straight, resumed;
  {
    Model model(layers, small_options());
    auto optimizer = make();
    Trainer trainer(model, *optimizer, nullptr,
                    {.epochs = 4, .batch_size = 16, .seed = 2, .quiet = true});
    EXPECT_EQ(trainer.updates_in_plan(), in_plan) << name;
    trainer.fit(train);
    for (const auto& p : model.parameters()) {
      for (double v : model.graph().value_of(p).to_doubles()) straight.push_back(v);
    }
  }
  {
    Model model(layers, small_options());
    auto optimizer = make();
    Trainer trainer(
        model, *optimizer, nullptr,
        {.epochs = 2, .batch_size = 16, .seed = 2, .out_dir = dir.string(), .quiet = true});
    trainer.fit(train);
  }
  {
    Model model(layers, small_options());  // fresh weights: everything must come from the file
    auto optimizer = make();
    Trainer trainer(
        model, *optimizer, nullptr,
        {.epochs = 2, .batch_size = 16, .seed = 2, .out_dir = dir.string(), .quiet = true});
    trainer.resume((dir / "last.safetensors").string());
    EXPECT_EQ(optimizer->steps(), 12) << name;  // 2 epochs of 6 steps, from the checkpoint
    History h = trainer.fit(train);
    EXPECT_EQ(h.epochs.back().epoch, 4);
    EXPECT_EQ(h.epochs.size(), 4u);  // epochs 1-2 come back from metrics.csv
    EXPECT_EQ(optimizer->steps(), 24) << name;
    for (const auto& p : model.parameters()) {
      for (double v : model.graph().value_of(p).to_doubles()) resumed.push_back(v);
    }
  }
  ASSERT_EQ(straight.size(), resumed.size());
  for (std::size_t i = 0; i < straight.size(); ++i)
    ASSERT_EQ(straight[i], resumed[i]) << name << ", element " << i;
}

TEST(Trainer, ResumingGivesTheSameResultAsAnUninterruptedRun) {
  expect_resume_matches([] { return std::make_unique<Adam>(AdamOptions{.learning_rate = 0.01}); },
                        "adam", false);
  // Momentum runs inside the plan, which holds the velocities during fit(): they must reach the
  // checkpoint and come back from it.
  expect_resume_matches(
      [] { return std::make_unique<Momentum>(MomentumOptions{.learning_rate = 0.05}); }, "momentum",
      true);
}

TEST(Trainer, WritesCheckpointsMetricsAndTheGraph) {
  auto train = blobs(48, 1);
  auto validation = blobs(30, 2);
  auto dir = temp_dir("outputs");
  Model model(parse_layers("dense:3"), small_options());
  SGD sgd(SGDOptions{.learning_rate = 0.1});
  Trainer trainer(model, sgd, nullptr,
                  {.epochs = 3, .batch_size = 16, .out_dir = dir.string(), .quiet = true});
  trainer.fit(train, &validation);
  EXPECT_TRUE(std::filesystem::exists(dir / "last.safetensors"));
  EXPECT_TRUE(std::filesystem::exists(dir / "best.safetensors"));
  EXPECT_TRUE(std::filesystem::exists(dir / "graph.dot"));
  std::ifstream csv(dir / "metrics.csv");
  std::string header, line;
  std::getline(csv, header);
  EXPECT_EQ(
      header,
      "epoch,lr,train_loss,regularization_loss,val_loss,train_acc,val_acc,seconds,train_loss_at");
  int rows = 0;
  while (std::getline(csv, line)) {
    ++rows;
    // the training loss is placed at mid-epoch
    EXPECT_NE(line.find(fmt::format(",{:.1f}", rows - 0.5)), std::string::npos) << line;
  }
  EXPECT_EQ(rows, 3);
}

TEST(Trainer, RegularisationLossIsReportedApart) {
  auto train = blobs(48, 1);
  ModelOptions o = small_options();
  o.l2 = 0.1;
  Model model(parse_layers("dense:3"), o);
  SGD sgd(SGDOptions{.learning_rate = 0.1});
  Trainer trainer(model, sgd, nullptr, {.epochs = 1, .batch_size = 16, .quiet = true});
  History h = trainer.fit(train);
  EXPECT_GT(h.epochs[0].regularization_loss, 0.0);
}

TEST(Trainer, ANonFiniteLossStopsWithTheStepAndLearningRate) {
  auto train = blobs(32, 1);
  train.images.set(5, NAN);
  Model model(parse_layers("dense:3"), small_options());
  SGD sgd(SGDOptions{.learning_rate = 0.25});
  Trainer trainer(model, sgd, nullptr, {.epochs = 1, .batch_size = 32, .quiet = true});
  try {
    trainer.fit(train);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("step 1"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("learning rate 0.25"), std::string::npos) << e.what();
  }
}

TEST(Trainer, BadInputIsRefused) {
  Model model(parse_layers("dense:3"), small_options());
  SGD sgd;
  EXPECT_THROW(Trainer(model, sgd, nullptr, {.batch_size = 0}), Error);
  EXPECT_THROW(Trainer(model, sgd, nullptr, {.batch_size = -1}), Error);
  EXPECT_THROW(Trainer(model, sgd, nullptr, {.clip_norm = -1}), Error);
  Trainer trainer(model, sgd, nullptr, {.quiet = true});
  data::Dataset empty;
  empty.images = Tensor({0, 8}, DType::f32);
  empty.labels = Tensor({0}, DType::i32);
  empty.num_classes = 3;
  EXPECT_THROW(trainer.fit(empty), Error);
}

TEST(Trainer, ScheduleSetsTheLearningRatePerEpoch) {
  auto train = blobs(32, 1);
  Model model(parse_layers("dense:3"), small_options());
  SGD sgd(SGDOptions{.learning_rate = 0.1});
  StepDecay schedule(0.1, {1, 2}, 0.5);
  Trainer trainer(model, sgd, &schedule, {.epochs = 3, .batch_size = 16, .quiet = true});
  History h = trainer.fit(train);
  EXPECT_DOUBLE_EQ(h.epochs[0].learning_rate, 0.1);
  EXPECT_DOUBLE_EQ(h.epochs[1].learning_rate, 0.05);
  EXPECT_DOUBLE_EQ(h.epochs[2].learning_rate, 0.025);
}

// The update inside the plan (TrainerOptions::update_in_plan) against the optimiser after it:
// the same losses, parameters and optimiser state, bit for bit, with weight decay, dropout, a
// learning rate changed by a schedule and a smaller last batch (100 = 6 × 16 + 4).
TEST(Trainer, UpdateInThePlanGivesTheSameBitsAsTheOptimiserAfterIt) {
  auto train = blobs(100, 1);
  auto layers = parse_layers("dense:16,relu,dropout:0.2,dense:3");
  const std::vector<std::pair<std::string, std::function<std::unique_ptr<Optimizer>()>>> kinds{
      {"SGD",
       [] {
         return std::make_unique<SGD>(SGDOptions{.learning_rate = 0.1, .weight_decay = 1e-3});
       }},
      {"Momentum",
       [] {
         return std::make_unique<Momentum>(
             MomentumOptions{.learning_rate = 0.05, .momentum = 0.9, .weight_decay = 1e-3});
       }},
      {"Nesterov", [] {
         return std::make_unique<Nesterov>(MomentumOptions{.learning_rate = 0.05, .momentum = 0.8});
       }}};
  for (const auto& [name, make] : kinds) {
    std::vector<History> histories;
    std::vector<std::vector<Tensor>> params, states;
    std::vector<std::int64_t> steps;
    for (bool in_plan : {true, false}) {
      Model model(layers, small_options());
      auto optimizer = make();
      StepDecay schedule(optimizer->learning_rate(), {1, 2}, 0.5);
      Trainer trainer(
          model, *optimizer, &schedule,
          {.epochs = 3, .batch_size = 16, .seed = 4, .quiet = true, .update_in_plan = in_plan});
      ASSERT_EQ(trainer.updates_in_plan(), in_plan) << name;
      histories.push_back(trainer.fit(train));
      params.emplace_back();
      for (const auto& p : model.parameters()) params.back().push_back(model.graph().value_of(p));
      states.emplace_back();
      for (const auto& [slot, tensor] : optimizer->state()) states.back().push_back(tensor);
      steps.push_back(optimizer->steps());
    }
    EXPECT_EQ(steps[0], 21) << name;
    EXPECT_EQ(steps[0], steps[1]) << name;
    ASSERT_EQ(histories[0].epochs.size(), 3u);
    for (std::size_t e = 0; e < 3; ++e) {
      EXPECT_EQ(histories[0].epochs[e].train_loss, histories[1].epochs[e].train_loss) << name;
      EXPECT_EQ(histories[0].epochs[e].train_accuracy, histories[1].epochs[e].train_accuracy);
    }
    EXPECT_LT(histories[0].epochs[2].train_loss, histories[0].epochs[0].train_loss) << name;
    // "step" and, with momentum, one velocity per parameter
    ASSERT_EQ(states[0].size(), name == "SGD" ? 1u : 1u + params[0].size()) << name;
    ASSERT_EQ(states[0].size(), states[1].size());
    for (std::size_t i = 0; i < states[0].size(); ++i) {
      EXPECT_EQ(states[0][i].to_doubles(), states[1][i].to_doubles()) << name << ", state " << i;
    }
    for (std::size_t i = 0; i < params[0].size(); ++i) {
      EXPECT_EQ(params[0][i].to_doubles(), params[1][i].to_doubles()) << name << ", param " << i;
    }
  }
}

// The same comparison on randomly drawn layer stacks (dense or convolutional, with strides,
// padding, batch norm, dropout, max and average pooling, several activations), optimisers
// (SGD, momentum, Nesterov, with and without weight decay) and batch sizes (a short last batch
// in most): the update inside the plan must leave the same bits as the optimiser after it.
TEST(Trainer, RandomStacksUpdateInThePlanGiveTheSameBits) {
  for (std::uint64_t seed = 1; seed <= 40; ++seed) {
    std::mt19937_64 rng(seed);
    auto between = [&](int low, int high) {
      return std::uniform_int_distribution<int>(low, high)(rng);
    };
    const char* activations[] = {"relu", "tanh", "leaky_relu", "gelu", "identity"};
    const bool image = between(0, 1) == 1;
    const std::int64_t channels = between(1, 3), side = between(6, 10);
    std::string text;
    if (image) {
      for (int b = between(1, 2); b > 0; --b) {
        const int kernel = between(1, 3), stride = between(1, 2);
        text += fmt::format("conv:{}:{}:{}:{},", between(1, 8), kernel, stride, kernel / 2);
        if (between(0, 3) == 0) text += "batchnorm,";
        text += fmt::format("{},", activations[between(0, 4)]);
        if (between(0, 2) == 0) text += between(0, 1) ? "maxpool:2," : "avgpool:2,";
      }
    }
    if (between(0, 1)) {
      text += fmt::format("dense:{},{},", between(1, 20), activations[between(0, 4)]);
      if (between(0, 2) == 0) text += "dropout:0.3,";
    }
    text += "dense:3";
    const std::int64_t examples = between(20, 70), batch = between(4, 17);
    SCOPED_TRACE(fmt::format("seed {}: {} ({} examples, batch {})", seed, text, examples, batch));
    data::Dataset train;
    train.num_classes = 3;
    train.images = image ? Tensor({examples, channels, side, side}, DType::f32)
                         : Tensor({examples, 8}, DType::f32);
    train.labels = Tensor({examples}, DType::i32);
    std::normal_distribution<double> normal(0.0, 1.0);
    for (std::int64_t i = 0; i < train.images.numel(); ++i) train.images.set(i, normal(rng));
    for (std::int64_t i = 0; i < examples; ++i) train.labels.set(i, between(0, 2));
    ModelOptions options = small_options();
    options.example_shape =
        image ? std::vector<std::int64_t>{channels, side, side} : std::vector<std::int64_t>{8};
    options.batch_size = batch;
    const int kind = between(0, 2);
    const double decay = between(0, 1) ? 1e-3 : 0.0;
    std::vector<History> histories;
    std::vector<std::vector<Tensor>> params, states;
    for (bool in_plan : {true, false}) {
      Model model(parse_layers(text), options);
      std::unique_ptr<Optimizer> optimizer;
      if (kind == 0) {
        optimizer = std::make_unique<SGD>(SGDOptions{.learning_rate = 0.05, .weight_decay = decay});
      } else {
        const MomentumOptions o{.learning_rate = 0.02, .momentum = 0.9, .weight_decay = decay};
        optimizer = kind == 1 ? std::unique_ptr<Optimizer>(std::make_unique<Momentum>(o))
                              : std::make_unique<Nesterov>(o);
      }
      Trainer trainer(
          model, *optimizer, nullptr,
          {.epochs = 2, .batch_size = batch, .seed = 4, .quiet = true, .update_in_plan = in_plan});
      ASSERT_EQ(trainer.updates_in_plan(), in_plan);
      histories.push_back(trainer.fit(train));
      params.emplace_back();
      for (const auto& p : model.parameters()) params.back().push_back(model.graph().value_of(p));
      states.emplace_back();
      for (const auto& [slot, tensor] : optimizer->state()) states.back().push_back(tensor);
    }
    for (std::size_t e = 0; e < 2; ++e) {
      EXPECT_EQ(histories[0].epochs[e].train_loss, histories[1].epochs[e].train_loss);
    }
    ASSERT_EQ(states[0].size(), states[1].size());
    for (std::size_t i = 0; i < states[0].size(); ++i) {
      EXPECT_EQ(states[0][i].to_doubles(), states[1][i].to_doubles()) << "state " << i;
    }
    ASSERT_EQ(params[0].size(), params[1].size());
    for (std::size_t i = 0; i < params[0].size(); ++i) {
      EXPECT_EQ(params[0][i].to_doubles(), params[1][i].to_doubles()) << "param " << i;
    }
  }
}

// on_step sees a step's loss after the plan ran; with the update in the plan that step's update
// has been applied, so stopping at step 3 leaves 3 updates (after the plan: 2, the third not
// taken). Both leave the same parameters after the same number of updates.
TEST(Trainer, OnStepStopsAfterTheUpdateWhenItRunsInThePlan) {
  auto train = blobs(96, 1);
  std::vector<std::vector<double>> params;
  for (bool in_plan : {true, false}) {
    Model model(parse_layers("dense:8,relu,dense:3"), small_options());
    Momentum momentum(MomentumOptions{.learning_rate = 0.05});
    const std::int64_t stop_at = in_plan ? 3 : 4;
    Trainer trainer(model, momentum, nullptr,
                    {.epochs = 2,
                     .batch_size = 16,
                     .quiet = true,
                     .update_in_plan = in_plan,
                     .on_step = [&](std::int64_t step, double) { return step < stop_at; }});
    ASSERT_EQ(trainer.updates_in_plan(), in_plan);
    trainer.fit(train);
    EXPECT_EQ(trainer.steps(), 3) << in_plan;
    EXPECT_EQ(momentum.steps(), 3) << in_plan;
    params.emplace_back();
    for (const auto& p : model.parameters()) {
      for (double v : model.graph().value_of(p).to_doubles()) params.back().push_back(v);
    }
  }
  EXPECT_EQ(params[0], params[1]);
}

TEST(Trainer, UpdateInThePlanOnlyWhereNothingElseNeedsTheGradients) {
  auto train = blobs(48, 1);
  struct Case {
    std::string what;
    std::function<std::unique_ptr<Optimizer>()> make;
    TrainerOptions options;
    bool in_plan;
  };
  auto sgd = [] { return std::make_unique<SGD>(SGDOptions{.learning_rate = 0.1}); };
  const TrainerOptions base{.epochs = 1, .batch_size = 16, .quiet = true};
  auto with = [&](auto change) {
    TrainerOptions o = base;
    change(o);
    return o;
  };
  const std::vector<Case> cases{
      {"SGD", sgd, base, true},
      {"Adam", [] { return std::make_unique<Adam>(); }, base, false},
      {"RMSProp", [] { return std::make_unique<RMSProp>(); }, base, false},
      {"momentum 0", [] { return std::make_unique<Momentum>(MomentumOptions{.momentum = 0}); },
       base, false},
      {"clip_norm", sgd, with([](TrainerOptions& o) { o.clip_norm = 1; }), false},
      {"clip_value", sgd, with([](TrainerOptions& o) { o.clip_value = 1; }), false},
      {"mixup", sgd, with([](TrainerOptions& o) { o.augment.mixup_alpha = 0.2; }), false},
      {"record_gradient_norm", sgd, with([](TrainerOptions& o) { o.record_gradient_norm = true; }),
       false},
      {"update_in_plan off", sgd, with([](TrainerOptions& o) { o.update_in_plan = false; }),
       false}};
  for (const auto& c : cases) {
    Model model(parse_layers("dense:3"), small_options());
    auto optimizer = c.make();
    Trainer trainer(model, *optimizer, nullptr, c.options);
    EXPECT_EQ(trainer.updates_in_plan(), c.in_plan) << c.what;
    if (c.what == "mixup") continue;  // mixup needs images, not the blobs' feature vectors
    History h = trainer.fit(train);
    // The gradient norm is recorded where asked for (or clipped by), NaN elsewhere.
    const bool recorded = c.what == "record_gradient_norm" || c.what == "clip_norm";
    EXPECT_EQ(std::isfinite(h.epochs[0].gradient_norm), recorded) << c.what;
    if (recorded) {
      EXPECT_GT(h.epochs[0].gradient_norm, 0) << c.what;
    }
  }
}

}  // namespace
}  // namespace dagrad
