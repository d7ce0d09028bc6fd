// dagrad-train: trains a classifier on Fashion-MNIST (or any directory holding the four
// standard IDX files) from the command line, e.g.
//   dagrad-train --model mlp --epochs 5 --batch-size 128 --optimizer adam --lr 1e-3 --out runs/mlp
// and evaluates a saved model with --eval, checks a set-up with --sanity, and sweeps learning
// rates with --find-lr.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>

#include "dagrad.hpp"
#include "data/data.hpp"
#include "nn/checkpoint.hpp"
#include "nn/model.hpp"
#include "nn/optimizer.hpp"
#include "nn/schedule.hpp"
#include "nn/trainer.hpp"

using namespace dagrad;

namespace {

struct Settings {
  std::string model = "mlp";
  std::string layers;
  std::string data_dir = std::string(data::default_fashion_mnist_dir);
  std::int64_t epochs = 5;
  std::int64_t batch_size = 128;
  std::string optimizer = "adam";
  double lr = 1e-3;
  double momentum = 0.9;
  double weight_decay = 0;
  double l1 = 0, l2 = 0;
  double dropout = -1;  // override the preset's dropout rates when >= 0
  std::string schedule = "constant";
  std::vector<std::int64_t> milestones{30, 60, 90};
  double gamma = 0.1;
  std::int64_t warmup = 0;
  bool flip = false;
  std::int64_t crop = 0, cutout = 0;
  double mixup = 0;
  double clip_norm = 0, clip_value = 0;
  std::int64_t patience = 0;
  std::uint64_t seed = 1;
  int threads = 0;
  std::string out = "runs/mlp";
  std::int64_t validation = 5000;
  std::string normalize = "unit";
  std::string eval_checkpoint;
  bool resume = false, sanity = false, find_lr = false, check_finite = false, quiet = false;
  bool profile = false;
  bool full_batch = false;
  std::int64_t train_limit = 0;  // use only the first N training examples (0: all)
};

// A learning-rate sweep: lr(t) = low · (high/low)^(t/(steps−1)), per step.
class LogSweep final : public Schedule {
 public:
  LogSweep(double low, double high, std::int64_t steps) : low_(low), high_(high), steps_(steps) {}
  std::string name() const override { return "log_sweep"; }

 protected:
  double at(std::int64_t t) const override {
    return low_ *
           std::pow(high_ / low_, static_cast<double>(t) /
                                      static_cast<double>(std::max<std::int64_t>(steps_ - 1, 1)));
  }

 private:
  double low_, high_;
  std::int64_t steps_;
};

std::unique_ptr<Optimizer> make_optimizer(const Settings& s) {
  if (s.optimizer == "sgd") return std::make_unique<SGD>(SGDOptions{s.lr, s.weight_decay});
  if (s.optimizer == "momentum")
    return std::make_unique<Momentum>(MomentumOptions{s.lr, s.momentum, s.weight_decay});
  if (s.optimizer == "nesterov")
    return std::make_unique<Nesterov>(MomentumOptions{s.lr, s.momentum, s.weight_decay});
  if (s.optimizer == "adagrad") {
    AdaGradOptions o;
    o.learning_rate = s.lr;
    o.weight_decay = s.weight_decay;
    return std::make_unique<AdaGrad>(o);
  }
  if (s.optimizer == "rmsprop") {
    RMSPropOptions o;
    o.learning_rate = s.lr;
    o.weight_decay = s.weight_decay;
    return std::make_unique<RMSProp>(o);
  }
  if (s.optimizer == "adam") {
    AdamOptions o;
    o.learning_rate = s.lr;
    o.weight_decay = s.weight_decay;
    return std::make_unique<Adam>(o);
  }
  if (s.optimizer == "adamw") {
    AdamWOptions o;
    o.learning_rate = s.lr;
    o.weight_decay = s.weight_decay;
    return std::make_unique<AdamW>(o);
  }
  throw Error(fmt::format(
      "unknown optimizer \"{}\" (sgd, momentum, nesterov, adagrad, rmsprop, adam, adamw)",
      s.optimizer));
}

std::shared_ptr<Schedule> make_schedule(const Settings& s) {
  std::shared_ptr<Schedule> schedule;
  if (s.schedule == "constant") {
    schedule = std::make_shared<ConstantSchedule>(s.lr);
  } else if (s.schedule == "step") {
    schedule = std::make_shared<StepDecay>(s.lr, s.milestones, s.gamma);
  } else if (s.schedule == "exponential") {
    schedule = std::make_shared<ExponentialDecay>(s.lr, s.gamma == 0.1 ? 0.98 : s.gamma);
  } else if (s.schedule == "cosine") {
    schedule = std::make_shared<CosineDecay>(s.lr, s.epochs);
  } else if (s.schedule == "linear") {
    schedule = std::make_shared<LinearDecay>(s.lr, s.epochs);
  } else if (s.schedule == "invsqrt") {
    schedule = std::make_shared<InverseSqrtDecay>(s.lr);
  } else {
    throw Error(fmt::format(
        "unknown schedule \"{}\" (constant, step, exponential, cosine, linear, invsqrt)",
        s.schedule));
  }
  if (s.warmup > 0) schedule = std::make_shared<Warmup>(s.warmup, schedule);
  return schedule;
}

std::vector<LayerSpec> model_layers(const Settings& s) {
  auto layers = parse_layers(s.layers.empty() ? preset_layers(s.model) : s.layers);
  if (s.dropout >= 0) {
    for (auto& l : layers) {
      if (l.kind == "dropout") l.args = {s.dropout};
    }
  }
  return layers;
}

bool needs_images(const std::vector<LayerSpec>& layers) {
  for (const auto& l : layers) {
    if (l.kind == "conv" || l.kind.find("pool") != std::string::npos) return true;
  }
  return false;
}

ModelOptions model_options(const Settings& s, const std::vector<LayerSpec>& layers,
                           const data::Dataset& train) {
  ModelOptions o;
  auto dims = train.images.shape().dims();
  o.example_shape.assign(dims.begin() + 1, dims.end());
  o.classes = train.num_classes;
  o.batch_size = std::max<std::int64_t>(s.batch_size, 1);
  o.seed = s.seed;
  o.l1 = s.l1;
  o.l2 = s.l2;
  (void)layers;
  return o;
}

int sanity_check(const Settings& s, const data::Dataset& train) {
  auto layers = model_layers(s);
  int failures = 0;
  {
    Settings plain = s;
    plain.l1 = plain.l2 = 0;
    Model model(layers, model_options(plain, layers, train));
    auto optimizer = make_optimizer(s);
    Trainer trainer(model, *optimizer, nullptr, {.quiet = true});
    std::vector<std::int64_t> first(
        static_cast<std::size_t>(std::min<std::int64_t>(2000, train.size())));
    for (std::size_t i = 0; i < first.size(); ++i) first[i] = static_cast<std::int64_t>(i);
    const double loss = trainer.evaluate(data::subset(train, first)).loss;
    const double expected = std::log(static_cast<double>(train.num_classes));
    const bool ok = std::abs(loss - expected) < 0.25 * expected;
    std::printf(
        "sanity 1: initial loss %.4f with regularisation off; ln(%lld classes) = %.4f: %s\n", loss,
        static_cast<long long>(train.num_classes), expected,
        ok ? "OK" : "FAILED (check the initialisation: weights too large or a wrong output layer)");
    failures += !ok;
  }
  {
    Settings plain = s;
    plain.l1 = plain.l2 = 0;
    const std::int64_t batches = 5;
    const std::int64_t batch = std::min<std::int64_t>(s.batch_size > 0 ? s.batch_size : 64, 64);
    std::vector<std::int64_t> tiny(static_cast<std::size_t>(batches * batch));
    for (std::size_t i = 0; i < tiny.size(); ++i) tiny[i] = static_cast<std::int64_t>(i);
    data::Dataset subset = data::subset(train, tiny);
    Model model(layers, model_options(plain, layers, subset));
    auto optimizer = make_optimizer(s);
    TrainerOptions options;
    options.epochs = 60;
    options.batch_size = batch;
    options.seed = s.seed;
    options.quiet = true;
    Trainer trainer(model, *optimizer, nullptr, options);
    History history;
    std::string trouble;
    try {
      history = trainer.fit(subset);
    } catch (const Error& e) {
      trouble = e.what();
    }
    const double accuracy = history.epochs.empty() ? 0 : history.epochs.back().train_accuracy;
    const double first_loss = history.epochs.empty() ? NAN : history.epochs.front().train_loss;
    const double last_loss = history.epochs.empty() ? NAN : history.epochs.back().train_loss;
    const bool ok = trouble.empty() && accuracy >= 0.99;
    std::printf(
        "sanity 2: overfitting %lld examples (%lld batches) for %lld epochs: loss %.4f -> %.4f, "
        "training accuracy %.4f: %s\n",
        static_cast<long long>(subset.size()), static_cast<long long>(batches),
        static_cast<long long>(options.epochs), first_loss, last_loss, accuracy,
        ok ? "OK" : "FAILED");
    if (!ok) {
      if (!trouble.empty()) {
        std::printf("  training diverged (%s): the learning rate %.3g is probably too large\n",
                    trouble.c_str(), s.lr);
      } else if (!(last_loss < 0.5 * first_loss)) {
        std::printf(
            "  the loss barely fell: the learning rate %.3g is probably too small (or the model "
            "cannot learn)\n",
            s.lr);
      } else {
        std::printf("  the loss fell but not to zero: train longer or raise the learning rate\n");
      }
    }
    failures += !ok;
  }
  return failures == 0 ? 0 : 3;
}

int find_learning_rate(const Settings& s, const data::Dataset& train) {
  auto layers = model_layers(s);
  Model model(layers, model_options(s, layers, train));
  auto optimizer = make_optimizer(s);
  const std::int64_t steps = 100;
  const double low = 1e-6, high = 1.0;
  LogSweep sweep(low, high, steps);
  std::vector<std::pair<double, double>> curve;  // (lr, smoothed loss)
  double best = INFINITY, smoothed = NAN;
  TrainerOptions options;
  options.epochs = 1;
  options.batch_size = s.batch_size;
  options.seed = s.seed;
  options.schedule_per_step = true;
  options.quiet = true;
  options.on_step = [&](std::int64_t step, double loss) {
    smoothed = std::isnan(smoothed) ? loss : 0.9 * smoothed + 0.1 * loss;
    const double lr = sweep.learning_rate(step - 1);
    curve.emplace_back(lr, smoothed);
    best = std::min(best, smoothed);
    return step < steps && std::isfinite(loss) && smoothed < 4 * best;
  };
  Trainer trainer(model, *optimizer, &sweep, options);
  std::vector<std::int64_t> used(
      static_cast<std::size_t>(std::min<std::int64_t>(train.size(), steps * s.batch_size)));
  for (std::size_t i = 0; i < used.size(); ++i) used[i] = static_cast<std::int64_t>(i);
  trainer.fit(data::subset(train, used));
  // Steepest fall of the smoothed loss per decade of learning rate.
  double steepest = 0, steepest_lr = NAN, min_loss = INFINITY, min_lr = NAN;
  for (std::size_t i = 5; i < curve.size(); ++i) {
    const double slope =
        (curve[i].second - curve[i - 5].second) / std::log10(curve[i].first / curve[i - 5].first);
    if (slope < steepest) {
      steepest = slope;
      steepest_lr = curve[i].first;
    }
    if (curve[i].second < min_loss) {
      min_loss = curve[i].second;
      min_lr = curve[i].first;
    }
  }
  std::filesystem::create_directories(s.out);
  const auto csv = std::filesystem::path(s.out) / "find_lr.csv";
  {
    std::ofstream out(csv);
    out << "lr,smoothed_loss\n";
    for (const auto& [lr, loss] : curve) out << fmt::format("{:.6g},{:.6f}\n", lr, loss);
  }
  if (std::system("command -v gnuplot >/dev/null 2>&1") == 0) {
    const auto png = std::filesystem::path(s.out) / "find_lr.png";
    std::system(
        fmt::format(
            "gnuplot -e \"set terminal png size 800,500; set output '{}'; set datafile separator "
            "','; "
            "set logscale x; set xlabel 'learning rate'; set ylabel 'smoothed loss'; set grid; "
            "plot '{}' using 1:2 skip 1 with lines title 'loss'\" >/dev/null 2>&1",
            png.string(), csv.string())
            .c_str());
    std::printf("plot: %s\n", png.string().c_str());
  }
  std::printf("learning-rate sweep over %zu steps from %.0e to %.0e (csv: %s)\n", curve.size(), low,
              high, csv.string().c_str());
  std::printf("loss falls fastest at lr %.3g; lowest loss at lr %.3g\n", steepest_lr, min_lr);
  std::printf("suggested range: %.3g to %.3g (pick near the fast-falling end)\n", steepest_lr / 3,
              min_lr / 3);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Settings s;
  CLI::App app{"dagrad-train: train a classifier on Fashion-MNIST (or MNIST-format IDX files)"};
  app.add_option("--model", s.model, "preset: mlp, cnn, cnn-bn")->capture_default_str();
  app.add_option("--layers", s.layers,
                 "layer stack instead of a preset, e.g. dense:256,relu,dense:10");
  app.add_option("--data", s.data_dir, "directory with the four IDX files (plain or .gz)")
      ->capture_default_str();
  app.add_option("--epochs", s.epochs)->capture_default_str();
  app.add_option("--batch-size", s.batch_size, "examples per step (1 = one example at a time)")
      ->capture_default_str();
  app.add_flag("--full-batch", s.full_batch, "every step uses the whole training set");
  app.add_option("--optimizer", s.optimizer,
                 "sgd, momentum, nesterov, adagrad, rmsprop, adam, adamw")
      ->capture_default_str();
  app.add_option("--lr", s.lr, "learning rate")->capture_default_str();
  app.add_option("--momentum", s.momentum)->capture_default_str();
  app.add_option("--weight-decay", s.weight_decay)->capture_default_str();
  app.add_option("--l1", s.l1, "L1 penalty on weights (reported apart)");
  app.add_option("--l2", s.l2, "L2 penalty on weights (reported apart)");
  app.add_option("--dropout", s.dropout, "override the model's dropout rates");
  app.add_option("--schedule", s.schedule, "constant, step, exponential, cosine, linear, invsqrt")
      ->capture_default_str();
  app.add_option("--milestones", s.milestones, "epochs of the step schedule")
      ->capture_default_str();
  app.add_option("--gamma", s.gamma, "decay factor of step/exponential schedules");
  app.add_option("--warmup", s.warmup, "linear warm-up epochs before the schedule");
  app.add_flag("--flip", s.flip, "augment: random horizontal flips");
  app.add_option("--crop", s.crop, "augment: random crops after padding by N pixels");
  app.add_option("--cutout", s.cutout, "augment: cutout square side");
  app.add_option("--mixup", s.mixup, "augment: mixup alpha");
  app.add_option("--clip-norm", s.clip_norm, "clip gradients to this global norm");
  app.add_option("--clip-value", s.clip_value, "clip gradient elements to +-value");
  app.add_option("--patience", s.patience, "early stopping patience in epochs (0: off)");
  app.add_option("--seed", s.seed)->capture_default_str();
  app.add_option("--threads", s.threads, "threads (0: all cores)");
  app.add_option("--out", s.out, "output directory")->capture_default_str();
  app.add_option("--validation", s.validation, "validation examples split from the training set")
      ->capture_default_str();
  app.add_option("--normalize", s.normalize, "unit ([0,1]) or standard (training mean/std)")
      ->capture_default_str();
  app.add_option("--train-limit", s.train_limit, "use only the first N training examples");
  app.add_option("--eval", s.eval_checkpoint, "evaluate a checkpoint on the test set, no training");
  app.add_flag("--resume", s.resume, "continue the run in --out from last.safetensors");
  app.add_flag("--sanity", s.sanity, "check the initial loss and overfit a tiny subset");
  app.add_flag("--find-lr", s.find_lr,
               "sweep learning rates and report where the loss falls fastest");
  app.add_flag("--check-finite", s.check_finite, "name the first op producing NaN or infinity");
  app.add_flag("--quiet", s.quiet);
  app.add_flag("--profile", s.profile, "print the time of every op of the training step");
  // A single-value option given twice takes the last value, so that defaults can be overridden
  // (scripts/demo.sh passes --epochs 15, then the user's arguments).
  for (CLI::Option* option : app.get_options()) {
    if (option->get_items_expected_max() == 1) {
      option->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
    }
  }
  CLI11_PARSE(app, argc, argv);

  try {
    set_num_threads(s.threads);
    auto layers = model_layers(s);
    const auto layout = needs_images(layers) ? data::ImageLayout::nchw : data::ImageLayout::flat;
    data::Dataset full_train = data::load_mnist_like(s.data_dir, data::Split::train, layout);
    data::Dataset test = data::load_mnist_like(s.data_dir, data::Split::test, layout);
    if (s.train_limit > 0 && s.train_limit < full_train.size()) {
      std::vector<std::int64_t> first(static_cast<std::size_t>(s.train_limit));
      for (std::size_t i = 0; i < first.size(); ++i) first[i] = static_cast<std::int64_t>(i);
      full_train = data::subset(full_train, first);
    }
    data::Normalization normalization = data::Normalization::unit_range();
    if (s.normalize == "standard") {
      data::normalize(full_train.images, normalization);
      normalization = data::Normalization::standardize(full_train.images);
      data::normalize(full_train.images, normalization);
      data::normalize(test.images, data::Normalization::unit_range());
      data::normalize(test.images, normalization);
    } else if (s.normalize == "unit") {
      data::normalize(full_train.images, normalization);
      data::normalize(test.images, normalization);
    } else {
      throw Error(fmt::format("--normalize: \"{}\" is not unit or standard", s.normalize));
    }
    if (s.sanity) return sanity_check(s, full_train);
    if (s.find_lr) return find_learning_rate(s, full_train);

    const std::int64_t validation_size =
        std::min<std::int64_t>(s.validation, full_train.size() / 5);
    auto [train, validation] =
        validation_size > 0 ? data::split_train_validation(full_train, validation_size, s.seed)
                            : std::pair<data::Dataset, data::Dataset>{full_train, data::Dataset{}};
    Model model(layers, model_options(s, layers, train));
    auto optimizer = make_optimizer(s);
    auto schedule = make_schedule(s);
    if (!s.quiet) {
      std::printf("%s", model.summary().c_str());
      std::printf("data: %lld training, %lld validation, %lld test examples from %s\n",
                  static_cast<long long>(train.size()), static_cast<long long>(validation.size()),
                  static_cast<long long>(test.size()), s.data_dir.c_str());
      std::printf("optimizer %s, lr %g, schedule %s%s, batch %lld, %d threads\n",
                  optimizer->name().c_str(), s.lr, s.schedule.c_str(),
                  s.warmup > 0 ? fmt::format(" after {} warm-up epochs", s.warmup).c_str() : "",
                  static_cast<long long>(s.batch_size), num_threads());
    }
    TrainerOptions options;
    options.epochs = s.epochs;
    options.batch_size = s.batch_size;
    options.full_batch = s.full_batch;
    options.seed = s.seed;
    options.clip_norm = s.clip_norm;
    options.clip_value = s.clip_value;
    options.patience = s.patience;
    options.out_dir = s.out;
    options.augment = {s.flip, s.crop, s.cutout, s.mixup};
    options.check_finite = s.check_finite;
    options.quiet = s.quiet;
    options.profile = s.profile;
    Trainer trainer(model, *optimizer, schedule.get(), options);
    if (!s.quiet && s.eval_checkpoint.empty() && trainer.updates_in_plan()) {
      std::printf("%s update inside the training plan (no separate pass over the gradients)\n",
                  optimizer->name().c_str());
    }
    if (!s.eval_checkpoint.empty()) {
      Checkpoint::load(s.eval_checkpoint, model.graph(), nullptr);
      Evaluation e = trainer.evaluate(test);
      std::printf("test loss %.4f, test accuracy %.4f (%lld examples)\n", e.loss, e.accuracy,
                  static_cast<long long>(e.examples));
      return 0;
    }
    if (s.resume) {
      const auto last = std::filesystem::path(s.out) / "last.safetensors";
      trainer.resume(last.string());
      if (!s.quiet) std::printf("resumed from %s\n", last.string().c_str());
    }
    History history = trainer.fit(train, validation.size() > 0 ? &validation : nullptr);
    if (s.profile) std::printf("\ntraining step profile:\n%s", trainer.profile_report().c_str());
    Evaluation e = trainer.evaluate(test);
    std::vector<std::string> names;
    if (train.num_classes == 10) {
      for (auto n : data::fashion_mnist_class_names()) names.emplace_back(n);
    }
    std::printf("\ntest loss %.4f, test accuracy %.4f (best epoch %lld)\n", e.loss, e.accuracy,
                static_cast<long long>(history.best_epoch));
    std::printf("confusion matrix (rows: true class, columns: predicted):\n%s",
                e.confusion_table(names).c_str());
    const auto out = std::filesystem::path(s.out);
    std::printf(
        "\nwritten to %s: best.safetensors, last.safetensors, metrics.csv, curves-loss.png, "
        "curves-accuracy.png, graph.dot\n",
        out.string().c_str());
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "dagrad-train: %s\n", e.what());
    return 2;
  }
}
