#include "nn/trainer.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "autodiff/grad.hpp"
#include "data/augment.hpp"
#include "data/loader.hpp"
#include "data/random.hpp"
#include "nn/checkpoint.hpp"
#include "nn/clip.hpp"
#include "ops/ops.hpp"

namespace dagrad {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto s = static_cast<long>(seconds + 0.5);
  return s >= 60 ? fmt::format("{}m{:02d}s", s / 60, s % 60) : fmt::format("{}s", s);
}

// Parameters' live tensors (sharing storage with the graph).
std::vector<Tensor> parameter_tensors(Model& model) {
  std::vector<Tensor> tensors;
  for (const auto& p : model.parameters()) tensors.push_back(model.graph().value_of(p));
  return tensors;
}

// Snapshot of every parameter, trainable or not (batch-norm running statistics too).
std::vector<Tensor> snapshot(Model& model) {
  std::vector<Tensor> out;
  for (const auto& p : model.graph().parameters(/*trainable_only=*/false)) {
    out.push_back(model.graph().value_of(p).clone());
  }
  return out;
}

void restore(Model& model, const std::vector<Tensor>& saved) {
  auto params = model.graph().parameters(false);
  for (std::size_t i = 0; i < params.size(); ++i)
    model.graph().value_of(params[i]).copy_from(saved[i]);
}

}  // namespace

std::string Evaluation::confusion_table(const std::vector<std::string>& names) const {
  const std::size_t classes = confusion.size();
  auto label = [&](std::size_t c) { return c < names.size() ? names[c] : fmt::format("{}", c); };
  std::size_t width = 6;
  for (std::size_t c = 0; c < classes; ++c) width = std::max(width, label(c).size() + 1);
  std::string out = fmt::format("{:>{}} |", "true\\pred", width);
  for (std::size_t c = 0; c < classes; ++c) out += fmt::format(" {:>5}", c);
  out += '\n';
  out.append(width + 2 + 6 * classes, '-');
  out += '\n';
  for (std::size_t t = 0; t < classes; ++t) {
    out += fmt::format("{:>{}} |", label(t), width);
    for (std::size_t p = 0; p < classes; ++p) out += fmt::format(" {:>5}", confusion[t][p]);
    out += "\n";
  }
  return out;
}

Trainer::Trainer(Model& model, Optimizer& optimizer, const Schedule* schedule,
                 TrainerOptions options)
    : model_(model), optimizer_(optimizer), schedule_(schedule), options_(std::move(options)) {
  check_options();
  Value total = model_.data_loss() + model_.regularization_loss();
  grads_ = grad(total, model_.parameters());
  std::vector<Value> outputs{model_.data_loss(), model_.regularization_loss(), model_.error()};
  outputs.insert(outputs.end(), grads_.begin(), grads_.end());
  CompileOptions compile_options;
  compile_options.check_finite = options_.check_finite;
  compile_options.profile = options_.profile;
  if (std::optional<SGDUpdate> update = plan_update()) {
    outputs.resize(3);  // the loss terms and the error; the gradients stay inside the plan
    train_plan_.emplace(compile(model_.graph(), outputs, *update, compile_options));
    update_in_plan_ = true;
  } else {
    train_plan_.emplace(compile(model_.graph(), outputs, compile_options));
  }
  if (options_.augment.mixup_alpha > 0) {
    Value soft_total = model_.soft_data_loss() + model_.regularization_loss();
    soft_grads_ = grad(soft_total, model_.parameters());
    std::vector<Value> soft_outputs{model_.soft_data_loss(), model_.regularization_loss()};
    soft_outputs.insert(soft_outputs.end(), soft_grads_.begin(), soft_grads_.end());
    soft_plan_.emplace(compile(model_.graph(), soft_outputs, compile_options));
  }
  eval_plan_.emplace(compile(model_.graph(), {model_.logits(), model_.data_loss()}));
}

std::optional<SGDUpdate> Trainer::plan_update() const {
  const auto& o = options_;
  if (!o.update_in_plan || o.record_gradient_norm || o.clip_norm > 0 || o.clip_value > 0 ||
      o.augment.mixup_alpha > 0) {
    return std::nullopt;
  }
  SGDUpdate update{
      .params = model_.parameters(), .grads = grads_, .weight_decay = optimizer_.weight_decay()};
  if (const auto* momentum = dynamic_cast<const Momentum*>(&optimizer_)) {
    // γ = 0 would make the plan's update plain SGD, which keeps no velocities to write back.
    if (momentum->momentum() == 0) return std::nullopt;
    update.momentum = momentum->momentum();
    update.nesterov = dynamic_cast<const Nesterov*>(&optimizer_) != nullptr;
  } else if (dynamic_cast<const SGD*>(&optimizer_) == nullptr) {
    return std::nullopt;  // AdaGrad, RMSProp, Adam(W), L-BFGS: after the plan
  }
  return update;
}

void Trainer::load_plan_state() {
  std::vector<Tensor> velocities;
  for (const auto& [name, tensor] : optimizer_.state()) {
    if (name != "step") velocities.push_back(tensor);
  }
  if (velocities.empty()) {  // no step taken yet: zero velocities
    for (const Tensor& v : train_plan_->velocities()) velocities.emplace_back(v.desc());
  }
  train_plan_->load_velocities(velocities);
  plan_updates_ = 0;
}

void Trainer::store_plan_state() {
  if (!update_in_plan_) return;
  NamedTensors state;
  state.emplace_back(
      "step", Tensor::scalar(static_cast<double>(optimizer_.steps() + plan_updates_), DType::f64));
  const auto velocities = train_plan_->velocities();
  for (std::size_t i = 0; i < velocities.size(); ++i)
    state.emplace_back(fmt::format("velocity.{}", i), velocities[i]);
  optimizer_.load_state(state);
  plan_updates_ = 0;
}

void Trainer::check_options() const {
  const auto& o = options_;
  if (o.epochs < 0) throw Error(fmt::format("Trainer: epochs {} is negative", o.epochs));
  if (o.batch_size < 1 && !o.full_batch) {
    throw Error(fmt::format(
        "Trainer: batch size {} must be at least 1 (set full_batch for full-batch training)",
        o.batch_size));
  }
  if (o.clip_norm < 0 || o.clip_value < 0 || !std::isfinite(o.clip_norm) ||
      !std::isfinite(o.clip_value)) {
    throw Error(
        fmt::format("Trainer: clipping thresholds must be finite and >= 0 (norm {}, value {})",
                    o.clip_norm, o.clip_value));
  }
  if (o.patience < 0) throw Error(fmt::format("Trainer: patience {} is negative", o.patience));
  if (o.eval_batch_size < 1)
    throw Error(fmt::format("Trainer: eval batch size {} must be >= 1", o.eval_batch_size));
  if (!(o.smoothing >= 0 && o.smoothing < 1)) {
    throw Error(fmt::format("Trainer: smoothing {} is outside [0, 1)", o.smoothing));
  }
  if (o.augment.crop_padding < 0 || o.augment.cutout < 0 || o.augment.mixup_alpha < 0) {
    throw Error("Trainer: augmentation sizes and mixup alpha must be >= 0");
  }
}

History Trainer::fit(const data::Dataset& train, const data::Dataset* validation) {
  if (train.size() == 0) throw Error("Trainer::fit: the training set is empty");
  if (validation != nullptr && validation->size() == 0)
    throw Error("Trainer::fit: the validation set is empty");
  if (options_.augment.any() && train.images.shape().rank() != 4) {
    throw Error(
        fmt::format("Trainer: image augmentation needs [N,C,H,W] images, the training set has {}",
                    train.images.shape()));
  }
  const std::int64_t batch = options_.full_batch ? train.size() : options_.batch_size;
  data::Loader loader(train, {.batch_size = batch,
                              .shuffle = !options_.full_batch,
                              .drop_last = options_.drop_last,
                              .seed = options_.seed});
  const bool bar = options_.progress == 1 || (options_.progress == -1 && isatty(fileno(stdout)));
  History history = resumed_;
  double smoothed = NAN;
  std::vector<Tensor> best = snapshot(model_);
  std::vector<Tensor> grads(grads_.size());
  if (history.best_epoch == 0) best_val_loss_ = INFINITY;
  bool stop_requested = false;
  if (update_in_plan_) load_plan_state();

  for (std::int64_t epoch = start_epoch_ + 1; epoch <= start_epoch_ + options_.epochs; ++epoch) {
    const auto started = Clock::now();
    if (schedule_ != nullptr && !options_.schedule_per_step) {
      optimizer_.set_learning_rate(schedule_->learning_rate(epoch - 1));
    }
    loader.start_epoch(epoch);
    std::vector<Tensor> params = parameter_tensors(model_);
    double loss_sum = 0, regularization_sum = 0, wrong = 0, norm_sum = 0;
    std::int64_t seen = 0, steps_this_epoch = 0;
    const std::int64_t total_steps = loader.batches_per_epoch();
    while (const data::Batch* b = loader.next()) {
      if (schedule_ != nullptr && options_.schedule_per_step) {
        optimizer_.set_learning_rate(schedule_->learning_rate(step_));
      }
      const std::uint64_t step_seed =
          data::mix_seed(options_.seed, static_cast<std::uint64_t>(step_) + 1);
      RunOptions run{
          .training = true, .seed = step_seed, .learning_rate = optimizer_.learning_rate()};
      Tensor images = b->images;
      double data_loss = 0, regularization = 0, error_fraction = NAN;
      const std::vector<Tensor>* out = nullptr;
      if (options_.augment.any()) {
        images = b->images.clone();
        data::Random random(step_seed);
        if (options_.augment.flip) data::random_horizontal_flip(images, random);
        if (options_.augment.crop_padding > 0)
          data::random_crop(images, options_.augment.crop_padding, random);
        if (options_.augment.cutout > 0) data::cutout(images, options_.augment.cutout, random);
      }
      std::size_t first_grad = 3;
      if (options_.augment.mixup_alpha > 0) {
        data::Random random(data::mix_seed(step_seed, 7));
        data::MixupBatch mixed = data::mixup(images, b->labels, model_.options().classes,
                                             options_.augment.mixup_alpha, random);
        out = &soft_plan_->run({{model_.input(), mixed.images}, {model_.targets(), mixed.targets}},
                               run);
        first_grad = 2;
      } else {
        out = &train_plan_->run({{model_.input(), images}, {model_.labels(), b->labels}}, run);
        error_fraction = (*out)[2].item();
      }
      data_loss = (*out)[0].item();
      regularization = (*out)[1].item();
      if (update_in_plan_) ++plan_updates_;  // the plan has updated the parameters already
      if (options_.on_step && !options_.on_step(step_ + 1, data_loss)) {
        if (update_in_plan_) ++step_;  // a step taken, though not counted in the epoch's means
        stop_requested = true;
        break;
      }
      if (!std::isfinite(data_loss) || !std::isfinite(regularization)) {
        store_plan_state();
        throw Error(fmt::format(
            "Trainer: the loss became {} at step {} (epoch {}) with learning rate {}; lower the "
            "learning rate, clip gradients, or set check_finite to find the op",
            data_loss + regularization, step_ + 1, epoch, optimizer_.learning_rate()));
      }
      double norm = NAN;
      if (!update_in_plan_) {
        for (std::size_t k = 0; k < grads.size(); ++k) grads[k] = (*out)[first_grad + k];
        if (options_.clip_norm > 0) {
          norm = clip_grad_norm(grads, options_.clip_norm);
        } else if (options_.record_gradient_norm) {
          norm = global_norm(grads);
        }
        if (options_.clip_value > 0) clip_grad_value(grads, options_.clip_value);
        optimizer_.step(params, grads);
      }
      ++step_;
      ++steps_this_epoch;
      const auto n = b->size();
      seen += n;
      loss_sum += data_loss * static_cast<double>(n);
      regularization_sum += regularization;
      norm_sum += norm;
      if (!std::isnan(error_fraction)) wrong += error_fraction * static_cast<double>(n);
      smoothed = std::isnan(smoothed)
                     ? data_loss
                     : options_.smoothing * smoothed + (1 - options_.smoothing) * data_loss;
      history.smoothed_loss.emplace_back(step_, smoothed);
      if (bar && !options_.quiet) {
        const double elapsed = seconds_since(started);
        const double rate = static_cast<double>(seen) / std::max(elapsed, 1e-9);
        const double eta = elapsed / static_cast<double>(steps_this_epoch) *
                           static_cast<double>(total_steps - steps_this_epoch);
        const int width = 24;
        const int filled =
            static_cast<int>(width * steps_this_epoch / std::max<std::int64_t>(total_steps, 1));
        std::printf("\repoch %lld/%lld [%s%s] %lld/%lld loss %.4f  %.0f samples/s  ETA %s   ",
                    static_cast<long long>(epoch),
                    static_cast<long long>(start_epoch_ + options_.epochs),
                    std::string(static_cast<std::size_t>(filled), '#').c_str(),
                    std::string(static_cast<std::size_t>(width - filled), '.').c_str(),
                    static_cast<long long>(steps_this_epoch), static_cast<long long>(total_steps),
                    smoothed, rate, format_duration(eta).c_str());
        std::fflush(stdout);
      }
    }
    EpochRecord record;
    record.epoch = epoch;
    record.learning_rate = optimizer_.learning_rate();
    record.train_loss = loss_sum / static_cast<double>(std::max<std::int64_t>(seen, 1));
    record.regularization_loss =
        regularization_sum / static_cast<double>(std::max<std::int64_t>(steps_this_epoch, 1));
    record.train_accuracy =
        options_.augment.mixup_alpha > 0
            ? NAN
            : 1.0 - wrong / static_cast<double>(std::max<std::int64_t>(seen, 1));
    record.gradient_norm =
        norm_sum / static_cast<double>(std::max<std::int64_t>(steps_this_epoch, 1));
    if (validation != nullptr) {
      Evaluation v = evaluate(*validation);
      record.val_loss = v.loss;
      record.val_accuracy = v.accuracy;
    }
    record.seconds = seconds_since(started);
    history.epochs.push_back(record);

    const double monitored = validation != nullptr ? record.val_loss : record.train_loss;
    bool improved = monitored < best_val_loss_;
    if (improved) {
      best_val_loss_ = monitored;
      history.best_epoch = epoch;
      bad_epochs_ = 0;
      best = snapshot(model_);
    } else {
      ++bad_epochs_;
    }
    if (!options_.quiet) {
      std::string line = fmt::format(
          "epoch {:>3}  lr {:.3g}  train loss {:.4f}{}  train acc {:.4f}", epoch,
          record.learning_rate, record.train_loss,
          record.regularization_loss > 0 ? fmt::format(" (+reg {:.4f})", record.regularization_loss)
                                         : "",
          record.train_accuracy);
      if (validation != nullptr) {
        line +=
            fmt::format("  val loss {:.4f}  val acc {:.4f}", record.val_loss, record.val_accuracy);
      }
      line += fmt::format("  {:.1f}s  {:.0f} samples/s{}", record.seconds,
                          static_cast<double>(seen) / std::max(record.seconds, 1e-9),
                          improved ? "  *" : "");
      std::printf("%s%s\n", bar ? "\r" : "", line.c_str());
      std::fflush(stdout);
    }
    if (!options_.out_dir.empty()) {
      store_plan_state();
      std::filesystem::create_directories(options_.out_dir);
      CheckpointInfo info;
      info.epoch = epoch;
      info.step = step_;
      info.schedule_position = options_.schedule_per_step ? step_ : epoch;
      info.extra = {{"best_loss", fmt::format("{:.17g}", best_val_loss_)},
                    {"best_epoch", fmt::format("{}", history.best_epoch)},
                    {"bad_epochs", fmt::format("{}", bad_epochs_)}};
      Checkpoint::save((std::filesystem::path(options_.out_dir) / "last.safetensors").string(),
                       model_.graph(), &optimizer_, info);
      if (improved) {
        Checkpoint::save((std::filesystem::path(options_.out_dir) / "best.safetensors").string(),
                         model_.graph(), &optimizer_, info);
      }
      write_metrics_csv((std::filesystem::path(options_.out_dir) / "metrics.csv").string(),
                        history);
    }
    if (stop_requested) break;
    if (options_.patience > 0 && bad_epochs_ >= options_.patience) {
      history.stopped_early = true;
      if (!options_.quiet) {
        std::printf("early stopping: no better %s loss for %lld epochs; restoring epoch %lld\n",
                    validation != nullptr ? "validation" : "training",
                    static_cast<long long>(options_.patience),
                    static_cast<long long>(history.best_epoch));
      }
      break;
    }
  }
  store_plan_state();
  // With a validation set (or early stopping) the run ends with the weights of its best epoch.
  if ((validation != nullptr || options_.patience > 0) && history.best_epoch > 0)
    restore(model_, best);
  start_epoch_ = history.epochs.empty() ? start_epoch_ : history.epochs.back().epoch;
  resumed_ = history;
  if (!options_.out_dir.empty()) write_outputs(history);
  return history;
}

Evaluation Trainer::evaluate(const data::Dataset& dataset) {
  if (dataset.size() == 0) throw Error("Trainer::evaluate: the data set is empty");
  data::Loader loader(dataset, {.batch_size = options_.eval_batch_size, .shuffle = false});
  loader.start_epoch(0);
  const auto classes = model_.options().classes;
  Evaluation result;
  result.confusion.assign(static_cast<std::size_t>(classes),
                          std::vector<std::int64_t>(static_cast<std::size_t>(classes), 0));
  double loss_sum = 0;
  std::int64_t correct = 0;
  while (const data::Batch* b = loader.next()) {
    const auto& out = eval_plan_->run({{model_.input(), b->images}, {model_.labels(), b->labels}});
    const Tensor& logits = out[0];
    loss_sum += out[1].item() * static_cast<double>(b->size());
    const float* z = logits.data<float>();
    const std::int32_t* labels = b->labels.data<std::int32_t>();
    for (std::int64_t i = 0; i < b->size(); ++i) {
      std::int64_t best = 0;
      for (std::int64_t c = 1; c < classes; ++c) {
        if (z[i * classes + c] > z[i * classes + best]) best = c;
      }
      const auto truth = labels[i];
      if (truth < 0 || truth >= classes) {
        throw Error(fmt::format("Trainer::evaluate: label {} at position {} is outside [0, {})",
                                truth, i, classes));
      }
      correct += best == truth;
      ++result.confusion[static_cast<std::size_t>(truth)][static_cast<std::size_t>(best)];
    }
    result.examples += b->size();
  }
  result.loss = loss_sum / static_cast<double>(result.examples);
  result.accuracy = static_cast<double>(correct) / static_cast<double>(result.examples);
  return result;
}

Tensor Trainer::predict(const data::Dataset& dataset) {
  if (dataset.size() == 0) throw Error("Trainer::predict: the data set is empty");
  const auto classes = model_.options().classes;
  Tensor probabilities({dataset.size(), classes}, DType::f32);
  data::Loader loader(dataset, {.batch_size = options_.eval_batch_size, .shuffle = false});
  loader.start_epoch(0);
  float* p = probabilities.data<float>();
  std::int64_t row = 0;
  while (const data::Batch* b = loader.next()) {
    const auto& out = eval_plan_->run({{model_.input(), b->images}, {model_.labels(), b->labels}});
    const float* z = out[0].data<float>();
    for (std::int64_t i = 0; i < b->size(); ++i, ++row) {
      float top = z[i * classes];
      for (std::int64_t c = 1; c < classes; ++c) top = std::max(top, z[i * classes + c]);
      double total = 0;
      for (std::int64_t c = 0; c < classes; ++c)
        total += std::exp(static_cast<double>(z[i * classes + c] - top));
      for (std::int64_t c = 0; c < classes; ++c) {
        p[row * classes + c] =
            static_cast<float>(std::exp(static_cast<double>(z[i * classes + c] - top)) / total);
      }
    }
  }
  return probabilities;
}

void Trainer::resume(const std::string& path) {
  CheckpointInfo info = Checkpoint::load(path, model_.graph(), &optimizer_);
  start_epoch_ = info.epoch;
  step_ = info.step;
  auto find = [&](const char* key) -> std::string {
    for (const auto& [k, v] : info.extra) {
      if (k == key) return v;
    }
    return "";
  };
  const std::string best_loss = find("best_loss");
  if (!best_loss.empty()) best_val_loss_ = std::stod(best_loss);
  const std::string best_epoch = find("best_epoch");
  if (!best_epoch.empty()) resumed_.best_epoch = std::stoll(best_epoch);
  const std::string bad = find("bad_epochs");
  if (!bad.empty()) bad_epochs_ = std::stoll(bad);
  // Earlier epochs' metrics, so the CSV and curves keep the whole run.
  const auto csv = std::filesystem::path(path).parent_path() / "metrics.csv";
  std::ifstream in(csv);
  std::string line;
  std::getline(in, line);  // header
  while (std::getline(in, line)) {
    EpochRecord r;
    if (std::sscanf(line.c_str(), "%lld,%lf,%lf,%lf,%lf,%lf,%lf,%lf",
                    reinterpret_cast<long long*>(&r.epoch), &r.learning_rate, &r.train_loss,
                    &r.regularization_loss, &r.val_loss, &r.train_accuracy, &r.val_accuracy,
                    &r.seconds) >= 4 &&
        r.epoch <= start_epoch_) {
      resumed_.epochs.push_back(r);
    }
  }
}

void Trainer::write_outputs(const History& history) const {
  const auto dir = std::filesystem::path(options_.out_dir);
  write_metrics_csv((dir / "metrics.csv").string(), history);
  plot_curves((dir / "metrics.csv").string(), (dir / "curves").string());
  std::ofstream dot(dir / "graph.dot");
  std::vector<Value> outputs{model_.data_loss()};
  outputs.insert(outputs.end(), grads_.begin(), grads_.end());
  dot << model_.graph().to_dot(outputs);
}

void write_metrics_csv(const std::string& path, const History& history) {
  std::ofstream out(path);
  if (!out) throw IOError(fmt::format("{}: cannot write the metrics CSV", path));
  out << "epoch,lr,train_loss,regularization_loss,val_loss,train_acc,val_acc,seconds,train_loss_"
         "at\n";
  for (const auto& r : history.epochs) {
    out << fmt::format("{},{:.6g},{:.6f},{:.6f},{:.6f},{:.6f},{:.6f},{:.3f},{:.1f}\n", r.epoch,
                       r.learning_rate, r.train_loss, r.regularization_loss, r.val_loss,
                       r.train_accuracy, r.val_accuracy, r.seconds,
                       static_cast<double>(r.epoch) - 0.5);
  }
}

std::vector<std::string> plot_curves(const std::string& csv_path, const std::string& prefix) {
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) return {};
  std::vector<std::string> written;
  const bool png = std::system("gnuplot -e 'set terminal pngcairo' >/dev/null 2>&1") == 0 ||
                   std::system("gnuplot -e 'set terminal png' >/dev/null 2>&1") == 0;
  const std::string ext = png ? "png" : "svg";
  const std::string terminal = png ? "png size 800,500" : "svg size 800,500";
  const std::string script_path = prefix + ".gnuplot";
  {
    std::ofstream script(script_path);
    // Training values are averages over an epoch, so they sit at mid-epoch (column 9).
    script << "set datafile separator ','\nset key autotitle columnhead\nset grid\nset xlabel "
              "'epoch'\n"
           << "set terminal " << terminal << "\n"
           << "set output '" << prefix << "-loss." << ext << "'\nset ylabel 'loss'\n"
           << "plot '" << csv_path
           << "' using 9:3 with linespoints title 'train (mid-epoch)', '' using 1:5 "
           << "with linespoints title 'validation'\n"
           << "set output '" << prefix << "-accuracy." << ext << "'\nset ylabel 'accuracy'\n"
           << "plot '" << csv_path
           << "' using 9:6 with linespoints title 'train (mid-epoch)', '' using 1:7 "
           << "with linespoints title 'validation'\n";
  }
  if (std::system(fmt::format("gnuplot '{}' >/dev/null 2>&1", script_path).c_str()) == 0) {
    written.push_back(prefix + "-loss." + ext);
    written.push_back(prefix + "-accuracy." + ext);
  }
  return written;
}

}  // namespace dagrad
