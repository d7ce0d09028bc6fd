// approximate: universal approximation in one dimension. A single hidden layer of sigmoid units,
//   y(x) = Σ_j v_j σ(w_j x + b_j) + c,
// is fitted by Adam on the mean squared error to
//   f(x) = sin(3x) + 0.5 sin(7x) + [x > 0.3]   on [−1, 1]
// (smooth wiggles plus a unit step at x = 0.3) with 2, 8 and 32 hidden units. Each sigmoid is
// a soft step, so more units can place more steps: the error falls as the layer widens. Prints
// the final error of each width and writes approximate.csv and (with gnuplot) approximate.png
// into the directory given as the first argument (default: approximate_out).
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "dagrad.hpp"
#include "nn/optimizer.hpp"
#include "nn/schedule.hpp"

using namespace dagrad;

namespace {

constexpr std::int64_t points = 256;
constexpr int steps = 6000;
constexpr double learning_rate = 0.1;

double target_function(double x) {
  return std::sin(3 * x) + 0.5 * std::sin(7 * x) + (x > 0.3 ? 1.0 : 0.0);
}

struct Fit {
  std::int64_t units = 0;
  double error = 0;         // final mean squared error on the training points
  std::vector<double> fit;  // y at every point
};

Fit fit_units(std::int64_t units, const Tensor& xs, const Tensor& targets) {
  // Each unit starts as a soft step σ(w (x − c)) centred at a random point c of [−1, 1]
  // (b = −w c), so the units cover the interval from the start, with a steepness |w| drawn
  // log-uniformly in [3, 1000]: gentle units fit the waves, steep ones can become the jump
  // (Adam moves w by about its learning rate per step, too slowly to sharpen a gentle unit).
  std::mt19937_64 random(static_cast<std::uint64_t>(units));
  std::uniform_real_distribution<double> centre(-1.0, 1.0), sign(-1.0, 1.0);
  std::uniform_real_distribution<double> log_steepness(std::log(3.0), std::log(1000.0));
  std::normal_distribution<double> output(0.0, 0.1);
  std::vector<double> w(units), b(units), v(units);
  for (std::int64_t j = 0; j < units; ++j) {
    w[j] = (sign(random) < 0 ? -1.0 : 1.0) * std::exp(log_steepness(random));
    b[j] = -w[j] * centre(random);
    v[j] = output(random);
  }
  Graph g;
  Value x = g.input("x", {points, 1});
  Value t = g.input("t", {points, 1});
  Value W1 = g.parameter("W1", Tensor::from(w, {1, units}));
  Value b1 = g.parameter("b1", Tensor::from(b, {units}));
  Value W2 = g.parameter("W2", Tensor::from(v, {units, 1}));
  Value b2 = g.parameter("b2", Tensor::from({0.0}, {1}));
  Value hidden = sigmoid(matmul(x, W1) + b1);
  Value y = matmul(hidden, W2) + b2;
  Value loss = mse(y, t);
  const std::vector<Value> params{W1, b1, W2, b2};
  const std::vector<Value> grads = grad(loss, params);
  std::vector<Value> outputs{loss, y};
  outputs.insert(outputs.end(), grads.begin(), grads.end());
  Plan plan = compile(g, outputs);

  std::vector<Tensor> param_tensors;
  for (const auto& p : params) param_tensors.push_back(g.value_of(p));  // shares storage
  Adam adam(AdamOptions{.learning_rate = learning_rate});
  // Large steps early, small ones late for a precise final fit.
  const CosineDecay schedule(learning_rate, steps, learning_rate / 100);
  std::vector<Tensor> grad_tensors(params.size());
  for (int step = 0; step < steps; ++step) {
    adam.set_learning_rate(schedule.learning_rate(step));
    const auto& out = plan.run({{x, xs}, {t, targets}});
    for (std::size_t k = 0; k < params.size(); ++k) grad_tensors[k] = out[2 + k];
    adam.step(param_tensors, grad_tensors);
  }
  const auto& out = plan.run({{x, xs}, {t, targets}});
  Fit result{units, out[0].item(), {}};
  for (std::int64_t i = 0; i < points; ++i) result.fit.push_back(out[1].at(i));
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  // The tensors hold a few hundred numbers: waking threads would cost more than they save.
  set_num_threads(1);
  const std::filesystem::path out_dir = argc > 1 ? argv[1] : "approximate_out";
  std::filesystem::create_directories(out_dir);
  std::vector<double> x_values, t_values;
  for (std::int64_t i = 0; i < points; ++i) {
    const double x = -1.0 + 2.0 * static_cast<double>(i) / static_cast<double>(points - 1);
    x_values.push_back(x);
    t_values.push_back(target_function(x));
  }
  const Tensor xs = Tensor::from(x_values, {points, 1});
  const Tensor targets = Tensor::from(t_values, {points, 1});

  std::printf("f(x) = sin(3x) + 0.5 sin(7x) + [x > 0.3] on [-1, 1], %lld points\n",
              static_cast<long long>(points));
  std::printf(
      "one hidden layer of sigmoid units, Adam (learning rate %g, cosine decay to 1/100), %d "
      "full-batch steps\n\n",
      learning_rate, steps);
  std::printf("hidden units | final mean squared error\n");
  std::vector<Fit> fits;
  for (std::int64_t units : {2, 8, 32}) {
    fits.push_back(fit_units(units, xs, targets));
    std::printf("%12lld | %.6f\n", static_cast<long long>(units), fits.back().error);
  }

  const std::filesystem::path csv = out_dir / "approximate.csv";
  {
    std::ofstream out(csv);
    out << "x,target";
    for (const auto& f : fits) out << "," << f.units << " units";
    out << '\n';
    for (std::int64_t i = 0; i < points; ++i) {
      out << x_values[i] << ',' << t_values[i];
      for (const auto& f : fits) out << ',' << f.fit[i];
      out << '\n';
    }
  }
  std::printf("\nwrote %s\n", csv.string().c_str());
  if (std::system("command -v gnuplot >/dev/null 2>&1") == 0) {
    const std::filesystem::path png = out_dir / "approximate.png";
    const std::filesystem::path script = out_dir / "approximate.gnuplot";
    std::ofstream(script)
        << "set datafile separator ','\nset key autotitle columnhead left top\nset grid\n"
        << "set terminal pngcairo size 900,550\nset output '" << png.string() << "'\n"
        << "set xlabel 'x'\nset ylabel 'y'\n"
        << "set title 'one hidden layer of sigmoid units fitted to f(x)'\n"
        << "plot '" << csv.string() << "' using 1:2 with lines lw 3 lc 'black', "
        << "for [i=3:" << fits.size() + 2 << "] '' using 1:i with lines lw 2\n";
    if (std::system(("gnuplot '" + script.string() + "' >/dev/null 2>&1").c_str()) == 0) {
      std::printf("wrote %s\n", png.string().c_str());
    } else {
      std::printf("gnuplot failed; the CSV remains\n");
    }
  } else {
    std::printf("gnuplot is not installed; skipping the plot\n");
  }

  bool falls = true;
  for (std::size_t k = 1; k < fits.size(); ++k) falls = falls && fits[k].error < fits[k - 1].error;
  std::printf("%s\n", falls ? "the error falls as the hidden layer widens"
                            : "THE ERROR DID NOT FALL WITH WIDTH");
  return falls ? 0 : 1;
}
