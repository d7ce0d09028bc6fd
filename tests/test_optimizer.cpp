// Optimisers and gradient clipping. Each optimiser's first three updates on the quadratic
// f(w) = ½ Σ aᵢ wᵢ² (∇f = a ⊙ w) are compared with the published update written out here;
// convergence on Rosenbrock and an ill-conditioned quadratic; errors; state round trip.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <new>

#include "autodiff/grad.hpp"
#include "nn/clip.hpp"
#include "nn/optimizer.hpp"
#include "ops/ops.hpp"
#include "runtime/plan.hpp"

// This file replaces the global operator new with a counting malloc, so free() is the matching
// release; GCC cannot see that once operator delete is inlined into its callers.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

// Counts calls of the global operator new, to show step() does not allocate after the first step.
namespace {
std::atomic<long> g_allocations{0};
}
void* operator new(std::size_t bytes) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(bytes == 0 ? 1 : bytes)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}

namespace dagrad {
namespace {

const std::vector<double> a = {1.0, 4.0, 0.25};
const std::vector<double> w0 = {1.0, -2.0, 3.0};

std::vector<double> gradient_of(const std::vector<double>& w) {
  std::vector<double> g(w.size());
  for (std::size_t i = 0; i < w.size(); ++i) g[i] = a[i] * w[i];
  return g;
}

// Runs `optimizer` for 3 steps on the quadratic in `dtype` and returns w after each step.
std::vector<std::vector<double>> run_three_steps(Optimizer& optimizer, DType dtype = DType::f64) {
  std::vector<Tensor> params = {Tensor::from(w0, {3}, dtype)};
  std::vector<Tensor> grads = {Tensor({3}, dtype)};
  std::vector<std::vector<double>> history;
  for (int t = 0; t < 3; ++t) {
    const auto g = gradient_of(params[0].to_doubles());
    for (int i = 0; i < 3; ++i) grads[0].set(i, g[static_cast<std::size_t>(i)]);
    optimizer.step(params, grads);
    history.push_back(params[0].to_doubles());
  }
  return history;
}

void expect_history(const std::vector<std::vector<double>>& got,
                    const std::vector<std::vector<double>>& want, double tolerance = 1e-13) {
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t t = 0; t < want.size(); ++t) {
    for (std::size_t i = 0; i < want[t].size(); ++i) {
      EXPECT_NEAR(got[t][i], want[t][i], tolerance * std::max(1.0, std::abs(want[t][i])))
          << "step " << t + 1 << ", element " << i;
    }
  }
}

TEST(Optimizer, SGDFollowsWMinusEtaGradient) {
  const double eta = 0.1, lambda = 0.05;
  std::vector<std::vector<double>> want;
  std::vector<double> w = w0;
  for (int t = 0; t < 3; ++t) {
    for (std::size_t i = 0; i < 3; ++i) w[i] = w[i] - eta * (a[i] * w[i] + lambda * w[i]);
    want.push_back(w);
  }
  SGD sgd({.learning_rate = eta, .weight_decay = lambda});
  expect_history(run_three_steps(sgd), want);
}

TEST(Optimizer, MomentumAccumulatesVelocity) {
  const double eta = 0.1, gamma = 0.9;
  std::vector<std::vector<double>> want;
  std::vector<double> w = w0, v(3, 0.0);
  for (int t = 0; t < 3; ++t) {
    for (std::size_t i = 0; i < 3; ++i) {
      v[i] = gamma * v[i] - eta * a[i] * w[i];
      w[i] = w[i] + v[i];
    }
    want.push_back(w);
  }
  Momentum momentum({.learning_rate = eta, .momentum = gamma});
  expect_history(run_three_steps(momentum), want);
}

TEST(Optimizer, NesterovTakesTheLookAheadStep) {
  const double eta = 0.1, gamma = 0.8, lambda = 0.01;
  std::vector<std::vector<double>> want;
  std::vector<double> w = w0, v(3, 0.0);
  for (int t = 0; t < 3; ++t) {
    for (std::size_t i = 0; i < 3; ++i) {
      const double g = a[i] * w[i] + lambda * w[i];
      v[i] = gamma * v[i] - eta * g;
      w[i] = w[i] + gamma * v[i] - eta * g;
    }
    want.push_back(w);
  }
  Nesterov nesterov({.learning_rate = eta, .momentum = gamma, .weight_decay = lambda});
  expect_history(run_three_steps(nesterov), want);
}

TEST(Optimizer, AdaGradDividesBySquareRootOfSummedSquares) {
  const double eta = 0.5, eps = 1e-10;
  std::vector<std::vector<double>> want;
  std::vector<double> w = w0, sum(3, 0.0);
  for (int t = 0; t < 3; ++t) {
    for (std::size_t i = 0; i < 3; ++i) {
      const double g = a[i] * w[i];
      sum[i] += g * g;
      w[i] -= eta * g / (std::sqrt(sum[i]) + eps);
    }
    want.push_back(w);
  }
  AdaGrad adagrad({.learning_rate = eta});
  expect_history(run_three_steps(adagrad), want);
}

TEST(Optimizer, RMSPropDividesByRootMeanSquare) {
  const double eta = 0.01, rho = 0.9, eps = 1e-8;
  std::vector<std::vector<double>> want;
  std::vector<double> w = w0, s(3, 0.0);
  for (int t = 0; t < 3; ++t) {
    for (std::size_t i = 0; i < 3; ++i) {
      const double g = a[i] * w[i];
      s[i] = rho * s[i] + (1 - rho) * g * g;
      w[i] -= eta * g / (std::sqrt(s[i]) + eps);
    }
    want.push_back(w);
  }
  RMSProp rmsprop({.learning_rate = eta, .decay = rho, .epsilon = eps});
  expect_history(run_three_steps(rmsprop), want);
}

std::vector<std::vector<double>> adam_by_hand(double eta, double lambda, bool decoupled) {
  const double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  std::vector<std::vector<double>> want;
  std::vector<double> w = w0, m(3, 0.0), v(3, 0.0);
  for (int t = 1; t <= 3; ++t) {
    for (std::size_t i = 0; i < 3; ++i) {
      const double g = a[i] * w[i] + (decoupled ? 0.0 : lambda * w[i]);
      m[i] = beta1 * m[i] + (1 - beta1) * g;
      v[i] = beta2 * v[i] + (1 - beta2) * g * g;
      const double m_hat = m[i] / (1 - std::pow(beta1, t));
      const double v_hat = v[i] / (1 - std::pow(beta2, t));
      if (decoupled) w[i] -= eta * lambda * w[i];
      w[i] -= eta * m_hat / (std::sqrt(v_hat) + eps);
    }
    want.push_back(w);
  }
  return want;
}

TEST(Optimizer, AdamWithDefaultsMatchesBiasCorrectedFormula) {
  Adam adam;  // η = 1e-3, β1 = 0.9, β2 = 0.999, ε = 1e-8
  EXPECT_EQ(adam.learning_rate(), 1e-3);
  const auto got = run_three_steps(adam);
  expect_history(got, adam_by_hand(1e-3, 0.0, false));
  // With bias correction the first step moves every weight by η (sign of the gradient).
  EXPECT_NEAR(got[0][0], 1.0 - 1e-3, 1e-9);
  EXPECT_NEAR(got[0][1], -2.0 + 1e-3, 1e-9);
}

TEST(Optimizer, AdamWithL2AddsDecayToTheGradient) {
  Adam adam({.learning_rate = 0.1, .weight_decay = 0.5});
  expect_history(run_three_steps(adam), adam_by_hand(0.1, 0.5, false));
}

TEST(Optimizer, AdamWDecouplesTheWeightDecay) {
  AdamW adamw({.learning_rate = 0.1, .weight_decay = 0.5});
  expect_history(run_three_steps(adamw), adam_by_hand(0.1, 0.5, true));
  // And it differs from L2-regularised Adam.
  EXPECT_GT(std::abs(adam_by_hand(0.1, 0.5, true)[2][2] - adam_by_hand(0.1, 0.5, false)[2][2]),
            1e-3);
}

TEST(Optimizer, Float32UpdatesMatchTheFormulaToSinglePrecision) {
  Adam adam({.learning_rate = 0.1});
  expect_history(run_three_steps(adam, DType::f32), adam_by_hand(0.1, 0.0, false), 1e-5);
  // SGD on the quadratic: w_t = w0 (1 − η a)^t.
  SGD sgd({.learning_rate = 0.1});
  std::vector<std::vector<double>> want;
  for (int t = 1; t <= 3; ++t) {
    want.push_back({});
    for (std::size_t i = 0; i < 3; ++i) want.back().push_back(w0[i] * std::pow(1 - 0.1 * a[i], t));
  }
  expect_history(run_three_steps(sgd, DType::f32), want, 1e-6);
}

TEST(Optimizer, StepUpdatesAGraphParameterFromPlanGradients) {
  Graph g;
  const Value w = g.parameter("w", Tensor::from(w0, {3}));
  const Value loss = mul(g.scalar(0.5), sum(mul(g.constant(Tensor::from(a, {3})), mul(w, w))));
  const std::vector<Value> grads = grad(loss, {w});
  Plan plan = compile(g, {loss, grads[0]});
  SGD sgd({.learning_rate = 0.1});
  std::vector<Tensor> params = {g.value_of(w)};
  auto out = plan.run({});
  EXPECT_NEAR(out[0].item(), 0.5 * (1 * 1 + 4 * 4 + 0.25 * 9), 1e-5);
  sgd.step(params, std::span<const Tensor>(out.data() + 1, 1));
  const auto updated = g.value_of(w).to_doubles();  // the graph's own tensor changed
  for (std::size_t i = 0; i < 3; ++i) EXPECT_NEAR(updated[i], w0[i] * (1 - 0.1 * a[i]), 1e-6);
}

TEST(Optimizer, StepsAfterTheFirstDoNotAllocate) {
  // Small parameters (updated on the calling thread), then large ones (split across threads when
  // there are several).
  for (const std::int64_t large : {64, 300}) {
    std::vector<Tensor> params = {Tensor({large, large}, DType::f32), Tensor({100}, DType::f64)};
    std::vector<Tensor> grads = {Tensor::full({large, large}, 0.1),
                                 Tensor::full({100}, 0.2, DType::f64)};
    Adam adam;
    Momentum momentum;
    AdaGrad adagrad;
    RMSProp rmsprop;
    SGD sgd;
    for (Optimizer* optimizer :
         std::initializer_list<Optimizer*>{&adam, &momentum, &adagrad, &rmsprop, &sgd}) {
      optimizer->step(params, grads);  // creates the state
      const long before = g_allocations.load();
      for (int k = 0; k < 5; ++k) optimizer->step(params, grads);
      EXPECT_EQ(g_allocations.load() - before, 0) << optimizer->name() << ", " << large;
      // The counter does see allocations made in the library (state() builds a vector).
      const long probe = g_allocations.load();
      EXPECT_FALSE(optimizer->state().empty());
      EXPECT_GT(g_allocations.load() - probe, 0);
    }
  }
}

double rosenbrock(double x, double y, double* dx, double* dy) {
  *dx = -2 * (1 - x) - 400 * x * (y - x * x);
  *dy = 200 * (y - x * x);
  return (1 - x) * (1 - x) + 100 * (y - x * x) * (y - x * x);
}

void minimise_rosenbrock(Optimizer& optimizer, int steps, double tolerance) {
  std::vector<Tensor> params = {Tensor::from({-1.2, 1.0}, {2}, DType::f64)};
  std::vector<Tensor> grads = {Tensor({2}, DType::f64)};
  for (int k = 0; k < steps; ++k) {
    double* w = params[0].data<double>();
    double* g = grads[0].data<double>();
    rosenbrock(w[0], w[1], &g[0], &g[1]);
    optimizer.step(params, grads);
  }
  EXPECT_NEAR(params[0].at(0), 1.0, tolerance) << optimizer.name();
  EXPECT_NEAR(params[0].at(1), 1.0, tolerance) << optimizer.name();
}

TEST(Optimizer, AdamConvergesOnRosenbrock) {
  Adam adam({.learning_rate = 0.01});
  minimise_rosenbrock(adam, 20000, 1e-3);
}

TEST(Optimizer, MomentumConvergesOnRosenbrock) {
  Momentum momentum({.learning_rate = 1e-3, .momentum = 0.9});
  minimise_rosenbrock(momentum, 30000, 1e-3);
}

TEST(Optimizer, LBFGSConvergesOnRosenbrockInFewEvaluations) {
  std::vector<Tensor> params = {Tensor::from({-1.2, 1.0}, {2}, DType::f64)};
  // Stop on the gradient (max|g| <= 1e-9), not on a small change of the loss.
  LBFGS lbfgs({.max_iterations = 200, .tolerance_grad = 1e-9, .tolerance_change = 0});
  const double loss = lbfgs.step(params, [&](std::span<Tensor> grads) {
    double* g = grads[0].data<double>();
    return rosenbrock(params[0].at(0), params[0].at(1), &g[0], &g[1]);
  });
  EXPECT_LT(loss, 1e-12);
  EXPECT_NEAR(params[0].at(0), 1.0, 1e-6);
  EXPECT_NEAR(params[0].at(1), 1.0, 1e-6);
  EXPECT_LT(lbfgs.evaluations(), 200);  // plain gradient descent needs many thousands
}

TEST(Optimizer, LBFGSWithStrongWolfeConvergesOnRosenbrock) {
  std::vector<Tensor> params = {Tensor::from({-1.2, 1.0}, {2}, DType::f64)};
  LBFGS lbfgs({.max_iterations = 200,
               .tolerance_grad = 1e-9,
               .tolerance_change = 0,
               .line_search = LineSearch::strong_wolfe});
  const double loss = lbfgs.step(params, [&](std::span<Tensor> grads) {
    double* g = grads[0].data<double>();
    return rosenbrock(params[0].at(0), params[0].at(1), &g[0], &g[1]);
  });
  EXPECT_LT(loss, 1e-12);
  EXPECT_NEAR(params[0].at(0), 1.0, 1e-6);
  EXPECT_NEAR(params[0].at(1), 1.0, 1e-6);
  EXPECT_LT(lbfgs.evaluations(), 200);
}

TEST(Optimizer, LBFGSLineSearchesStopWhereTheirConditionsHold) {
  // f(w) = ½ w², w0 = 100: the first iteration tries t = 1/‖g‖₁ = 0.01 along d = −g = −100,
  // i.e. w = 99. Armijo accepts it (99²/2 <= 100²/2 − 1e-4·0.01·100²). Strong Wolfe also needs
  // |f'(w)·d| = 100|w| <= 0.9·100² i.e. |w| <= 90, so it doubles t: w = 98, 96, 92, 84.
  const auto run = [](LineSearch search, double learning_rate) {
    std::vector<Tensor> params = {Tensor::from({100.0}, {1}, DType::f64)};
    LBFGS lbfgs({.learning_rate = learning_rate, .max_iterations = 1, .line_search = search});
    lbfgs.step(params, [&](std::span<Tensor> grads) {
      const double w = params[0].at(0);
      grads[0].set(0, w);
      return 0.5 * w * w;
    });
    return params[0].at(0);
  };
  EXPECT_DOUBLE_EQ(run(LineSearch::armijo, 1.0), 99.0);
  EXPECT_DOUBLE_EQ(run(LineSearch::strong_wolfe, 1.0), 84.0);
  // η = 195 overshoots to w = −95: Armijo takes it; strong Wolfe sees the slope 9500 > 9000 turn
  // positive and zooms into [0, 1.95], where the cubic through both ends finds the exact minimum.
  EXPECT_DOUBLE_EQ(run(LineSearch::armijo, 195.0), -95.0);
  EXPECT_NEAR(run(LineSearch::strong_wolfe, 195.0), 0.0, 1e-9);
}

TEST(Optimizer, LBFGSSolvesAnIllConditionedQuadraticInF32Parameters) {
  // f(w) = ½ Σ cᵢ (wᵢ − 1)², condition number 1000, split over two f32 tensors.
  std::vector<Tensor> params = {Tensor({10}, DType::f32), Tensor({2, 5}, DType::f32)};
  const auto curvature = [](std::size_t k) { return std::pow(1000.0, k / 19.0); };
  LBFGS lbfgs({.max_iterations = 500, .tolerance_change = 1e-15});
  lbfgs.step(params, [&](std::span<Tensor> grads) {
    double loss = 0;
    for (std::size_t p = 0; p < 2; ++p) {
      for (std::int64_t i = 0; i < 10; ++i) {
        const double c = curvature(p * 10 + static_cast<std::size_t>(i));
        const double d = params[p].at(i) - 1;
        loss += 0.5 * c * d * d;
        grads[p].set(i, c * d);
      }
    }
    return loss;
  });
  for (const Tensor& p : params) {
    for (double v : p.to_doubles()) EXPECT_NEAR(v, 1.0, 1e-4);
  }
}

TEST(Optimizer, LBFGSFitsAGraphParameterThroughACompiledPlan) {
  // Least squares through the engine: loss = ½ Σ a (w − 1)², gradients from grad() and a plan.
  Graph g;
  const Value w = g.parameter("w", Tensor::from(w0, {3}, DType::f64));
  const Value diff = sub(w, g.constant(Tensor::full({3}, 1.0, DType::f64)));
  const Value loss = mul(g.scalar(0.5, DType::f64),
                         sum(mul(g.constant(Tensor::from(a, {3}, DType::f64)), mul(diff, diff))));
  const std::vector<Value> grads = grad(loss, {w});
  Plan plan = compile(g, {loss, grads[0]});
  std::vector<Tensor> params = {g.value_of(w)};
  LBFGS lbfgs;
  const double final_loss = lbfgs.step(params, [&](std::span<Tensor> grads_out) {
    auto out = plan.run({});
    grads_out[0].copy_from(out[1]);
    return out[0].item();
  });
  EXPECT_LT(final_loss, 1e-14);
  for (double v : g.value_of(w).to_doubles()) EXPECT_NEAR(v, 1.0, 1e-7);
}

void expect_error(const std::function<void()>& f, std::initializer_list<std::string> fragments) {
  try {
    f();
    ADD_FAILURE() << "no error raised";
  } catch (const Error& e) {
    for (const auto& fragment : fragments) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos)
          << "\"" << e.what() << "\" lacks \"" << fragment << "\"";
    }
  }
}

TEST(Optimizer, BadHyperparametersNameTheOptimiserAndTheValue) {
  expect_error([] { SGD({.learning_rate = 0}); }, {"SGD", "learning rate", "got 0"});
  expect_error([] { Adam({.learning_rate = -1}); }, {"Adam", "got -1"});
  expect_error([] { AdamW({.learning_rate = NAN}); }, {"AdamW", "got nan"});
  expect_error([] { Momentum({.momentum = -0.5}); }, {"Momentum", "momentum", "got -0.5"});
  expect_error([] { Nesterov({.momentum = 1.0}); }, {"Nesterov", "momentum", "got 1"});
  expect_error([] { Adam({.beta2 = 1.5}); }, {"Adam", "beta2", "got 1.5"});
  expect_error([] { RMSProp({.decay = -0.1}); }, {"RMSProp", "decay"});
  expect_error([] { AdaGrad({.weight_decay = -1}); }, {"AdaGrad", "weight decay", "got -1"});
  expect_error([] { LBFGS({.history_size = 0}); }, {"LBFGS", "history_size"});
  expect_error([] { LBFGS({.wolfe_c2 = 1e-5}); }, {"LBFGS", "wolfe_c2", "got 1e-05"});
  SGD sgd;
  expect_error([&] { sgd.set_learning_rate(-0.1); }, {"SGD", "got -0.1"});
}

TEST(Optimizer, MismatchedGradientsNameParameterAndGradient) {
  std::vector<Tensor> params = {Tensor({2, 3}, DType::f32)};
  std::vector<Tensor> wrong_shape = {Tensor({3, 2}, DType::f32)};
  std::vector<Tensor> wrong_dtype = {Tensor({2, 3}, DType::f64)};
  Adam adam;
  expect_error([&] { adam.step(params, wrong_shape); },
               {"Adam", "gradient 0 is f32[3,2]", "parameter 0 is f32[2,3]"});
  expect_error([&] { adam.step(params, wrong_dtype); }, {"f64[2,3]", "f32[2,3]"});
  expect_error([&] { adam.step(params, {}); }, {"1 parameters but 0 gradients"});
  std::vector<Tensor> ints = {Tensor({2}, DType::i32)};
  expect_error([&] { adam.step(ints, ints); }, {"parameter 0 is i32[2]"});
  // After the first step the state fixes the parameters.
  std::vector<Tensor> grads = {Tensor({2, 3}, DType::f32)};
  adam.step(params, grads);
  std::vector<Tensor> other = {Tensor({4}, DType::f32)};
  expect_error([&] { adam.step(other, other); }, {"state was created for f32[2,3]"});
  adam.reset();
  adam.step(other, other);
  EXPECT_EQ(adam.steps(), 1);
}

TEST(Optimizer, LBFGSResumedFromItsStateTakesTheSameSteps) {
  const auto closure_for = [](std::vector<Tensor>& params) {
    return [&params](std::span<Tensor> grads) {
      double* g = grads[0].data<double>();
      return rosenbrock(params[0].at(0), params[0].at(1), &g[0], &g[1]);
    };
  };
  std::vector<Tensor> params = {Tensor::from({-1.2, 1.0}, {2}, DType::f64)};
  LBFGS original({.max_iterations = 5});
  original.step(params, closure_for(params));
  NamedTensors saved;
  for (const auto& [name, tensor] : original.state()) saved.emplace_back(name, tensor.clone());
  ASSERT_EQ(saved.size(), 6u);

  std::vector<Tensor> copy = {params[0].clone()};
  std::vector<Tensor> restart = {params[0].clone()};
  LBFGS resumed({.max_iterations = 5});
  resumed.load_state(saved);
  EXPECT_EQ(resumed.evaluations(), original.evaluations());
  original.step(params, closure_for(params));
  resumed.step(copy, closure_for(copy));
  EXPECT_EQ(copy[0].to_doubles(), params[0].to_doubles());
  // Without the history the same step goes elsewhere (it restarts with steepest descent).
  LBFGS fresh({.max_iterations = 5});
  fresh.step(restart, closure_for(restart));
  EXPECT_NE(restart[0].to_doubles(), params[0].to_doubles());

  expect_error([&] { LBFGS({.history_size = 3}).load_state(saved); },
               {"LBFGS", "\"s\" has shape [10,2], expected [3,2]"});
  expect_error(
      [&] {
        resumed.load_state({{"z", Tensor::scalar(0, DType::f64)}});
      },
      {"unknown state tensor \"z\""});
}

TEST(Optimizer, LBFGSRefusesOtherParametersAndANonFiniteStart) {
  std::vector<Tensor> params = {Tensor({2}, DType::f64)};
  LBFGS lbfgs;
  const auto zero_loss = [](std::span<Tensor>) { return 0.0; };
  EXPECT_EQ(lbfgs.step(params, zero_loss), 0.0);
  std::vector<Tensor> other = {Tensor({3}, DType::f64)};
  expect_error([&] { lbfgs.step(other, zero_loss); },
               {"LBFGS", "parameter 0 is f64[3]", "created for f64[2]"});
  expect_error([&] { lbfgs.step(params, [](std::span<Tensor>) { return NAN; }); },
               {"LBFGS", "non-finite loss (nan)"});
  std::vector<Tensor> ints = {Tensor({2}, DType::i32)};
  expect_error([&] { LBFGS().step(ints, zero_loss); }, {"parameter 0 is i32[2]"});
}

TEST(Optimizer, LoadedStateContinuesExactlyLikeTheOriginal) {
  std::vector<Tensor> params = {Tensor::from(w0, {3}, DType::f64)};
  std::vector<Tensor> grads = {Tensor::from({0.3, -0.2, 0.5}, {3}, DType::f64)};
  Adam original({.learning_rate = 0.1});
  original.step(params, grads);
  original.step(params, grads);
  NamedTensors saved;
  for (const auto& [name, tensor] : original.state()) saved.emplace_back(name, tensor.clone());
  ASSERT_EQ(saved.size(), 3u);  // step, m.0, v.0
  EXPECT_EQ(saved[0].first, "step");
  EXPECT_EQ(saved[0].second.item(), 2.0);

  std::vector<Tensor> copy = {params[0].clone()};
  Adam resumed({.learning_rate = 0.1});
  resumed.load_state(saved);
  EXPECT_EQ(resumed.steps(), 2);
  original.step(params, grads);
  resumed.step(copy, grads);
  EXPECT_EQ(params[0].to_doubles(), copy[0].to_doubles());

  expect_error(
      [&] {
        resumed.load_state(
            {{"step", Tensor::scalar(1, DType::f64)}, {"moment.0", Tensor({3}, DType::f64)}});
      },
      {"Adam", "unknown state tensor \"moment.0\""});
  expect_error(
      [&] {
        resumed.load_state(
            {{"step", Tensor::scalar(1, DType::f64)}, {"m.0", Tensor({3}, DType::f64)}});
      },
      {"\"v.0\" is missing"});
  expect_error([&] { resumed.load_state({}); }, {"no \"step\""});
}

TEST(Clip, GlobalNormScalesAllGradientsTogether) {
  std::vector<Tensor> grads = {Tensor::from({3, 4}, {2}), Tensor::from({12}, {1}, DType::f64)};
  EXPECT_DOUBLE_EQ(global_norm(grads), 13.0);
  EXPECT_DOUBLE_EQ(clip_grad_norm(grads, 6.5), 13.0);  // the norm before clipping
  EXPECT_EQ(grads[0].to_doubles(), (std::vector<double>{1.5, 2.0}));
  EXPECT_EQ(grads[1].to_doubles(), (std::vector<double>{6.0}));
  EXPECT_NEAR(global_norm(grads), 6.5, 1e-12);
  // Below the threshold nothing changes.
  EXPECT_NEAR(clip_grad_norm(grads, 100), 6.5, 1e-12);
  EXPECT_EQ(grads[1].to_doubles(), (std::vector<double>{6.0}));
}

TEST(Clip, NonFiniteNormLeavesGradientsForTheCallerToSkip) {
  std::vector<Tensor> grads = {Tensor::from({1, NAN}, {2})};
  EXPECT_TRUE(std::isnan(clip_grad_norm(grads, 1.0)));
  EXPECT_EQ(grads[0].at(0), 1.0);
}

TEST(Clip, ByValueClampsEachElement) {
  std::vector<Tensor> grads = {Tensor::from({-3, -0.5, 0.2, 7}, {4}),
                               Tensor::from({2, -2}, {2}, DType::f64)};
  clip_grad_value(grads, 1.0);
  EXPECT_EQ(grads[0].to_doubles(), (std::vector<double>{-1, -0.5, 0.2f, 1}));
  EXPECT_EQ(grads[1].to_doubles(), (std::vector<double>{1, -1}));
}

TEST(Clip, BadThresholdsAndDtypesAreErrors) {
  std::vector<Tensor> grads = {Tensor::from({1}, {1})};
  expect_error([&] { clip_grad_norm(grads, 0); }, {"clip_grad_norm", "got 0"});
  expect_error([&] { clip_grad_value(grads, -1); }, {"clip_grad_value", "got -1"});
  std::vector<Tensor> ints = {Tensor({2}, DType::i32)};
  expect_error([&] { clip_grad_norm(ints, 1); }, {"gradient 0 is i32[2]"});
}

}  // namespace
}  // namespace dagrad
