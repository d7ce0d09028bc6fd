// gates: perceptrons with hand-set weights compute AND, OR and NAND; XOR, which no single
// perceptron can compute, is learned by a 2-4-1 sigmoid network trained with plain gradient
// descent on dagrad's gradients.
#include <cstdio>

#include "dagrad.hpp"

using namespace dagrad;

namespace {

const Tensor inputs = Tensor::from({0, 0, 0, 1, 1, 0, 1, 1}, {4, 2});

// h = step(x·w + b) for the four input rows.
bool print_perceptron(const char* name, double w1, double w2, double b, const int expected[4]) {
  Graph g;
  Value x = g.input("x", {4, 2});
  Value w = g.constant(Tensor::from({w1, w2}, {2, 1}), "w");
  Value bias = g.constant(Tensor::scalar(b), "b");
  Value h = step(matmul(x, w) + bias);
  Tensor out = compile(g, {h}).run({{x, inputs}})[0].clone();
  std::printf("%s (w = (%.1f, %.1f), b = %.1f)\n  x1 x2 | h\n", name, w1, w2, b);
  bool all = true;
  for (int i = 0; i < 4; ++i) {
    const int value = static_cast<int>(out.at(i));
    all = all && value == expected[i];
    std::printf("   %d  %d | %d%s\n", static_cast<int>(inputs.at(2 * i)),
                static_cast<int>(inputs.at(2 * i + 1)), value,
                value == expected[i] ? "" : "  WRONG");
  }
  return all;
}

}  // namespace

int main() {
  const int and_table[4] = {0, 0, 0, 1}, or_table[4] = {0, 1, 1, 1}, nand_table[4] = {1, 1, 1, 0};
  bool ok = print_perceptron("AND", 0.5, 0.5, -0.7, and_table);
  ok = print_perceptron("OR", 0.5, 0.5, -0.2, or_table) && ok;
  ok = print_perceptron("NAND", -0.5, -0.5, 0.7, nand_table) && ok;

  // XOR: y = sigmoid(sigmoid(x·W1 + b1)·W2 + b2), trained on E = ½ Σ (y − t)².
  Graph g;
  Value x = g.input("x", {4, 2});
  Value t = g.input("t", {4, 1});
  Value W1 = g.parameter("W1", Tensor::from({0.8, -0.6, 0.3, -0.9, -0.7, 0.9, -0.4, 0.5}, {2, 4}));
  Value b1 = g.parameter("b1", Tensor::from({0.1, -0.1, 0.2, -0.2}, {4}));
  Value W2 = g.parameter("W2", Tensor::from({0.7, -0.8, 0.6, -0.5}, {4, 1}));
  Value b2 = g.parameter("b2", Tensor::from({0.0}, {1}));
  Value h = sigmoid(matmul(x, W1) + b1);
  Value y = sigmoid(matmul(h, W2) + b2);
  Value loss = sum_of_squares(y, t);
  std::vector<Value> params{W1, b1, W2, b2};
  std::vector<Value> grads = grad(loss, params);
  std::vector<Value> outputs{loss, y};
  outputs.insert(outputs.end(), grads.begin(), grads.end());
  Plan plan = compile(g, outputs);
  const Tensor targets = Tensor::from({0, 1, 1, 0}, {4, 1});
  const double learning_rate = 2.0;
  for (int epoch = 0; epoch <= 5000; ++epoch) {
    const auto& out = plan.run({{x, inputs}, {t, targets}});
    if (epoch % 1000 == 0) std::printf("XOR epoch %4d: E = %.6f\n", epoch, out[0].item());
    for (std::size_t k = 0; k < params.size(); ++k) {  // plain gradient descent: w ← w − η ∂E/∂w
      Tensor& w = g.value_of(params[k]);
      float* data = w.data<float>();
      const float* d = out[2 + k].data<float>();
      for (std::int64_t i = 0; i < w.numel(); ++i)
        data[i] -= static_cast<float>(learning_rate) * d[i];
    }
  }
  const Tensor result = plan.run({{x, inputs}, {t, targets}})[1].clone();
  std::printf("XOR (2-4-1 sigmoid network)\n  x1 x2 | y       | rounded | target\n");
  bool xor_ok = true;
  for (int i = 0; i < 4; ++i) {
    const int rounded = result.at(i) > 0.5 ? 1 : 0;
    const int target = static_cast<int>(targets.at(i));
    xor_ok = xor_ok && rounded == target;
    std::printf("   %d  %d | %.4f  | %d       | %d%s\n", static_cast<int>(inputs.at(2 * i)),
                static_cast<int>(inputs.at(2 * i + 1)), result.at(i), rounded, target,
                rounded == target ? "" : "  WRONG");
  }
  ok = ok && xor_ok;
  std::printf("%s\n", ok ? "all four gates are right" : "SOME GATE IS WRONG");
  return ok ? 0 : 1;
}
