// Learning-rate schedules: learning_rate(t) for a step or epoch t = 0, 1, 2, …
//
// A schedule is a pure function of t (it holds no position), so resuming from a checkpoint only
// needs the saved t. Apply it with optimizer.set_learning_rate(schedule.learning_rate(t)).
// learning_rate(t) with t < 0 throws Error naming the schedule and t.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dagrad {

class Schedule {
 public:
  virtual ~Schedule() = default;
  // The rate at step/epoch t >= 0.
  double learning_rate(std::int64_t t) const;
  // "constant", "step_decay", …; for messages.
  virtual std::string name() const = 0;

 protected:
  virtual double at(std::int64_t t) const = 0;  // t >= 0, checked
};

// η(t) = η0.
class ConstantSchedule : public Schedule {
 public:
  explicit ConstantSchedule(double base);
  std::string name() const override { return "constant"; }

 protected:
  double at(std::int64_t t) const override;

 private:
  double base_;
};

// η(t) = η0 · γ^k, k = number of milestones <= t (e.g. milestones 30, 60, 90 and γ = 0.1).
// Milestones must be strictly increasing and >= 1; γ in (0, 1].
class StepDecay : public Schedule {
 public:
  StepDecay(double base, std::vector<std::int64_t> milestones, double gamma = 0.1);
  std::string name() const override { return "step_decay"; }

 protected:
  double at(std::int64_t t) const override;

 private:
  double base_;
  std::vector<std::int64_t> milestones_;
  double gamma_;
};

// η(t) = η0 · γ^t (e.g. γ = 0.98 per epoch); γ in (0, 1].
class ExponentialDecay : public Schedule {
 public:
  ExponentialDecay(double base, double gamma = 0.98);
  std::string name() const override { return "exponential"; }

 protected:
  double at(std::int64_t t) const override;

 private:
  double base_;
  double gamma_;
};

// η(t) = η_min + (η0 − η_min) · (1 + cos(π t / T)) / 2 for t < T, η_min afterwards.
// T >= 1, 0 <= η_min <= η0.
class CosineDecay : public Schedule {
 public:
  CosineDecay(double base, std::int64_t period, double floor = 0);
  std::string name() const override { return "cosine"; }

 protected:
  double at(std::int64_t t) const override;

 private:
  double base_;
  std::int64_t period_;
  double floor_;
};

// η(t) = η0 + (η_end − η0) · t / T for t < T, η_end afterwards. T >= 1, 0 <= η_end.
class LinearDecay : public Schedule {
 public:
  LinearDecay(double base, std::int64_t period, double end = 0);
  std::string name() const override { return "linear"; }

 protected:
  double at(std::int64_t t) const override;

 private:
  double base_;
  std::int64_t period_;
  double end_;
};

// η(t) = η0 / √(1 + t / τ), τ > 0: η(0) = η0, then decays like 1/√t.
class InverseSqrtDecay : public Schedule {
 public:
  explicit InverseSqrtDecay(double base, double scale = 1);
  std::string name() const override { return "inverse_sqrt"; }

 protected:
  double at(std::int64_t t) const override;

 private:
  double base_;
  double scale_;
};

// A linear warm-up from 0 over N steps in front of another schedule, which then starts at its
// own step 0:  η(t) = after(0) · t / N for t < N,  after(t − N) for t >= N.  N >= 0.
class Warmup : public Schedule {
 public:
  Warmup(std::int64_t steps, std::shared_ptr<const Schedule> after);
  std::string name() const override;

 protected:
  double at(std::int64_t t) const override;

 private:
  std::int64_t steps_;
  std::shared_ptr<const Schedule> after_;
};

}  // namespace dagrad
