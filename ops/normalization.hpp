// Normalisation and regularisation: dropout, dropconnect, batch_norm (with its backward op),
// layer_norm, and the weight penalties (l1, l2, elastic net).
//
// Training or inference behaviour is chosen per run by RunOptions::training (RunContext at
// kernel level), so one graph serves both.
#pragma once

#include <cstdint>
#include <source_location>
#include <vector>

#include "graph/graph.hpp"

namespace dagrad {

// ---- dropout ------------------------------------------------------------------------------
//
// Inverted dropout. Training: y = x · m / (1 − rate) with m ~ Bernoulli(1 − rate) per element;
// inference: y = x. rate must lie in [0, 1) (ShapeError otherwise, naming the rate).
//
// The node has two outputs, y and the scaled mask m / (1 − rate) (all ones in inference);
// the backward is dx = dy ⊙ mask, reusing the forward's mask.
//
// The mask. Element i keeps its value when u_i ≥ rate, where u_i in [0, 1) comes from
// splitmix64 of a key and i (a counter-based generator: no state, the same mask in f32 and
// f64, in every kernel, and on every thread split). The key mixes:
//   - `seed` (the op's attribute), RunOptions::seed, and the node id (two dropout nodes of
//     one graph draw different masks);
//   - RunContext::step (the plan's run counter) ONLY when `vary_with_step` is set.
// Why step is opt-in: a plan counts every run, so a mask that follows step changes between
// the f(x+δ) and f(x−δ) evaluations of gradcheck, and between a forward run and a later
// evaluation run with the same options. By default the mask is a pure function of
// (seed, RunOptions::seed, node): a training loop draws a fresh mask each step by passing a
// fresh RunOptions::seed (e.g. the step number), which keeps every step reproducible; with
// `vary_with_step` the mask changes on every run of the plan without the caller's help.
Value dropout(const Value& x, double rate, std::int64_t seed = 0, bool vary_with_step = false,
              std::source_location where = std::source_location::current());
// Both outputs of dropout: {y, scaled mask}.
std::vector<Value> dropout_with_mask(const Value& x, double rate, std::int64_t seed = 0,
                                     bool vary_with_step = false,
                                     std::source_location where = std::source_location::current());

// DropConnect: dropout applied to a weight tensor w (then used by matmul/conv as usual):
// training: w · m / (1 − rate), m ~ Bernoulli(1 − rate) per weight; inference: w (identity).
// The same mask scheme as dropout: a fresh mask for each distinct RunOptions::seed (a trainer
// passes a new seed each step), or on every run of the plan when `vary_with_step` is set.
Value dropconnect(const Value& w, double rate, std::int64_t seed = 0, bool vary_with_step = false,
                  std::source_location where = std::source_location::current());

// ---- batch normalisation ------------------------------------------------------------------
//
// x is [N, C] or [N, C, H, W]; gamma, beta, running_mean, running_var are [C]. Statistics
// are per channel c over the M = N·H·W values of that channel.
//   training:  μ_c = mean, σ²_c = biased variance (÷ M) of the batch;
//              y = γ_c (x − μ_c) / √(σ²_c + ε) + β_c
//   inference: y = γ_c (x − running_mean_c) / √(running_var_c + ε) + β_c
// SIDE EFFECT in training: the kernel updates running_mean and running_var IN PLACE (it writes
// into the tensors bound to inputs 3 and 4), like PyTorch:
//   running_mean ← (1 − momentum) running_mean + momentum μ
//   running_var  ← (1 − momentum) running_var  + momentum σ² · M / (M − 1)   (unbiased)
// So running_mean and running_var should be non-trainable parameters
// (graph.parameter(name, tensor, /*trainable=*/false)) or fed inputs whose tensors the caller
// keeps; never values computed by other ops.
// A channel with a single value (M = 1, e.g. a batch of one [1, C]) cannot be normalised with
// batch statistics: a training run raises dagrad::Error naming the node and the shape
// (inference is fine).
// Gradients flow to x, gamma, beta in both modes and, in inference mode, to running_mean and
// running_var as well (in training mode y does not depend on them: their gradient is 0).
//
// The node has three outputs: y, and the statistics y was normalised with, saved for the
// backward (like dropout's mask): training: the batch mean μ and biased variance σ² per
// channel (accumulated in double, stored in x's dtype); inference: copies of running_mean and
// running_var. The backward is one batch_norm_grad node reading them, so it does not
// compute the batch statistics again. Second-order gradients are not implemented.
Value batch_norm(const Value& x, const Value& gamma, const Value& beta, const Value& running_mean,
                 const Value& running_var, double momentum = 0.1, double epsilon = 1e-5,
                 std::source_location where = std::source_location::current());
// All three outputs of batch_norm: {y, saved mean [C], saved variance [C]}. The saved
// statistics are differentiable like y (training: ∂μ/∂x = 1/M, ∂σ²/∂x = 2 (x − μ)/M;
// inference: they are the running statistics).
std::vector<Value> batch_norm_with_statistics(
    const Value& x, const Value& gamma, const Value& beta, const Value& running_mean,
    const Value& running_var, double momentum = 0.1, double epsilon = 1e-5,
    std::source_location where = std::source_location::current());

// batch_norm's backward: {dx, dgamma, dbeta, drunning_mean, drunning_var} for the incoming
// gradient dy, given the statistics batch_norm saved (saved_mean, saved_variance: its outputs 1
// and 2). With x̂ = (x − μ)/σ̂, σ̂ = √(σ²+ε), training (μ, σ² = the saved statistics):
//   dβ = Σ dy,  dγ = Σ dy x̂,  dx = γ / (M σ̂) (M dy − dβ − x̂ dγ),  drunning_* = 0;
// inference (μ, σ² = the running statistics; the saved ones are not read):
//   dx = γ dy / σ̂,  drunning_mean = −γ dβ / σ̂,  drunning_var = −γ dγ / (2 σ̂²).
// The node takes two more inputs, the gradients dμ, dσ² of the saved statistics, when those
// reach the loss (batch_norm's backward rule adds them only then):
//   training: dx += (dμ + 2 dσ² (x − μ)) / M;  inference: drunning_mean += dμ,
//   drunning_var += dσ².
std::vector<Value> batch_norm_grad(const Value& dy, const Value& x, const Value& gamma,
                                   const Value& running_mean, const Value& running_var,
                                   const Value& saved_mean, const Value& saved_variance,
                                   double epsilon = 1e-5,
                                   std::source_location where = std::source_location::current());

// ---- layer normalisation ------------------------------------------------------------------
//
// Normalises over the trailing axes from `axis` (negative counts from the end):
//   μ = mean(x), σ² = mean((x − μ)²) over those axes, y = γ (x − μ) / √(σ² + ε) + β
// gamma and beta have the shape of those trailing axes (x.shape[axis:]); ShapeError otherwise.
// Same behaviour in training and inference. One op (oneDNN layer_normalization for f32); its
// backward is built from ops (mean, sub, mul, log, exp, with 1/√v = e^(−½ ln v)), recomputing
// the statistics from x, so gradients of every order are available.
Value layer_norm(const Value& x, const Value& gamma, const Value& beta, std::int64_t axis = -1,
                 double epsilon = 1e-5,
                 std::source_location where = std::source_location::current());

// ---- weight penalties (composites, to add to a loss) --------------------------------------
//
// All take a non-empty list of values of one graph and one dtype, and return a scalar.
// |w| is built as relu(w) + relu(−w): its gradient is sign(w), with the subgradient 0 at 0.
//
// λ Σ_p Σ_i |w_pi|
Value l1_penalty(const std::vector<Value>& params, double lambda);
// (λ / 2) Σ_p Σ_i w_pi²   (the ½ makes the gradient λ w, "weight decay λ")
Value l2_penalty(const std::vector<Value>& params, double lambda);
// l1 Σ |w| + (l2 / 2) Σ w²
Value elastic_net_penalty(const std::vector<Value>& params, double l1, double l2);

}  // namespace dagrad
