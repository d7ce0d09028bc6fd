// Hyper-parameter search (grid and random) and ensembles of trained models.
//
// Search:
//   SearchSpace space;
//   space.log_uniform("learning_rate", 1e-4, 1e-1).grid("dropout", {0.0, 0.25, 0.5});
//   SearchResult result = random_search(space, 12, /*seed=*/7, [&](const Config& c) {
//     return validation_accuracy_after_training_with(c.get("learning_rate"), c.get("dropout"));
//   });
//   std::puts(result.table().c_str());  // best first
//
// A grid search runs every configuration of the cartesian product of the grid dimensions once,
// in odometer order (the last dimension added varies fastest). A random search draws each
// dimension independently: a grid dimension picks one of its values uniformly, a uniform range
// draws x ~ U[low, high], a log-uniform range draws log x ~ U[log low, log high] (the right
// prior for rates, which matter by their order of magnitude), an integer range draws uniformly
// among low..high inclusive. Draws are a function of (seed, trial index) only, so a search is
// reproducible and its first k trials do not depend on how many trials follow.
//
// Ensembles: average the class probabilities of k models and take the arg-max. Members that
// err on different examples outvote each other, so the ensemble is often more accurate than
// its average member; evaluate_ensemble reports both and their difference.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "data/dataset.hpp"
#include "graph/tensor.hpp"
#include "nn/model.hpp"
#include "nn/trainer.hpp"

namespace dagrad {

// ---------------------------------------------------------------------------------------------
// Search spaces and configurations

// One configuration: named hyper-parameter values in the order the space declares them.
struct Config {
  std::vector<std::pair<std::string, double>> values;

  bool has(std::string_view name) const;
  // The value of `name`; Error listing the names present when it is absent.
  double get(std::string_view name) const;
  double get(std::string_view name, double fallback) const;
  // "learning_rate=0.003 dropout=0.25" (integers without decimals).
  std::string str() const;
};

enum class Sampling {
  grid,         // a list of values
  uniform,      // x ~ U[low, high]
  log_uniform,  // log x ~ U[log low, log high], 0 < low <= high
  integer,      // uniform among the integers low..high
};

struct Dimension {
  std::string name;
  Sampling sampling = Sampling::grid;
  std::vector<double> values;  // grid only
  double low = 0, high = 0;    // ranges only
};

class SearchSpace {
 public:
  // Each adder throws Error naming the dimension for a duplicate or empty name, an empty or
  // non-finite value list, a bad range (low > high, a non-finite bound, log_uniform with
  // low <= 0, integer bounds that are not integers).
  SearchSpace& grid(std::string name, std::vector<double> values);
  SearchSpace& uniform(std::string name, double low, double high);
  SearchSpace& log_uniform(std::string name, double low, double high);
  SearchSpace& integer(std::string name, std::int64_t low, std::int64_t high);

  const std::vector<Dimension>& dimensions() const { return dimensions_; }
  bool empty() const { return dimensions_.empty(); }
  // Number of grid configurations (the product of the list sizes); Error when a dimension is a
  // range or the space is empty.
  std::int64_t grid_size() const;
  // Every configuration of the grid, each once, in odometer order (last dimension fastest).
  // Error when the space is empty or holds a range (a range has no finite grid).
  std::vector<Config> grid_configs() const;
  // `trials` random configurations; Error when the space is empty or trials < 1.
  std::vector<Config> random_configs(std::int64_t trials, std::uint64_t seed) const;

 private:
  void add(Dimension dimension);
  std::vector<Dimension> dimensions_;
};

// ---------------------------------------------------------------------------------------------
// Running a search

// The score the objective returns is a validation score: higher is better with
// Goal::maximize (accuracy), lower with Goal::minimize (loss). A NaN score (a diverged run)
// ranks below every other score.
enum class Goal { maximize, minimize };

struct Trial {
  std::int64_t index = 0;  // 0-based, in the order the trials ran
  Config config;
  double score = 0;
  double seconds = 0;
};

struct SearchResult {
  std::vector<Trial> trials;  // in the order they ran
  Goal goal = Goal::maximize;

  // The trials best first (ties keep their run order).
  std::vector<Trial> sorted() const;
  // The best trial; Error when there are none.
  const Trial& best() const;
  // A table of rank, trial, score, seconds and every hyper-parameter, best first; `top` > 0
  // keeps only the first `top` rows.
  std::string table(std::size_t top = 0) const;
};

using Objective = std::function<double(const Config&)>;

struct SearchOptions {
  Goal goal = Goal::maximize;
  bool verbose = false;  // print one line per finished trial
};

// Calls `objective` on every grid configuration.
SearchResult grid_search(const SearchSpace& space, const Objective& objective,
                         const SearchOptions& options = {});
// Calls `objective` on `trials` random configurations drawn with `seed`.
SearchResult random_search(const SearchSpace& space, std::int64_t trials, std::uint64_t seed,
                           const Objective& objective, const SearchOptions& options = {});

// ---------------------------------------------------------------------------------------------
// An objective that trains a Model with a Trainer and returns the validation accuracy.
//
// Hyper-parameter names it understands (any other name must appear as a placeholder in the
// layer text, or the objective throws Error naming it, so a typo is not silently ignored):
//   learning_rate, weight_decay, momentum (Momentum/Nesterov), batch_size, epochs, l1, l2,
//   dropout (the rate of every dropout layer, which must exist in the layer text),
//   and any {name} placeholder in `layers`, e.g. "dense:{hidden},relu,dense:3".
struct TrainingObjectiveOptions {
  std::string layers;              // layer text, with optional {name} placeholders
  std::string optimizer = "Adam";  // "SGD", "Momentum", "Nesterov", "AdaGrad", "RMSProp",
                                   // "Adam", "AdamW"
  double learning_rate = 1e-3;     // defaults when the configuration does not set them
  double weight_decay = 0;
  double momentum = 0.9;
  ModelOptions model;      // example_shape, classes, seed, …
  TrainerOptions trainer;  // epochs, batch_size, seed, … (quiet is forced on)
};

// Substitutes the {name} placeholders of `layers` with the configuration's values; Error
// naming the placeholder when the configuration does not have it.
std::string substitute_layers(std::string_view layers, const Config& config);

// The optimiser called `name` (see TrainingObjectiveOptions::optimizer, case-insensitive);
// Error for another name.
std::unique_ptr<Optimizer> optimizer_by_name(std::string_view name, double learning_rate,
                                             double weight_decay = 0, double momentum = 0.9);

// The objective keeps references to `train` and `validation`: they must outlive it. Every call
// builds a fresh Model (seeded by options.model.seed, so equal configurations score alike),
// trains it on `train` and returns the accuracy on `validation`; a run whose loss diverges
// (the Trainer's non-finite-loss Error) scores NaN, which ranks last.
Objective training_objective(const data::Dataset& train, const data::Dataset& validation,
                             TrainingObjectiveOptions options);

// ---------------------------------------------------------------------------------------------
// Ensembles

struct EnsembleResult {
  std::vector<double> member_accuracy;  // one per model
  double mean_member_accuracy = 0;
  double ensemble_accuracy = 0;
  Tensor probabilities;  // the averaged probabilities, f64 [N, classes]
  double gain() const { return ensemble_accuracy - mean_member_accuracy; }
  std::string str() const;  // one line per member, then the mean, the ensemble and the gain
};

// Averages k probability tensors (f32 or f64, each [N, classes]) and scores every member and
// the average against `labels` (i32 [N]). The predicted class is the arg-max (the lowest class
// index on a tie). Error for no members, members of different shapes, a rank other than 2,
// labels of another count, or a label outside [0, classes).
EnsembleResult evaluate_ensemble(std::span<const Tensor> probabilities, const Tensor& labels);
// The same with each member's Trainer::predict on `test`.
EnsembleResult evaluate_ensemble(std::span<Trainer* const> members, const data::Dataset& test);

}  // namespace dagrad
