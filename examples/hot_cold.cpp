// hot_cold: learning one weight, first by hot/cold search, then by gradient descent with
// dagrad's grad(), and finally with a learning rate so large that the error grows.
//
// The network: prediction = input × weight; error = (prediction − goal)².
#include <cmath>
#include <cstdio>

#include "dagrad.hpp"

using namespace dagrad;

namespace {

// The error graph with the weight as a trainable parameter; returns (plan, weight).
struct Problem {
  Graph graph;
  Value input, goal, weight, prediction, error, weight_gradient;
  Plan plan;

  explicit Problem(double initial_weight)
      : input(graph.input("input", {})),
        goal(graph.input("goal", {})),
        weight(graph.parameter("weight", Tensor::scalar(initial_weight))),
        prediction(input * weight),
        error((prediction - goal) * (prediction - goal)),
        weight_gradient(grad(error, {weight})[0]),
        plan(compile(graph, {prediction, error, weight_gradient})) {}

  // Returns prediction, error, d error / d weight at the current weight.
  std::array<double, 3> evaluate(double x, double target) {
    auto out = plan.run({{input, Tensor::scalar(x)}, {goal, Tensor::scalar(target)}});
    return {out[0].item(), out[1].item(), out[2].item()};
  }
  double get_weight() { return graph.value_of(weight).item(); }
  void set_weight(double w) { graph.value_of(weight).set(0, w); }
};

}  // namespace

int main() {
  const double input = 0.5, goal = 0.8;
  Problem p(0.5);
  auto [prediction, error, gradient] = p.evaluate(input, goal);
  std::printf("input %.2f, weight %.2f, goal %.2f -> prediction %.4f, error %.4f\n", input,
              p.get_weight(), goal, prediction, error);

  std::printf("\n-- hot/cold learning (step 0.001) --\n");
  const double step = 0.001;
  for (int iteration = 0; iteration < 1101; ++iteration) {
    const double w = p.get_weight();
    auto [pred, err, unused] = p.evaluate(input, goal);
    (void)pred;
    (void)unused;
    p.set_weight(w + step);
    const double up = p.evaluate(input, goal)[1];
    p.set_weight(w - step);
    const double down = p.evaluate(input, goal)[1];
    if (iteration % 250 == 0)
      std::printf("iteration %4d: weight %.3f error %.6f\n", iteration, w, err);
    p.set_weight(down < up ? w - step : w + step);
    if (err == 0.0) break;
  }
  auto final_hot_cold = p.evaluate(input, goal);
  std::printf("hot/cold: weight %.3f prediction %.4f error %.6f\n", p.get_weight(),
              final_hot_cold[0], final_hot_cold[1]);

  auto descend = [&](double alpha, int steps, double x) {
    p.set_weight(0.5);
    double last_error = 0;
    for (int i = 0; i < steps; ++i) {
      auto [pred, err, grad_w] = p.evaluate(x, goal);
      std::printf("  step %2d: weight %9.4f prediction %9.4f error %12.6f\n", i, p.get_weight(),
                  pred, err);
      p.set_weight(p.get_weight() - alpha * grad_w);
      last_error = err;
    }
    return last_error;
  };
  std::printf("\n-- gradient descent, alpha 1.0, d error / d weight from dagrad's grad() --\n");
  const double converged = descend(1.0, 20, input);
  std::printf("\n-- gradient descent, input 2.0, alpha 0.3: too large, the error grows --\n");
  const double diverged = descend(0.3, 8, 2.0);
  std::printf("\nconverging run ends at error %.6f; diverging run ends at error %.1f (%s)\n",
              converged, diverged, diverged > 1.0 ? "diverged" : "did not diverge");
  return 0;
}
