// optimizers: the same 2-16-16-3 network (tanh hidden layers), from the same initial weights, is
// trained on three interleaved spirals with each optimiser, first at a constant learning rate and
// then with a cosine decay, and the training losses are printed epoch by epoch side by side.
// Writes optimizers.csv (one column per run) and, when gnuplot is installed, optimizers.png
// into the directory given as the first argument (default: optimizers_out). Then a random
// search over Adam's learning rate and the hidden width, and an ensemble of three networks of
// the best configuration (nn/search.hpp).
//
// Every run sees the same data in the same order (the Trainer's shuffling is a function of its
// seed and the epoch) and the same initial weights (the Model's seed), so the curves differ
// only by the update rule and the schedule.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "dagrad.hpp"
#include "nn/model.hpp"
#include "nn/optimizer.hpp"
#include "nn/schedule.hpp"
#include "nn/search.hpp"
#include "nn/trainer.hpp"

using namespace dagrad;

namespace {

constexpr std::int64_t epochs = 60;
constexpr std::int64_t batch_size = 32;
constexpr std::int64_t classes = 3;

// Three spiral arms: the k-th point of arm c sits at radius r = k / n and angle
// θ = 4r + 2πc/3 (+ noise), at (r cos θ, r sin θ). Not linearly separable.
data::Dataset spirals(std::int64_t per_class, std::uint64_t seed) {
  std::mt19937_64 random(seed);
  std::normal_distribution<double> noise(0.0, 0.15);
  data::Dataset d;
  d.num_classes = classes;
  d.images = Tensor({per_class * classes, 2}, DType::f32);
  d.labels = Tensor({per_class * classes}, DType::i32);
  for (std::int64_t c = 0; c < classes; ++c) {
    for (std::int64_t k = 0; k < per_class; ++k) {
      const std::int64_t i = c * per_class + k;
      const double r = static_cast<double>(k + 1) / static_cast<double>(per_class);
      const double theta =
          4.0 * r + 2.0 * std::numbers::pi * static_cast<double>(c) / 3.0 + noise(random);
      d.images.set(2 * i, r * std::cos(theta));
      d.images.set(2 * i + 1, r * std::sin(theta));
      d.labels.set(i, static_cast<double>(c));
    }
  }
  return d;
}

struct Run {
  std::string label;
  std::vector<double> train_loss;  // per epoch
  double validation_accuracy = 0;
};

// Learning rates that suit each rule on this problem (adaptive rules take smaller ones).
double learning_rate_for(const std::string& optimizer) {
  if (optimizer == "SGD") return 0.5;
  if (optimizer == "Momentum" || optimizer == "Nesterov") return 0.1;
  if (optimizer == "AdaGrad") return 0.1;
  if (optimizer == "RMSProp") return 0.01;
  return 0.02;  // Adam, AdamW
}

Run train_one(const std::string& optimizer_name, bool cosine, const data::Dataset& train,
              const data::Dataset& validation) {
  ModelOptions model_options;
  model_options.example_shape = {2};
  model_options.classes = classes;
  model_options.batch_size = batch_size;
  model_options.seed = 11;  // the same initial weights for every run
  Model model(parse_layers("dense:16,tanh,dense:16,tanh,dense:3"), model_options);
  const double learning_rate = learning_rate_for(optimizer_name);
  auto optimizer =
      optimizer_by_name(optimizer_name, learning_rate, optimizer_name == "AdamW" ? 1e-2 : 0.0);
  CosineDecay schedule(learning_rate, epochs, learning_rate / 100);
  Trainer trainer(model, *optimizer, cosine ? &schedule : nullptr,
                  {.epochs = epochs, .batch_size = batch_size, .seed = 5, .quiet = true});
  const History history = trainer.fit(train, &validation);
  Run run{optimizer_name + (cosine ? "+cos" : ""), {}, 0};
  for (const auto& record : history.epochs) run.train_loss.push_back(record.train_loss);
  run.validation_accuracy = history.epochs.back().val_accuracy;
  return run;
}

void print_table(const std::vector<Run>& runs, std::size_t first, std::size_t count,
                 const char* title) {
  std::printf("\n%s: training loss per epoch\nepoch", title);
  for (std::size_t r = first; r < first + count; ++r) std::printf(" %12s", runs[r].label.c_str());
  std::printf("\n");
  for (std::int64_t e = 0; e < epochs; ++e) {
    std::printf("%5lld", static_cast<long long>(e + 1));
    for (std::size_t r = first; r < first + count; ++r)
      std::printf(" %12.4f", runs[r].train_loss[e]);
    std::printf("\n");
  }
  std::printf("  acc");
  for (std::size_t r = first; r < first + count; ++r)
    std::printf(" %12.3f", runs[r].validation_accuracy);
  std::printf("   (validation accuracy after the last epoch)\n");
}

bool has_gnuplot() {
  return std::system("command -v gnuplot >/dev/null 2>&1") == 0;
}

}  // namespace

int main(int argc, char** argv) {
  // The tensors hold a few hundred numbers: waking threads would cost more than they save.
  set_num_threads(1);
  const std::filesystem::path out_dir = argc > 1 ? argv[1] : "optimizers_out";
  std::filesystem::create_directories(out_dir);
  const data::Dataset train = spirals(100, 1);
  const data::Dataset validation = spirals(50, 2);
  const std::vector<std::string> names{"SGD",     "Momentum", "Nesterov", "AdaGrad",
                                       "RMSProp", "Adam",     "AdamW"};

  std::vector<Run> runs;
  for (bool cosine : {false, true}) {
    for (const auto& name : names) runs.push_back(train_one(name, cosine, train, validation));
  }
  std::printf(
      "2-16-16-3 tanh network, 3 spirals (%lld training, %lld validation points), batch %lld\n",
      static_cast<long long>(train.size()), static_cast<long long>(validation.size()),
      static_cast<long long>(batch_size));
  std::printf("learning rates:");
  for (const auto& name : names) std::printf(" %s %g", name.c_str(), learning_rate_for(name));
  std::printf(" (AdamW weight decay 0.01); cosine decays each to 1/100 over %lld epochs\n",
              static_cast<long long>(epochs));
  print_table(runs, 0, names.size(), "constant learning rate");
  print_table(runs, names.size(), names.size(), "cosine schedule");

  const std::filesystem::path csv = out_dir / "optimizers.csv";
  {
    std::ofstream out(csv);
    out << "epoch";
    for (const auto& run : runs) out << ',' << run.label;
    out << '\n';
    for (std::int64_t e = 0; e < epochs; ++e) {
      out << e + 1;
      for (const auto& run : runs) out << ',' << run.train_loss[e];
      out << '\n';
    }
  }
  std::printf("\nwrote %s\n", csv.string().c_str());
  if (has_gnuplot()) {
    const std::filesystem::path png = out_dir / "optimizers.png";
    const std::filesystem::path script = out_dir / "optimizers.gnuplot";
    const std::size_t n = names.size();
    std::ofstream(script) << "set datafile separator ','\nset key autotitle columnhead\nset grid\n"
                          << "set terminal pngcairo size 1200,500\nset output '" << png.string()
                          << "'\n"
                          << "set multiplot layout 1,2\nset logscale y\nset xlabel 'epoch'\n"
                          << "set ylabel 'training loss'\nset title 'constant learning rate'\n"
                          << "plot for [i=2:" << n + 1 << "] '" << csv.string()
                          << "' using 1:i with lines lw 2\n"
                          << "set title 'cosine schedule'\n"
                          << "plot for [i=" << n + 2 << ":" << 2 * n + 1 << "] '" << csv.string()
                          << "' using 1:i with lines lw 2\nunset multiplot\n";
    if (std::system(("gnuplot '" + script.string() + "' >/dev/null 2>&1").c_str()) == 0) {
      std::printf("wrote %s\n", png.string().c_str());
    } else {
      std::printf("gnuplot failed; the CSV remains\n");
    }
  } else {
    std::printf("gnuplot is not installed; skipping the plot\n");
  }

  // The same problem through the search toolkit: a seeded random search over Adam's learning
  // rate (log-uniform) and the hidden width, then an ensemble of the best configuration trained
  // from three different initialisations.
  SearchSpace space;
  space.log_uniform("learning_rate", 1e-3, 1e-1).grid("hidden", {8, 16, 32});
  TrainingObjectiveOptions search_options;
  search_options.layers = "dense:{hidden},tanh,dense:{hidden},tanh,dense:3";
  search_options.optimizer = "Adam";
  search_options.model.example_shape = {2};
  search_options.model.classes = classes;
  search_options.model.seed = 11;
  search_options.trainer.epochs = 20;
  search_options.trainer.batch_size = batch_size;
  const SearchResult search =
      random_search(space, 8, 2024, training_objective(train, validation, search_options));
  std::printf("\nrandom search, 8 trials of 20 epochs (score: validation accuracy)\n%s",
              search.table().c_str());

  const Config& best = search.best().config;
  std::vector<std::unique_ptr<Model>> models;
  std::vector<std::unique_ptr<Optimizer>> optimizers;
  std::vector<std::unique_ptr<Trainer>> trainers;
  std::vector<Trainer*> members;
  for (std::uint64_t seed : {1, 2, 3}) {
    ModelOptions member_options = search_options.model;
    member_options.seed = seed;
    models.push_back(std::make_unique<Model>(
        parse_layers(substitute_layers(search_options.layers, best)), member_options));
    optimizers.push_back(optimizer_by_name("Adam", best.get("learning_rate")));
    trainers.push_back(std::make_unique<Trainer>(
        *models.back(), *optimizers.back(), nullptr,
        TrainerOptions{.epochs = 10, .batch_size = batch_size, .seed = seed, .quiet = true}));
    trainers.back()->fit(train);
    members.push_back(trainers.back().get());
  }
  std::printf("\nensemble of the best configuration (%s), 3 initialisations, 10 epochs each\n%s",
              best.str().c_str(), evaluate_ensemble(members, validation).str().c_str());

  // Every rule must have lowered the loss on this problem.
  bool ok = true;
  for (const auto& run : runs) {
    if (!(run.train_loss.back() < run.train_loss.front())) {
      std::printf("%s did not lower the training loss\n", run.label.c_str());
      ok = false;
    }
  }
  std::printf("%s\n", ok ? "every optimiser lowered the training loss" : "SOME OPTIMISER FAILED");
  return ok ? 0 : 1;
}
