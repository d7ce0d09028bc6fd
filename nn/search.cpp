#include "nn/search.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "data/random.hpp"
#include "graph/error.hpp"

namespace dagrad {
namespace {

// Integers print without decimals (batch_size=64), others with 4 significant digits.
std::string format_value(double value) {
  if (std::isfinite(value) && value == std::round(value) && std::abs(value) < 1e15) {
    return fmt::format("{}", static_cast<std::int64_t>(value));
  }
  return fmt::format("{:.4g}", value);
}

std::string join_names(const std::vector<std::pair<std::string, double>>& values) {
  std::string names;
  for (const auto& [name, value] : values) {
    if (!names.empty()) names += ", ";
    names += name;
  }
  return names.empty() ? "none" : names;
}

// NaN ranks below every number; otherwise by the goal.
bool better(double a, double b, Goal goal) {
  if (std::isnan(a)) return false;
  if (std::isnan(b)) return true;
  return goal == Goal::maximize ? a > b : a < b;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Config

bool Config::has(std::string_view name) const {
  return std::any_of(values.begin(), values.end(), [&](const auto& v) { return v.first == name; });
}

double Config::get(std::string_view name) const {
  for (const auto& [key, value] : values) {
    if (key == name) return value;
  }
  throw Error(
      fmt::format("config: no hyper-parameter \"{}\" (it has: {})", name, join_names(values)));
}

double Config::get(std::string_view name, double fallback) const {
  return has(name) ? get(name) : fallback;
}

std::string Config::str() const {
  std::string text;
  for (const auto& [name, value] : values)
    text += fmt::format("{}{}={}", text.empty() ? "" : " ", name, format_value(value));
  return text;
}

// ---------------------------------------------------------------------------------------------
// SearchSpace

void SearchSpace::add(Dimension dimension) {
  const std::string& name = dimension.name;
  if (name.empty()) throw Error("search space: a dimension needs a name");
  for (const auto& d : dimensions_) {
    if (d.name == name)
      throw Error(fmt::format("search space: dimension \"{}\" is declared twice", name));
  }
  if (dimension.sampling == Sampling::grid) {
    if (dimension.values.empty()) {
      throw Error(fmt::format("search space: grid dimension \"{}\" has no values", name));
    }
    for (double v : dimension.values) {
      if (!std::isfinite(v))
        throw Error(fmt::format("search space: grid dimension \"{}\" holds {}", name, v));
    }
  } else {
    const double low = dimension.low, high = dimension.high;
    if (!std::isfinite(low) || !std::isfinite(high)) {
      throw Error(fmt::format("search space: dimension \"{}\" has a non-finite bound [{}, {}]",
                              name, low, high));
    }
    if (low > high) {
      throw Error(
          fmt::format("search space: dimension \"{}\" has low {} > high {}", name, low, high));
    }
    if (dimension.sampling == Sampling::log_uniform && low <= 0) {
      throw Error(
          fmt::format("search space: log-uniform dimension \"{}\" needs 0 < low, got [{}, {}]",
                      name, low, high));
    }
  }
  dimensions_.push_back(std::move(dimension));
}

SearchSpace& SearchSpace::grid(std::string name, std::vector<double> values) {
  add({.name = std::move(name), .sampling = Sampling::grid, .values = std::move(values)});
  return *this;
}

SearchSpace& SearchSpace::uniform(std::string name, double low, double high) {
  add({.name = std::move(name), .sampling = Sampling::uniform, .low = low, .high = high});
  return *this;
}

SearchSpace& SearchSpace::log_uniform(std::string name, double low, double high) {
  add({.name = std::move(name), .sampling = Sampling::log_uniform, .low = low, .high = high});
  return *this;
}

SearchSpace& SearchSpace::integer(std::string name, std::int64_t low, std::int64_t high) {
  add({.name = std::move(name),
       .sampling = Sampling::integer,
       .low = static_cast<double>(low),
       .high = static_cast<double>(high)});
  return *this;
}

std::int64_t SearchSpace::grid_size() const {
  if (dimensions_.empty()) throw Error("grid search: the search space is empty");
  std::int64_t size = 1;
  for (const auto& d : dimensions_) {
    if (d.sampling != Sampling::grid) {
      throw Error(
          fmt::format("grid search: dimension \"{}\" is a range, which has no finite grid (use "
                      "random search or "
                      "give it a list of values)",
                      d.name));
    }
    size *= static_cast<std::int64_t>(d.values.size());
  }
  return size;
}

std::vector<Config> SearchSpace::grid_configs() const {
  const std::int64_t size = grid_size();
  std::vector<Config> configs;
  configs.reserve(static_cast<std::size_t>(size));
  std::vector<std::size_t> digit(dimensions_.size(), 0);  // odometer, last dimension fastest
  for (std::int64_t k = 0; k < size; ++k) {
    Config config;
    for (std::size_t d = 0; d < dimensions_.size(); ++d) {
      config.values.emplace_back(dimensions_[d].name, dimensions_[d].values[digit[d]]);
    }
    configs.push_back(std::move(config));
    for (std::size_t d = dimensions_.size(); d-- > 0;) {
      if (++digit[d] < dimensions_[d].values.size()) break;
      digit[d] = 0;
    }
  }
  return configs;
}

std::vector<Config> SearchSpace::random_configs(std::int64_t trials, std::uint64_t seed) const {
  if (dimensions_.empty()) throw Error("random search: the search space is empty");
  if (trials < 1)
    throw Error(fmt::format("random search: the number of trials must be >= 1, got {}", trials));
  std::vector<Config> configs;
  configs.reserve(static_cast<std::size_t>(trials));
  for (std::int64_t t = 0; t < trials; ++t) {
    // One stream per trial: trial t does not depend on how many trials are drawn.
    data::Random random(data::mix_seed(seed, static_cast<std::uint64_t>(t)));
    Config config;
    for (const auto& d : dimensions_) {
      double value = 0;
      switch (d.sampling) {
        case Sampling::grid:
          value = d.values[random.below(d.values.size())];
          break;
        case Sampling::uniform:
          value = std::clamp(d.low + random.uniform() * (d.high - d.low), d.low, d.high);
          break;
        case Sampling::log_uniform: {
          const double log_low = std::log(d.low), log_high = std::log(d.high);
          // exp(log(x)) may round just outside [low, high]; clamp back.
          value = std::clamp(std::exp(log_low + random.uniform() * (log_high - log_low)), d.low,
                             d.high);
          break;
        }
        case Sampling::integer:
          value = static_cast<double>(
              random.between(static_cast<std::int64_t>(d.low), static_cast<std::int64_t>(d.high)));
          break;
      }
      config.values.emplace_back(d.name, value);
    }
    configs.push_back(std::move(config));
  }
  return configs;
}

// ---------------------------------------------------------------------------------------------
// Running a search

std::vector<Trial> SearchResult::sorted() const {
  std::vector<Trial> order = trials;
  std::stable_sort(order.begin(), order.end(),
                   [&](const Trial& a, const Trial& b) { return better(a.score, b.score, goal); });
  return order;
}

const Trial& SearchResult::best() const {
  if (trials.empty()) throw Error("search result: no trials ran");
  const Trial* best = &trials.front();
  for (const auto& t : trials) {
    if (better(t.score, best->score, goal)) best = &t;
  }
  return *best;
}

std::string SearchResult::table(std::size_t top) const {
  const std::vector<Trial> order = sorted();
  const std::size_t rows = top == 0 ? order.size() : std::min(top, order.size());
  std::vector<std::string> names;
  if (!order.empty()) {
    for (const auto& [name, value] : order.front().config.values) names.push_back(name);
  }
  std::string text =
      fmt::format("{:>4}  {:>5}  {:>10}  {:>8}", "rank", "trial", "score", "seconds");
  for (const auto& name : names)
    text += fmt::format("  {:>{}}", name, std::max<std::size_t>(name.size(), 10));
  text += "\n";
  for (std::size_t r = 0; r < rows; ++r) {
    const Trial& t = order[r];
    text += fmt::format("{:>4}  {:>5}  {:>10.6g}  {:>8.2f}", r + 1, t.index, t.score, t.seconds);
    for (const auto& name : names) {
      text += fmt::format("  {:>{}}", format_value(t.config.get(name, NAN)),
                          std::max<std::size_t>(name.size(), 10));
    }
    text += "\n";
  }
  return text;
}

namespace {

SearchResult run_trials(const std::vector<Config>& configs, const Objective& objective,
                        const SearchOptions& options, const char* what) {
  if (!objective) throw Error(fmt::format("{}: no objective function", what));
  SearchResult result;
  result.goal = options.goal;
  for (std::size_t k = 0; k < configs.size(); ++k) {
    const auto start = std::chrono::steady_clock::now();
    const double score = objective(configs[k]);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    result.trials.push_back({static_cast<std::int64_t>(k), configs[k], score, seconds});
    if (options.verbose) {
      std::printf("%s trial %zu/%zu: score %.6g (%.2f s)  %s\n", what, k + 1, configs.size(), score,
                  seconds, configs[k].str().c_str());
      std::fflush(stdout);
    }
  }
  return result;
}

}  // namespace

SearchResult grid_search(const SearchSpace& space, const Objective& objective,
                         const SearchOptions& options) {
  return run_trials(space.grid_configs(), objective, options, "grid search");
}

SearchResult random_search(const SearchSpace& space, std::int64_t trials, std::uint64_t seed,
                           const Objective& objective, const SearchOptions& options) {
  return run_trials(space.random_configs(trials, seed), objective, options, "random search");
}

// ---------------------------------------------------------------------------------------------
// Training objective

std::string substitute_layers(std::string_view layers, const Config& config) {
  std::string text;
  std::size_t position = 0;
  while (position < layers.size()) {
    const std::size_t open = layers.find('{', position);
    if (open == std::string_view::npos) {
      text.append(layers.substr(position));
      break;
    }
    const std::size_t close = layers.find('}', open);
    if (close == std::string_view::npos) {
      throw Error(fmt::format("layers \"{}\": unclosed placeholder at position {}", layers, open));
    }
    const std::string_view name = layers.substr(open + 1, close - open - 1);
    if (!config.has(name)) {
      throw Error(fmt::format("layers \"{}\": placeholder {{{}}} is not in the configuration ({})",
                              layers, name, config.str()));
    }
    text.append(layers.substr(position, open - position));
    // Full precision (shortest round-trip form) rather than the table's 4 digits.
    const double value = config.get(name);
    text += value == std::round(value) && std::abs(value) < 1e15
                ? fmt::format("{}", static_cast<std::int64_t>(value))
                : fmt::format("{}", value);
    position = close + 1;
  }
  return text;
}

std::unique_ptr<Optimizer> optimizer_by_name(std::string_view name, double learning_rate,
                                             double weight_decay, double momentum) {
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return std::tolower(c); });
  if (lower == "sgd") return std::make_unique<SGD>(SGDOptions{learning_rate, weight_decay});
  if (lower == "momentum")
    return std::make_unique<Momentum>(MomentumOptions{learning_rate, momentum, weight_decay});
  if (lower == "nesterov")
    return std::make_unique<Nesterov>(MomentumOptions{learning_rate, momentum, weight_decay});
  if (lower == "adagrad") {
    return std::make_unique<AdaGrad>(
        AdaGradOptions{.learning_rate = learning_rate, .weight_decay = weight_decay});
  }
  if (lower == "rmsprop") {
    return std::make_unique<RMSProp>(
        RMSPropOptions{.learning_rate = learning_rate, .weight_decay = weight_decay});
  }
  if (lower == "adam") {
    return std::make_unique<Adam>(
        AdamOptions{.learning_rate = learning_rate, .weight_decay = weight_decay});
  }
  if (lower == "adamw") {
    return std::make_unique<AdamW>(
        AdamWOptions{.learning_rate = learning_rate, .weight_decay = weight_decay});
  }
  throw Error(fmt::format(
      "unknown optimizer \"{}\" (SGD, Momentum, Nesterov, AdaGrad, RMSProp, Adam, AdamW)", name));
}

Objective training_objective(const data::Dataset& train, const data::Dataset& validation,
                             TrainingObjectiveOptions options) {
  if (options.layers.empty()) throw Error("training objective: no layer text");
  options.trainer.quiet = true;
  // The datasets are captured by reference: they must outlive the objective.
  return [&train, &validation, options](const Config& config) {
    static constexpr std::string_view known[] = {
        "learning_rate", "weight_decay", "momentum", "batch_size", "epochs", "l1", "l2", "dropout"};
    for (const auto& [name, value] : config.values) {
      const bool is_known = std::find(std::begin(known), std::end(known), name) != std::end(known);
      const bool is_placeholder = options.layers.find("{" + name + "}") != std::string::npos;
      if (!is_known && !is_placeholder) {
        throw Error(
            fmt::format("training objective: hyper-parameter \"{}\" is neither known ({}) nor a "
                        "placeholder in \"{}\"",
                        name, fmt::join(known, ", "), options.layers));
      }
    }
    std::vector<LayerSpec> layers = parse_layers(substitute_layers(options.layers, config));
    if (config.has("dropout")) {
      bool found = false;
      for (auto& layer : layers) {
        if (layer.kind == "dropout") {
          layer.args.at(0) = config.get("dropout");
          found = true;
        }
      }
      if (!found) {
        throw Error(fmt::format(
            "training objective: \"dropout\" is searched but \"{}\" has no dropout layer",
            options.layers));
      }
      // Re-parse so that the rates are checked like any layer text.
      std::string text;
      for (const auto& layer : layers) {
        if (!text.empty()) text += ',';
        text += layer.str();
      }
      layers = parse_layers(text);
    }
    ModelOptions model_options = options.model;
    TrainerOptions trainer_options = options.trainer;
    model_options.l1 = config.get("l1", model_options.l1);
    model_options.l2 = config.get("l2", model_options.l2);
    if (config.has("batch_size")) {
      trainer_options.batch_size =
          static_cast<std::int64_t>(std::llround(config.get("batch_size")));
      model_options.batch_size = std::max<std::int64_t>(trainer_options.batch_size, 1);
    }
    if (config.has("epochs"))
      trainer_options.epochs = static_cast<std::int64_t>(std::llround(config.get("epochs")));
    Model model(std::move(layers), model_options);
    auto optimizer = optimizer_by_name(
        options.optimizer, config.get("learning_rate", options.learning_rate),
        config.get("weight_decay", options.weight_decay), config.get("momentum", options.momentum));
    Trainer trainer(model, *optimizer, nullptr, trainer_options);
    try {
      trainer.fit(train);
    } catch (const Error& e) {
      // A diverged run (NaN loss) is a bad configuration, not a failed search.
      if (std::string_view(e.what()).find("the loss became") != std::string_view::npos) {
        return static_cast<double>(NAN);
      }
      throw;
    }
    return trainer.evaluate(validation).accuracy;
  };
}

// ---------------------------------------------------------------------------------------------
// Ensembles

std::string EnsembleResult::str() const {
  std::string text;
  for (std::size_t k = 0; k < member_accuracy.size(); ++k) {
    text += fmt::format("model {:>2}: accuracy {:.4f}\n", k + 1, member_accuracy[k]);
  }
  text += fmt::format(
      "mean single model: {:.4f}\nensemble of {}:    {:.4f}\ngain:              {:+.4f}\n",
      mean_member_accuracy, member_accuracy.size(), ensemble_accuracy, gain());
  return text;
}

EnsembleResult evaluate_ensemble(std::span<const Tensor> probabilities, const Tensor& labels) {
  if (probabilities.empty()) throw Error("evaluate_ensemble: no members");
  const Shape& shape = probabilities.front().shape();
  if (shape.rank() != 2) {
    throw Error(fmt::format(
        "evaluate_ensemble: member 0 has shape {}, expected [examples, classes]", shape));
  }
  const std::int64_t n = shape[0], classes = shape[1];
  if (classes < 1) throw Error("evaluate_ensemble: the probabilities have no classes");
  for (std::size_t k = 0; k < probabilities.size(); ++k) {
    const Tensor& p = probabilities[k];
    if (p.shape() != shape) {
      throw Error(fmt::format("evaluate_ensemble: member {} has shape {}, member 0 has {}", k,
                              p.shape(), shape));
    }
    if (p.dtype() != DType::f32 && p.dtype() != DType::f64) {
      throw Error(fmt::format("evaluate_ensemble: member {} is not f32 or f64", k));
    }
  }
  if (labels.shape().rank() != 1 || labels.numel() != n) {
    throw Error(
        fmt::format("evaluate_ensemble: labels of shape {} for {} examples", labels.shape(), n));
  }
  std::vector<std::int64_t> label(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    const double value = labels.at(i);
    if (!(value >= 0 && value < static_cast<double>(classes)) || value != std::floor(value)) {
      throw Error(fmt::format("evaluate_ensemble: label {} of example {} is outside [0, {})", value,
                              i, classes));
    }
    label[static_cast<std::size_t>(i)] = static_cast<std::int64_t>(value);
  }

  // Arg-max of row i of `p`, the lowest index on a tie.
  auto predicted = [classes](const Tensor& p, std::int64_t i) {
    std::int64_t best = 0;
    for (std::int64_t c = 1; c < classes; ++c) {
      if (p.at(i * classes + c) > p.at(i * classes + best)) best = c;
    }
    return best;
  };
  auto accuracy = [&](const Tensor& p) {
    if (n == 0) return 0.0;
    std::int64_t right = 0;
    for (std::int64_t i = 0; i < n; ++i)
      right += predicted(p, i) == label[static_cast<std::size_t>(i)];
    return static_cast<double>(right) / static_cast<double>(n);
  };

  EnsembleResult result;
  result.probabilities = Tensor(shape, DType::f64);
  double* average = result.probabilities.data<double>();
  std::fill(average, average + n * classes, 0.0);
  const double weight = 1.0 / static_cast<double>(probabilities.size());
  for (const Tensor& p : probabilities) {
    result.member_accuracy.push_back(accuracy(p));
    for (std::int64_t j = 0; j < n * classes; ++j) average[j] += weight * p.at(j);
  }
  double sum = 0;
  for (double a : result.member_accuracy) sum += a;
  result.mean_member_accuracy = sum / static_cast<double>(result.member_accuracy.size());
  result.ensemble_accuracy = accuracy(result.probabilities);
  return result;
}

EnsembleResult evaluate_ensemble(std::span<Trainer* const> members, const data::Dataset& test) {
  if (members.empty()) throw Error("evaluate_ensemble: no members");
  std::vector<Tensor> probabilities;
  for (std::size_t k = 0; k < members.size(); ++k) {
    if (members[k] == nullptr) throw Error(fmt::format("evaluate_ensemble: member {} is null", k));
    probabilities.push_back(members[k]->predict(test).clone());
  }
  return evaluate_ensemble(probabilities, test.labels);
}

}  // namespace dagrad
