#include "nn/schedule.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <numbers>

#include "graph/error.hpp"

namespace dagrad {

namespace {

void require(bool ok, std::string_view schedule, std::string_view what, double value) {
  if (!ok || std::isnan(value)) {
    throw Error(fmt::format("{} schedule: {}, got {}", schedule, what, value));
  }
}

void require_base(std::string_view schedule, double base) {
  require(base > 0 && std::isfinite(base), schedule,
          "the base learning rate must be positive and finite", base);
}

void require_factor(std::string_view schedule, double gamma) {
  require(gamma > 0 && gamma <= 1, schedule, "gamma must be in (0, 1]", gamma);
}

}  // namespace

double Schedule::learning_rate(std::int64_t t) const {
  if (t < 0) {
    throw Error(
        fmt::format("{} schedule: step {} is before the start (steps count from 0)", name(), t));
  }
  return at(t);
}

ConstantSchedule::ConstantSchedule(double base) : base_(base) {
  require_base("constant", base);
}
double ConstantSchedule::at(std::int64_t) const {
  return base_;
}

StepDecay::StepDecay(double base, std::vector<std::int64_t> milestones, double gamma)
    : base_(base), milestones_(std::move(milestones)), gamma_(gamma) {
  require_base("step_decay", base);
  require_factor("step_decay", gamma);
  for (std::size_t i = 0; i < milestones_.size(); ++i) {
    if (milestones_[i] < 1 || (i > 0 && milestones_[i] <= milestones_[i - 1])) {
      throw Error(
          fmt::format("step_decay schedule: milestones must be >= 1 and strictly "
                      "increasing, got [{}]",
                      fmt::join(milestones_, ", ")));
    }
  }
}

double StepDecay::at(std::int64_t t) const {
  const auto passed =
      std::upper_bound(milestones_.begin(), milestones_.end(), t) - milestones_.begin();
  return base_ * std::pow(gamma_, static_cast<double>(passed));
}

ExponentialDecay::ExponentialDecay(double base, double gamma) : base_(base), gamma_(gamma) {
  require_base("exponential", base);
  require_factor("exponential", gamma);
}

double ExponentialDecay::at(std::int64_t t) const {
  return base_ * std::pow(gamma_, static_cast<double>(t));
}

CosineDecay::CosineDecay(double base, std::int64_t period, double floor)
    : base_(base), period_(period), floor_(floor) {
  require_base("cosine", base);
  require(period >= 1, "cosine", "the period T must be >= 1", static_cast<double>(period));
  require(floor >= 0 && floor <= base, "cosine", "the floor must be in [0, base]", floor);
}

double CosineDecay::at(std::int64_t t) const {
  if (t >= period_) return floor_;
  const double progress = static_cast<double>(t) / static_cast<double>(period_);
  return floor_ + (base_ - floor_) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
}

LinearDecay::LinearDecay(double base, std::int64_t period, double end)
    : base_(base), period_(period), end_(end) {
  require_base("linear", base);
  require(period >= 1, "linear", "the period T must be >= 1", static_cast<double>(period));
  require(end >= 0 && std::isfinite(end), "linear", "the end rate must be finite and >= 0", end);
}

double LinearDecay::at(std::int64_t t) const {
  if (t >= period_) return end_;
  return base_ + (end_ - base_) * static_cast<double>(t) / static_cast<double>(period_);
}

InverseSqrtDecay::InverseSqrtDecay(double base, double scale) : base_(base), scale_(scale) {
  require_base("inverse_sqrt", base);
  require(scale > 0 && std::isfinite(scale), "inverse_sqrt", "the scale must be positive", scale);
}

double InverseSqrtDecay::at(std::int64_t t) const {
  return base_ / std::sqrt(1.0 + static_cast<double>(t) / scale_);
}

Warmup::Warmup(std::int64_t steps, std::shared_ptr<const Schedule> after)
    : steps_(steps), after_(std::move(after)) {
  if (after_ == nullptr) throw Error("warmup schedule: needs a schedule to warm up into, got null");
  require(steps >= 0, name(), "the number of warm-up steps must be >= 0",
          static_cast<double>(steps));
}

std::string Warmup::name() const {
  return fmt::format("warmup+{}", after_->name());
}

double Warmup::at(std::int64_t t) const {
  if (t < steps_) {
    return after_->learning_rate(0) * static_cast<double>(t) / static_cast<double>(steps_);
  }
  return after_->learning_rate(t - steps_);
}

}  // namespace dagrad
