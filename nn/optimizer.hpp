// Optimisers: in-place parameter updates from gradient tensors.
//
// Usage, once per training step:
//   auto grads = grad(loss, params);                 // once, when building
//   Plan plan = compile(g, {loss, grads...});        // once
//   auto out = plan.run(feeds);                      // every step
//   optimizer.step(parameter_tensors, {out.begin() + 1, out.end()});
// where parameter_tensors[i] = g.value_of(params[i]) (a Tensor shares its storage, so updating
// the copy updates the graph's parameter).
//
// An optimiser is not bound to parameters at construction: the first step() creates its state
// buffers (moments, accumulators) for the parameters it is given, and every later step must pass
// parameters of the same count, dtypes and shapes, in the same order (Error otherwise; reset()
// forgets the state). After the first step, step() does no heap allocation: it checks shapes, then
// updates all parameters in one pass over the concatenation of their elements, split into
// contiguous ranges (multiples of 16 elements) across dagrad::num_threads() OpenMP threads; each
// thread runs one vectorisable loop per parameter it overlaps. Every element's update depends only
// on that element and on per-step scalars, so the result is bitwise the same for any thread count.
// Small updates (under 32k elements in total) run on the calling thread.
//
// Notation: w parameter, g gradient, η learning rate, λ weight decay, t the step number (1 for the
// first step). Every optimiser except AdamW applies weight decay as an L2 term added to the
// gradient before anything else: g ← ∇L + λw.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "graph/tensor.hpp"
#include "nn/named_tensors.hpp"

namespace dagrad {

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // Updates every params[i] in place from grads[i]. Throws Error (before changing anything)
  // when the counts differ, a gradient's dtype or shape differs from its parameter's, a parameter
  // is not f32/f64, or the parameters differ from those the state was created for.
  void step(std::span<Tensor> params, std::span<const Tensor> grads);

  // "SGD", "Momentum", "Nesterov", "AdaGrad", "RMSProp", "Adam", "AdamW".
  const std::string& name() const { return name_; }
  double learning_rate() const { return learning_rate_; }
  // For schedules. Error when the rate is <= 0 or not finite.
  void set_learning_rate(double learning_rate);
  double weight_decay() const { return weight_decay_; }
  // Number of steps taken so far.
  std::int64_t steps() const { return steps_; }

  // The state as named tensors, for checkpoints: "step" (an f64 scalar holding the step count)
  // and, once the first step ran, "<slot>.<i>" for each state slot (e.g. "m.0", "v.0" for Adam)
  // of parameter i. The tensors share storage with the live state: clone() what must be kept.
  NamedTensors state() const;
  // Restores a state produced by state() of an optimiser of the same kind (copies the tensors).
  // Error naming the tensor when a name is unknown or missing, or when a slot's dtype/shape
  // differs across slots of one parameter. Shapes are checked against the parameters at the
  // next step().
  void load_state(const NamedTensors& state);
  // Forgets the state and the step count.
  void reset();

 protected:
  Optimizer(std::string name, double learning_rate, double weight_decay,
            std::vector<std::string> slot_names);
  // Called once per step, before any update(): computes the scalars that depend only on the step
  // (Adam's bias corrections). steps() already counts the step being taken.
  virtual void prepare_step() {}
  // Updates elements [begin, end) of one parameter, reading and writing only those elements of
  // param, grad and slots. `slots` holds this parameter's state tensors (same desc as the
  // parameter, zero-filled at creation) in the order of slot_names. Called concurrently from
  // several threads on disjoint ranges, so it must not modify the optimiser itself.
  virtual void update(Tensor& param, const Tensor& grad, std::span<Tensor> slots,
                      std::int64_t begin, std::int64_t end) const = 0;
  // Error naming this optimiser when `value` is not finite or outside [low, high) (or
  // [low, high] when `high_inclusive`).
  void check_range(std::string_view what, double value, double low, double high,
                   bool high_inclusive = false) const;

 private:
  std::string name_;
  double learning_rate_ = 0;
  double weight_decay_ = 0;
  std::vector<std::string> slot_names_;
  std::int64_t steps_ = 0;
  std::vector<TensorDesc> descs_;           // the parameters the state was created for
  std::vector<std::vector<Tensor>> slots_;  // [parameter][slot]

  // Updates elements [begin, end) of the concatenation of all parameters' elements.
  void update_range(std::span<Tensor> params, std::span<const Tensor> grads, std::int64_t begin,
                    std::int64_t end);
};

// Plain gradient descent: w ← w − η g.
struct SGDOptions {
  double learning_rate = 0.01;
  double weight_decay = 0;
};
class SGD : public Optimizer {
 public:
  explicit SGD(SGDOptions options = {});

 protected:
  void update(Tensor& param, const Tensor& grad, std::span<Tensor> slots, std::int64_t begin,
              std::int64_t end) const override;
};

// Heavy-ball momentum (γ in [0, 1)): v ← γ v − η g;  w ← w + v.
// Nesterov (Sutskever's form): v ← γ v − η g;  w ← w + γ v − η g  (the look-ahead step).
struct MomentumOptions {
  double learning_rate = 0.01;
  double momentum = 0.9;
  double weight_decay = 0;
};
class Momentum : public Optimizer {
 public:
  explicit Momentum(MomentumOptions options = {});
  double momentum() const { return momentum_; }

 protected:
  Momentum(std::string name, MomentumOptions options, bool nesterov);
  void update(Tensor& param, const Tensor& grad, std::span<Tensor> slots, std::int64_t begin,
              std::int64_t end) const override;

 private:
  double momentum_;
  bool nesterov_;
};
class Nesterov : public Momentum {
 public:
  explicit Nesterov(MomentumOptions options = {});
};

// AdaGrad: G ← G + g²;  w ← w − η g / (√G + ε).
struct AdaGradOptions {
  double learning_rate = 0.01;
  double epsilon = 1e-10;
  double weight_decay = 0;
};
class AdaGrad : public Optimizer {
 public:
  explicit AdaGrad(AdaGradOptions options = {});

 protected:
  void update(Tensor& param, const Tensor& grad, std::span<Tensor> slots, std::int64_t begin,
              std::int64_t end) const override;

 private:
  double epsilon_;
};

// RMSProp (ρ in [0, 1)): s ← ρ s + (1 − ρ) g²;  w ← w − η g / (√s + ε).
struct RMSPropOptions {
  double learning_rate = 1e-3;
  double decay = 0.9;  // ρ
  double epsilon = 1e-8;
  double weight_decay = 0;
};
class RMSProp : public Optimizer {
 public:
  explicit RMSProp(RMSPropOptions options = {});

 protected:
  void update(Tensor& param, const Tensor& grad, std::span<Tensor> slots, std::int64_t begin,
              std::int64_t end) const override;

 private:
  double decay_;
  double epsilon_;
};

// Adam (Kingma & Ba), with bias correction:
//   m ← β1 m + (1 − β1) g;  v ← β2 v + (1 − β2) g²;
//   m̂ = m / (1 − β1ᵗ);  v̂ = v / (1 − β2ᵗ);  w ← w − η m̂ / (√v̂ + ε).
// AdamW (Loshchilov & Hutter) decouples the weight decay from the gradient:
//   w ← w − η λ w, then the Adam update with g = ∇L (no L2 term).
struct AdamOptions {
  double learning_rate = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double epsilon = 1e-8;
  double weight_decay = 0;  // Adam: L2 added to the gradient; AdamW: decoupled
};
class Adam : public Optimizer {
 public:
  explicit Adam(AdamOptions options = {});

 protected:
  Adam(std::string name, AdamOptions options, bool decoupled);
  void prepare_step() override;
  void update(Tensor& param, const Tensor& grad, std::span<Tensor> slots, std::int64_t begin,
              std::int64_t end) const override;

 private:
  double beta1_;
  double beta2_;
  double epsilon_;
  bool decoupled_;
  // 1 / (1 − β1ᵗ) and 1 / (1 − β2ᵗ) for the step being taken, set by prepare_step().
  double inverse_correction1_ = 1;
  double inverse_correction2_ = 1;
};
struct AdamWOptions {
  double learning_rate = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double epsilon = 1e-8;
  double weight_decay = 1e-2;
};
class AdamW : public Adam {
 public:
  explicit AdamW(AdamWOptions options = {});
};

// L-BFGS for full-batch, deterministic problems.
//
// Not an Optimizer: each step() runs up to `max_iterations` quasi-Newton iterations and needs
// the loss and gradient at trial points, which `closure` provides: it must recompute the loss at
// the current parameter values (which step() changes in place), write ∇L into grads_out[i] (one
// tensor per parameter, created by step() with the parameter's dtype and shape) and return the
// loss. Computation is in f64 on flat copies of the parameters (allocated on the first step); f32
// parameters are rounded when written, and the iterate is taken as what they then hold.
//
// Iteration: d = −H g by the two-loop recursion over the last `history_size` pairs
// (s = Δw, y = Δg; pairs with sᵀy <= 1e-10 are skipped to keep H positive definite; initial
// H₀ = (sᵀy / yᵀy) I); the first iteration (and any whose d is not a descent direction) uses
// d = −g with first trial step η·min(1, 1/‖g‖₁); later iterations try t = η first.
// Line search (`line_search`):
//   armijo:        t ← t·backtrack_factor until f(w + t d) <= f(w) + c1 t gᵀd;
//   strong_wolfe:  t also satisfying |∇f(w + t d)ᵀd| <= c2 |gᵀd| (bracketing by doubling t,
//                  then zooming with safeguarded cubic interpolation, Nocedal & Wright 3.5/3.6).
// Both spend at most max_line_search_steps evaluations per iteration. Stops when
// max|g| <= tolerance_grad, when |Δf| or max|t d| falls below tolerance_change, or when the line
// search fails (the parameters stay at the best point).
enum class LineSearch { armijo, strong_wolfe };
struct LBFGSOptions {
  double learning_rate = 1.0;
  int max_iterations = 20;
  int history_size = 10;
  double tolerance_grad = 1e-7;
  double tolerance_change = 1e-9;
  LineSearch line_search = LineSearch::armijo;
  double armijo_c1 = 1e-4;
  double wolfe_c2 = 0.9;          // strong_wolfe only; c1 < c2 < 1
  double backtrack_factor = 0.5;  // armijo only
  int max_line_search_steps = 40;
};
class LBFGS {
 public:
  using Closure = std::function<double(std::span<Tensor> grads_out)>;
  explicit LBFGS(LBFGSOptions options = {});

  // Runs the iterations; returns the loss at the final parameters. Error when the parameters
  // differ from those of the first step, a parameter is not f32/f64, or the closure returns a
  // non-finite loss at the starting point.
  double step(std::span<Tensor> params, const Closure& closure);

  std::int64_t iterations() const { return iterations_; }    // over all steps
  std::int64_t evaluations() const { return evaluations_; }  // closure calls over all steps
  // Forgets the curvature history.
  void reset();

  // The curvature history as named f64 tensors, for checkpoints: "iterations", "evaluations"
  // (scalars) and, once a pair was stored, "history" ([count, head, γ]), "s" and "y"
  // ([history_size, number of parameter values]) and "rho" ([history_size]).
  NamedTensors state() const;
  // Restores a state() of an L-BFGS with the same history_size and parameters; Error naming the
  // tensor when one is unknown, missing or of the wrong shape. The next step() continues with
  // the saved curvature pairs (parameters of another total size start afresh).
  void load_state(const NamedTensors& state);

 private:
  double evaluate(std::span<Tensor> params, const Closure& closure, std::vector<double>& g_out);
  void write_params(std::span<Tensor> params, std::vector<double>& x) const;
  void two_loop(const std::vector<double>& g, std::vector<double>& d);
  double evaluate_at(std::span<Tensor> params, const Closure& closure, double t, double& slope);
  bool backtrack(std::span<Tensor> params, const Closure& closure, double loss, double slope,
                 double& t, double& trial_loss);
  bool strong_wolfe(std::span<Tensor> params, const Closure& closure, double loss, double slope,
                    double& t, double& trial_loss);

  LBFGSOptions options_;
  std::vector<TensorDesc> descs_;
  std::vector<Tensor> grads_;
  std::vector<double> x_, g_, x_trial_, g_trial_, d_;
  std::vector<double> s_history_, y_history_, rho_, alpha_;  // ring buffers
  int history_count_ = 0;
  int history_head_ = 0;  // slot the next pair goes to
  double gamma_ = 1;
  std::int64_t iterations_ = 0;
  std::int64_t evaluations_ = 0;
};

}  // namespace dagrad
