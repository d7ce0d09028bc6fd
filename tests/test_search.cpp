// Hyper-parameter search and ensembles: grid enumeration, reproducible random draws inside
// their ranges, the sorted results table, ensemble averaging with a known answer, and errors.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <set>
#include <sstream>

#include "dagrad.hpp"
#include "nn/search.hpp"

namespace dagrad {
namespace {

void expect_error_containing(const std::function<void()>& f, const std::string& text) {
  try {
    f();
    ADD_FAILURE() << "no Error; expected one containing \"" << text << "\"";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
  }
}

TEST(SearchSpace, GridEnumeratesTheCartesianProductOnceEach) {
  SearchSpace space;
  space.grid("learning_rate", {0.1, 0.01, 0.001})
      .grid("dropout", {0.0, 0.5})
      .grid("batch_size", {16, 32});
  EXPECT_EQ(space.grid_size(), 12);
  const std::vector<Config> configs = space.grid_configs();
  ASSERT_EQ(configs.size(), 12u);
  std::set<std::tuple<double, double, double>> seen;
  for (const Config& c : configs) {
    ASSERT_EQ(c.values.size(), 3u);
    EXPECT_EQ(c.values[0].first, "learning_rate");
    EXPECT_EQ(c.values[2].first, "batch_size");
    seen.insert({c.get("learning_rate"), c.get("dropout"), c.get("batch_size")});
  }
  EXPECT_EQ(seen.size(), 12u);  // all distinct, so each of the 12 exactly once
  for (double lr : {0.1, 0.01, 0.001}) {
    for (double p : {0.0, 0.5}) {
      for (double b : {16.0, 32.0})
        EXPECT_TRUE(seen.count({lr, p, b})) << lr << " " << p << " " << b;
    }
  }
  // Odometer order: the last dimension varies fastest.
  EXPECT_EQ(configs[0].str(), "learning_rate=0.1 dropout=0 batch_size=16");
  EXPECT_EQ(configs[1].str(), "learning_rate=0.1 dropout=0 batch_size=32");
  EXPECT_EQ(configs[2].str(), "learning_rate=0.1 dropout=0.5 batch_size=16");
  EXPECT_EQ(configs[11].str(), "learning_rate=0.001 dropout=0.5 batch_size=32");
}

TEST(SearchSpace, GridSearchCallsTheObjectiveOncePerConfiguration) {
  SearchSpace space;
  space.grid("a", {1, 2, 3}).grid("b", {10, 20});
  std::multiset<std::pair<double, double>> calls;
  SearchResult result = grid_search(space, [&](const Config& c) {
    calls.insert({c.get("a"), c.get("b")});
    return c.get("a") * c.get("b");
  });
  EXPECT_EQ(calls.size(), 6u);
  const std::set<std::pair<double, double>> distinct(calls.begin(), calls.end());
  EXPECT_EQ(distinct.size(), 6u);
  ASSERT_EQ(result.trials.size(), 6u);
  EXPECT_EQ(result.best().score, 60);
  EXPECT_EQ(result.best().config.str(), "a=3 b=20");
}

TEST(SearchSpace, RandomSearchIsReproducibleAndStaysInRange) {
  SearchSpace space;
  space.log_uniform("learning_rate", 1e-5, 1e-1)
      .uniform("dropout", 0.1, 0.6)
      .integer("hidden", 4, 9)
      .grid("batch_size", {16, 64, 256});
  const auto a = space.random_configs(400, 42);
  const auto b = space.random_configs(400, 42);
  const auto c = space.random_configs(400, 43);
  ASSERT_EQ(a.size(), 400u);
  bool differs = false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].values, b[i].values);
    differs = differs || a[i].values != c[i].values;
  }
  EXPECT_TRUE(differs) << "another seed should draw other configurations";
  // The first trials do not depend on how many are drawn.
  const auto prefix = space.random_configs(5, 42);
  for (std::size_t i = 0; i < prefix.size(); ++i) EXPECT_EQ(prefix[i].values, a[i].values);

  std::set<double> hidden, batch;
  int below_1e3 = 0;
  double log_sum = 0;
  for (const Config& config : a) {
    const double lr = config.get("learning_rate");
    EXPECT_GE(lr, 1e-5);
    EXPECT_LE(lr, 1e-1);
    if (lr < 1e-3) ++below_1e3;
    log_sum += std::log10(lr);
    EXPECT_GE(config.get("dropout"), 0.1);
    EXPECT_LE(config.get("dropout"), 0.6);
    const double h = config.get("hidden");
    EXPECT_EQ(h, std::round(h));
    EXPECT_GE(h, 4);
    EXPECT_LE(h, 9);
    hidden.insert(h);
    batch.insert(config.get("batch_size"));
  }
  // Log-uniform: log10(lr) ~ U[-5, -1], so half the draws fall below 1e-3 and the mean of
  // log10(lr) is -3 (a plain uniform draw would put ~99% above 1e-3).
  EXPECT_NEAR(below_1e3 / 400.0, 0.5, 0.1);
  EXPECT_NEAR(log_sum / 400.0, -3.0, 0.25);
  EXPECT_EQ(hidden, (std::set<double>{4, 5, 6, 7, 8, 9}));  // both ends are reachable
  EXPECT_EQ(batch, (std::set<double>{16, 64, 256}));
}

TEST(SearchSpace, RandomSearchRunsTheObjectiveOnTheDrawnConfigurations) {
  SearchSpace space;
  space.uniform("x", -2, 2);
  const auto configs = space.random_configs(7, 3);
  SearchResult result =
      random_search(space, 7, 3, [](const Config& c) { return std::pow(c.get("x") - 0.5, 2); },
                    {.goal = Goal::minimize});
  ASSERT_EQ(result.trials.size(), 7u);
  for (std::size_t i = 0; i < configs.size(); ++i) {
    EXPECT_EQ(result.trials[i].index, static_cast<std::int64_t>(i));
    EXPECT_EQ(result.trials[i].config.values, configs[i].values);
  }
  for (const Trial& t : result.trials) EXPECT_GE(t.score, result.best().score);
}

TEST(SearchResult, TableIsSortedBestFirstWithNaNLast) {
  SearchResult result;
  auto config = [](double lr) { return Config{{{"learning_rate", lr}}}; };
  result.trials = {{0, config(0.1), 0.70, 1.0},
                   {1, config(0.01), NAN, 1.0},
                   {2, config(0.001), 0.91, 1.0},
                   {3, config(0.0001), 0.85, 1.0},
                   {4, config(0.5), 0.91, 1.0}};
  const auto order = result.sorted();
  ASSERT_EQ(order.size(), 5u);
  EXPECT_EQ(order[0].index, 2);  // ties keep their run order
  EXPECT_EQ(order[1].index, 4);
  EXPECT_EQ(order[2].index, 3);
  EXPECT_EQ(order[3].index, 0);
  EXPECT_EQ(order[4].index, 1);  // NaN (a diverged run) ranks last
  EXPECT_EQ(result.best().index, 2);

  // Rows in rank order: "rank trial score seconds learning_rate".
  const std::string table = result.table();
  std::istringstream lines(table);
  std::string header, line;
  std::getline(lines, header);
  EXPECT_NE(header.find("learning_rate"), std::string::npos) << table;
  std::vector<std::int64_t> trial_column;
  std::vector<std::string> rate_column;
  while (std::getline(lines, line)) {
    std::istringstream row(line);
    std::int64_t rank = 0, trial = 0;
    std::string score, seconds, rate;
    row >> rank >> trial >> score >> seconds >> rate;
    EXPECT_EQ(rank, static_cast<std::int64_t>(trial_column.size()) + 1);
    trial_column.push_back(trial);
    rate_column.push_back(rate);
  }
  EXPECT_EQ(trial_column, (std::vector<std::int64_t>{2, 4, 3, 0, 1})) << table;
  EXPECT_EQ(rate_column, (std::vector<std::string>{"0.001", "0.5", "0.0001", "0.1", "0.01"}))
      << table;
  const std::string top2 = result.table(2);
  EXPECT_EQ(std::count(top2.begin(), top2.end(), '\n'), 3);  // header + 2 rows

  result.goal = Goal::minimize;
  EXPECT_EQ(result.sorted().front().index, 0);
  EXPECT_EQ(result.sorted().back().index, 1);  // NaN is still last
}

TEST(SearchErrors, BadSpacesAndCountsAreClearErrors) {
  expect_error_containing([] { SearchSpace().grid_configs(); }, "empty");
  expect_error_containing([] { SearchSpace().random_configs(3, 0); }, "empty");
  expect_error_containing([] { SearchSpace().uniform("x", 0, 1).random_configs(0, 0); },
                          "trials must be >= 1, got 0");
  expect_error_containing([] { SearchSpace().uniform("x", 2, 1); }, "\"x\" has low 2 > high 1");
  expect_error_containing([] { SearchSpace().log_uniform("lr", 0, 1); }, "\"lr\" needs 0 < low");
  expect_error_containing([] { SearchSpace().log_uniform("lr", -1, 1); }, "\"lr\" needs 0 < low");
  expect_error_containing([] { SearchSpace().integer("h", 5, 4); }, "low 5 > high 4");
  expect_error_containing([] { SearchSpace().grid("d", {}); }, "\"d\" has no values");
  expect_error_containing([] { SearchSpace().uniform("x", 0, NAN); }, "non-finite");
  expect_error_containing([] { SearchSpace().grid("x", {1}).grid("x", {2}); }, "declared twice");
  expect_error_containing([] { SearchSpace().grid("x", {1}).uniform("y", 0, 1).grid_configs(); },
                          "\"y\" is a range");
  expect_error_containing(
      [] {
        Config{{{"a", 1}}}.get("b");
      },
      "no hyper-parameter \"b\" (it has: a)");
  expect_error_containing([] { SearchResult().best(); }, "no trials");
  expect_error_containing([] { substitute_layers("dense:{hidden},relu", Config{}); }, "{hidden}");
  expect_error_containing([] { optimizer_by_name("adamax", 0.1); }, "unknown optimizer \"adamax\"");
}

TEST(Search, SubstitutesPlaceholdersAndMakesOptimizersByName) {
  EXPECT_EQ(substitute_layers("dense:{hidden},relu,dropout:{p},dense:3",
                              Config{{{"hidden", 16}, {"p", 0.25}}}),
            "dense:16,relu,dropout:0.25,dense:3");
  EXPECT_EQ(substitute_layers("dropout:{p}", Config{{{"p", 0.123456789}}}), "dropout:0.123456789");
  for (const char* name : {"SGD", "Momentum", "Nesterov", "AdaGrad", "RMSProp", "Adam", "AdamW"}) {
    auto optimizer = optimizer_by_name(name, 0.05, 0.001);
    EXPECT_EQ(optimizer->name(), name);
    EXPECT_EQ(optimizer->learning_rate(), 0.05);
  }
  EXPECT_EQ(optimizer_by_name("adamw", 0.1)->name(), "AdamW");
}

// ---------------------------------------------------------------------------------------------
// Ensembles

TEST(Ensemble, AveragingHandMadeProbabilitiesBeatsEveryMember) {
  // Three examples of class 0, 1, 2. Each member is confidently wrong on one example and
  // right on the other two; averaging, the two right votes outweigh the wrong one everywhere.
  const Tensor labels = Tensor::from_ints(std::vector<std::int32_t>{0, 1, 2}, {3});
  std::vector<Tensor> members{
      Tensor::from({0.1, 0.8, 0.1, /**/ 0.1, 0.7, 0.2, /**/ 0.2, 0.2, 0.6}, {3, 3}),  // wrong on 0
      Tensor::from({0.6, 0.3, 0.1, /**/ 0.2, 0.1, 0.7, /**/ 0.1, 0.2, 0.7}, {3, 3}),  // wrong on 1
      Tensor::from({0.7, 0.2, 0.1, /**/ 0.1, 0.8, 0.1, /**/ 0.9, 0.05, 0.05},
                   {3, 3}),  // wrong on 2
  };
  EnsembleResult r = evaluate_ensemble(members, labels);
  ASSERT_EQ(r.member_accuracy.size(), 3u);
  for (double a : r.member_accuracy) EXPECT_NEAR(a, 2.0 / 3.0, 1e-12);
  EXPECT_NEAR(r.mean_member_accuracy, 2.0 / 3.0, 1e-12);
  EXPECT_EQ(r.ensemble_accuracy, 1.0);
  EXPECT_NEAR(r.gain(), 1.0 / 3.0, 1e-12);
  // The average itself: row 0 = ((0.1+0.6+0.7)/3, (0.8+0.3+0.2)/3, (0.1+0.1+0.1)/3).
  EXPECT_EQ(r.probabilities.shape(), Shape({3, 3}));
  EXPECT_NEAR(r.probabilities.at(0), 1.4 / 3, 1e-6);
  EXPECT_NEAR(r.probabilities.at(1), 1.3 / 3, 1e-6);
  EXPECT_NEAR(r.probabilities.at(2), 0.3 / 3, 1e-6);
  EXPECT_NEAR(r.probabilities.at(8), 1.35 / 3, 1e-6);
  EXPECT_NE(r.str().find("gain:              +0.3333"), std::string::npos) << r.str();
}

TEST(Ensemble, OneMemberIsItsOwnEnsembleAndTiesGoToTheLowestClass) {
  const Tensor labels = Tensor::from_ints(std::vector<std::int32_t>{0, 1}, {2});
  std::vector<Tensor> one{Tensor::from({0.5, 0.5, 0.2, 0.8}, {2, 2}, DType::f64)};
  EnsembleResult r = evaluate_ensemble(one, labels);
  EXPECT_EQ(r.member_accuracy[0], 1.0);  // the tie in row 0 picks class 0
  EXPECT_EQ(r.ensemble_accuracy, 1.0);
  EXPECT_EQ(r.gain(), 0.0);
}

TEST(Ensemble, BadInputsAreClearErrors) {
  const Tensor labels = Tensor::from_ints(std::vector<std::int32_t>{0, 1}, {2});
  const Tensor p = Tensor::from({0.5, 0.5, 0.2, 0.8}, {2, 2});
  expect_error_containing([&] { evaluate_ensemble(std::span<const Tensor>{}, labels); },
                          "no members");
  expect_error_containing(
      [&] {
        evaluate_ensemble(std::vector<Tensor>{p, Tensor::from({1, 0, 0, 0, 1, 0}, {2, 3})}, labels);
      },
      "member 1 has shape [2,3], member 0 has [2,2]");
  expect_error_containing(
      [&] {
        evaluate_ensemble(std::vector<Tensor>{Tensor::from({1, 0}, {2})}, labels);
      },
      "expected [examples, classes]");
  expect_error_containing(
      [&] {
        evaluate_ensemble(std::vector<Tensor>{p},
                          Tensor::from_ints(std::vector<std::int32_t>{0}, {1}));
      },
      "for 2 examples");
  expect_error_containing(
      [&] {
        evaluate_ensemble(std::vector<Tensor>{p},
                          Tensor::from_ints(std::vector<std::int32_t>{0, 2}, {2}));
      },
      "label 2 of example 1 is outside [0, 2)");
  expect_error_containing([&] { evaluate_ensemble(std::span<Trainer* const>{}, data::Dataset{}); },
                          "no members");
}

// Three Gaussian blobs in 4 dimensions; with spread 1 they overlap enough that models disagree.
data::Dataset blobs(std::int64_t n, std::uint64_t seed, double spread = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> noise(0.0, spread);
  data::Dataset d;
  d.num_classes = 3;
  d.images = Tensor({n, 4}, DType::f32);
  d.labels = Tensor({n}, DType::i32);
  for (std::int64_t i = 0; i < n; ++i) {
    const int c = static_cast<int>(i % 3);
    d.labels.set(i, c);
    for (int j = 0; j < 4; ++j) d.images.set(i * 4 + j, (j % 3 == c ? 1.0 : 0.0) + noise(rng));
  }
  return d;
}

TEST(Ensemble, TrainersArePredictedAndAveraged) {
  const auto train = blobs(150, 1), test = blobs(90, 2);
  std::vector<std::unique_ptr<Model>> models;
  std::vector<std::unique_ptr<Adam>> optimizers;
  std::vector<std::unique_ptr<Trainer>> trainers;
  std::vector<Trainer*> members;
  std::vector<Tensor> probabilities;
  for (std::uint64_t seed = 1; seed <= 3; ++seed) {
    ModelOptions o;
    o.example_shape = {4};
    o.classes = 3;
    o.batch_size = 16;
    o.seed = seed;
    models.push_back(std::make_unique<Model>(parse_layers("dense:8,tanh,dense:3"), o));
    optimizers.push_back(std::make_unique<Adam>(AdamOptions{.learning_rate = 0.02}));
    trainers.push_back(std::make_unique<Trainer>(
        *models.back(), *optimizers.back(), nullptr,
        TrainerOptions{.epochs = 3, .batch_size = 16, .seed = seed, .quiet = true}));
    trainers.back()->fit(train);
    members.push_back(trainers.back().get());
    probabilities.push_back(trainers.back()->predict(test).clone());
  }
  EnsembleResult from_trainers = evaluate_ensemble(members, test);
  EnsembleResult from_tensors = evaluate_ensemble(probabilities, test.labels);
  ASSERT_EQ(from_trainers.member_accuracy.size(), 3u);
  for (std::size_t k = 0; k < 3; ++k) {
    EXPECT_EQ(from_trainers.member_accuracy[k], trainers[k]->evaluate(test).accuracy);
    EXPECT_EQ(from_trainers.member_accuracy[k], from_tensors.member_accuracy[k]);
  }
  EXPECT_EQ(from_trainers.ensemble_accuracy, from_tensors.ensemble_accuracy);
  EXPECT_GT(from_trainers.ensemble_accuracy, 0.5);  // three classes: chance is 1/3
}

TEST(Search, TrainingObjectiveScoresConfigurationsOnValidation) {
  const auto train = blobs(150, 3, 0.3), validation = blobs(60, 4, 0.3);
  TrainingObjectiveOptions options;
  options.layers = "dense:{hidden},relu,dropout:0.1,dense:3";
  options.model.example_shape = {4};
  options.model.classes = 3;
  options.trainer.epochs = 2;
  Objective objective = training_objective(train, validation, options);
  SearchSpace space;
  space.grid("learning_rate", {1e-6, 0.03})
      .grid("hidden", {8})
      .grid("dropout", {0.0})
      .grid("batch_size", {16});
  SearchResult result = grid_search(space, objective);
  ASSERT_EQ(result.trials.size(), 2u);
  for (const Trial& t : result.trials) {
    EXPECT_GE(t.score, 0.0);
    EXPECT_LE(t.score, 1.0);
  }
  // A learning rate of 1e-6 barely moves the weights; 0.03 learns the blobs.
  EXPECT_EQ(result.best().config.get("learning_rate"), 0.03);
  EXPECT_GT(result.best().score, 0.9) << result.table();
  EXPECT_LT(result.sorted().back().score, result.best().score) << result.table();
  // The same configuration gives the same score (seeded).
  EXPECT_EQ(objective(result.best().config), result.best().score);
  expect_error_containing(
      [&] {
        objective(Config{{{"learning_rate", 0.1}, {"hiden", 8}}});
      },
      "\"hiden\"");
}

TEST(Search, TrainingObjectiveScoresADivergedRunAsNaNAndChecksDropout) {
  const auto train = blobs(60, 5, 0.3), validation = blobs(30, 6, 0.3);
  TrainingObjectiveOptions options;
  options.layers = "dense:8,relu,dense:3";
  options.optimizer = "SGD";
  options.model.example_shape = {4};
  options.model.classes = 3;
  options.trainer.epochs = 5;
  options.trainer.batch_size = 8;
  Objective objective = training_objective(train, validation, options);
  // SGD with a learning rate of 1e30 overflows the weights at once.
  EXPECT_TRUE(std::isnan(objective(Config{{{"learning_rate", 1e30}}})));
  expect_error_containing([&] { objective(Config{{{"dropout", 0.5}}}); }, "has no dropout layer");

  options.layers = "dense:8,relu,dropout:0.1,dense:3";
  options.optimizer = "Adam";
  Objective with_dropout = training_objective(train, validation, options);
  EXPECT_GT(with_dropout(Config{{{"learning_rate", 0.03}, {"dropout", 0.3}}}), 0.9);
  // The searched rate replaces the text's and is checked like layer text.
  expect_error_containing(
      [&] {
        with_dropout(Config{{{"dropout", 1.0}}});
      },
      "dropout rate 1 is outside [0, 1)");
  expect_error_containing([] { training_objective(data::Dataset{}, data::Dataset{}, {}); },
                          "no layer text");
}

}  // namespace
}  // namespace dagrad
