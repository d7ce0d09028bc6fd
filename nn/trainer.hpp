// Trainer: the training loop a course teaches, over a Model, an Optimizer and a Schedule.
//
//   Model model(parse_layers(preset_layers("mlp")), {.example_shape = {784}});
//   Adam adam({.learning_rate = 1e-3});
//   Trainer trainer(model, adam, nullptr, {.epochs = 5, .batch_size = 128, .out_dir = "runs/mlp"});
//   History history = trainer.fit(train, &validation);
//   Evaluation test = trainer.evaluate(test_set);
//
// Each epoch: seeded shuffling (the order is a function of seed and epoch), mini-batches (or the
// full batch, or one example at a time), the optimiser step after optional gradient clipping
// (SGD, momentum and Nesterov without clipping run inside the training plan: update_in_plan),
// then validation in inference mode. The training loss is averaged over the epoch and reported
// at mid-epoch (epoch − 0.5) so that train and validation curves line up; a moving average of
// the per-step loss drives the progress line. The regularisation loss (penalties) is reported
// apart from the data loss. Early stopping watches the validation loss with a patience; with a
// validation set (or a patience) fit() ends with the weights of the best epoch. With an output
// directory, a checkpoint is written after every epoch (last.safetensors) and for the best epoch
// (best.safetensors), with metrics.csv and the loss/accuracy curves (gnuplot, when installed). All
// randomness (shuffling, dropout masks, augmentation) is a function of (seed, epoch, step), so
// resume() continues a run exactly as if it had never stopped.
//
// A NaN or infinite loss stops training with an Error naming the step and the learning rate;
// `check_finite` additionally names the first op whose output stopped being finite.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "data/dataset.hpp"
#include "nn/model.hpp"
#include "nn/optimizer.hpp"
#include "nn/schedule.hpp"
#include "runtime/plan.hpp"

namespace dagrad {

struct AugmentOptions {
  bool flip = false;              // random horizontal flip, p = 0.5
  std::int64_t crop_padding = 0;  // random crop after zero padding by this many pixels
  std::int64_t cutout = 0;        // side of a random zeroed square (0: off)
  double mixup_alpha = 0.0;       // mixup with λ ~ Beta(α, α) and soft targets (0: off)
  bool any() const { return flip || crop_padding > 0 || cutout > 0 || mixup_alpha > 0; }
};

struct TrainerOptions {
  std::int64_t epochs = 5;
  std::int64_t batch_size = 128;  // 1: one example at a time; must be >= 1
  bool full_batch = false;        // every step sees the whole training set, unshuffled
  std::uint64_t seed = 0;
  bool drop_last = false;
  bool schedule_per_step = false;  // index the schedule by step instead of by epoch
  double clip_norm = 0.0;          // clip gradients to this global norm (0: off)
  double clip_value = 0.0;         // clip each gradient element to ±value (0: off)
  std::int64_t patience = 0;       // stop after this many epochs without a better validation
                                   // loss, restoring the best weights (0: off)
  std::string out_dir;             // checkpoints, metrics.csv, curves (empty: none written)
  AugmentOptions augment;
  bool check_finite = false;
  int progress = -1;        // -1: a bar on a terminal, plain lines otherwise; 0: plain; 1: bar
  bool quiet = false;       // print nothing
  double smoothing = 0.98;  // moving average factor of the per-step loss
  std::int64_t eval_batch_size = 1000;
  bool profile = false;  // time every op of the training step (see Trainer::profile_report)
  // SGD, Momentum and Nesterov (with their weight decay) then run inside the training plan
  // (SGDUpdate, runtime/plan.hpp): the same update, bit for bit, as optimizer.step() after the
  // plan, but the gradients are never returned, a dense layer's weights are updated inside its
  // weight-gradient kernel and the separate pass over every parameter and gradient is gone
  // (bench_train trainer_epoch, bench/README.md). Used only where nothing else needs the
  // gradients: no clipping, no mixup, record_gradient_norm off. Trainer::updates_in_plan() says
  // whether it is used. The optimiser's state (step count, velocities) is kept in the plan during
  // fit() and written back to the optimiser before each checkpoint and when fit() returns.
  // Differences, when used: a step's update has been applied before on_step sees its loss, and
  // before a NaN or infinite loss stops training.
  bool update_in_plan = true;
  // Record EpochRecord::gradient_norm (a pass over every gradient each step; keeps the update out
  // of the plan). Clipping by norm records it too.
  bool record_gradient_norm = false;
  // Called after every step with the step number (1-based) and that step's data loss (which may
  // be NaN); returning false ends training after this step (used by the learning-rate finder).
  std::function<bool(std::int64_t step, double loss)> on_step;
};

struct EpochRecord {
  std::int64_t epoch = 0;  // 1-based
  double learning_rate = 0;
  double train_loss = 0;           // data loss averaged over the epoch's examples
  double regularization_loss = 0;  // averaged over the epoch's steps
  double train_accuracy = 0;
  double val_loss = NAN;
  double val_accuracy = NAN;
  double seconds = 0;
  double gradient_norm = NAN;  // mean global norm before clipping (record_gradient_norm or
                               // clip_norm; NaN otherwise)
};

struct History {
  std::vector<EpochRecord> epochs;
  std::int64_t best_epoch = 0;  // by validation loss (by training loss without validation)
  bool stopped_early = false;
  std::vector<std::pair<std::int64_t, double>> smoothed_loss;  // (step, moving average)
};

struct Evaluation {
  double loss = 0;
  double accuracy = 0;
  std::int64_t examples = 0;
  std::vector<std::vector<std::int64_t>> confusion;  // [true class][predicted class]
  std::string confusion_table(const std::vector<std::string>& class_names = {}) const;
};

class Trainer {
 public:
  // `schedule` may be null (constant learning rate: the optimiser's own).
  Trainer(Model& model, Optimizer& optimizer, const Schedule* schedule, TrainerOptions options);

  History fit(const data::Dataset& train, const data::Dataset* validation = nullptr);
  Evaluation evaluate(const data::Dataset& dataset);
  // Class probabilities (softmax of the logits) for every example, [N, classes].
  Tensor predict(const data::Dataset& dataset);
  // Loads a checkpoint written by fit() (parameters, optimiser state, position) so that the
  // next fit() continues after its epoch.
  void resume(const std::string& checkpoint_path);
  std::int64_t steps() const { return step_; }
  // Whether the optimiser's update runs inside the training plan (TrainerOptions::update_in_plan).
  bool updates_in_plan() const { return update_in_plan_; }
  // Per-op times of the training step (with TrainerOptions::profile), slowest first.
  std::string profile_report(std::size_t top = 25) { return train_plan_->profile_report(top); }

 private:
  void check_options() const;
  // The SGDUpdate of the optimiser, when TrainerOptions::update_in_plan can be honoured.
  std::optional<SGDUpdate> plan_update() const;
  // Copies the optimiser's velocities (zeros when it has none yet) into the plan, and back with
  // the step count.
  void load_plan_state();
  void store_plan_state();
  void write_outputs(const History& history) const;

  Model& model_;
  Optimizer& optimizer_;
  const Schedule* schedule_;
  TrainerOptions options_;
  std::vector<Value> grads_;
  std::vector<Value> soft_grads_;
  std::optional<Plan> train_plan_, soft_plan_, eval_plan_;
  std::int64_t start_epoch_ = 0;  // epochs already done (resume)
  std::int64_t step_ = 0;
  bool update_in_plan_ = false;
  std::int64_t plan_updates_ = 0;  // steps the plan took since store_plan_state()
  History resumed_;
  double best_val_loss_ = INFINITY;
  std::int64_t bad_epochs_ = 0;
};

// Writes metrics.csv (one row per epoch) to `path`.
void write_metrics_csv(const std::string& path, const History& history);
// Renders loss and accuracy curves (train against validation) from metrics.csv with gnuplot into
// `prefix`-loss.png/-accuracy.png (SVG when PNG is unavailable); returns the files written, or
// nothing when gnuplot is not installed (the CSV alone remains).
std::vector<std::string> plot_curves(const std::string& csv_path, const std::string& prefix);

}  // namespace dagrad
