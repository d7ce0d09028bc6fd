// The first program of README.md: a 2-8-1 sigmoid network learns XOR with plain gradient
// descent on gradients from grad(), run by a compiled plan.
#include <cstdio>
#include <dagrad.hpp>

using namespace dagrad;

int main() {
  Graph g;
  Value x = g.input("x", {4, 2});  // f32 unless told otherwise
  Value t = g.input("t", {4, 1});
  Value W1 = g.parameter("W1", Tensor::from({0.5, -0.4, 0.3, 0.8, -0.6, 0.2, 0.7, -0.1,  //
                                             0.1, 0.9, -0.3, 0.4, -0.2, 0.6, 0.5, -0.7},
                                            {2, 8}));
  Value b1 = g.parameter("b1", Tensor({8}, DType::f32));
  Value W2 = g.parameter("W2", Tensor::from({0.3, -0.2, 0.5, -0.4, 0.2, -0.6, 0.4, -0.1}, {8, 1}));
  Value h = sigmoid(matmul(x, W1) + b1);  // ops are free functions; + - * / are overloaded
  Value y = sigmoid(matmul(h, W2));
  Value loss = mse(y, t);
  std::vector<Value> params{W1, b1, W2};
  std::vector<Value> grads = grad(loss, params);  // a gradient graph, built from ops
  Plan plan =
      compile(g, {loss, y, grads[0], grads[1], grads[2]});  // oneDNN primitives created once

  Tensor xs = Tensor::from({0, 0, 0, 1, 1, 0, 1, 1}, {4, 2});
  Tensor ts = Tensor::from({0, 1, 1, 0}, {4, 1});
  for (int step = 0; step <= 4000; ++step) {
    const auto& out = plan.run({{x, xs}, {t, ts}});  // reused on every run
    if (step % 1000 == 0) std::printf("step %4d  loss %.5f\n", step, out[0].item());
    for (std::size_t k = 0; k < params.size(); ++k) {  // w ← w − η ∂loss/∂w
      Tensor& w = g.value_of(params[k]);
      for (std::int64_t i = 0; i < w.numel(); ++i) w.set(i, w.at(i) - 4.0 * out[2 + k].at(i));
    }
  }
  const Tensor& y_out = plan.run({{x, xs}, {t, ts}})[1];
  std::printf("XOR: %.2f %.2f %.2f %.2f\n", y_out.at(0), y_out.at(1), y_out.at(2), y_out.at(3));

  // The same update run by the plan itself (plain SGD, runtime/plan.hpp): 1000 more steps.
  Plan train = compile(g, {loss}, SGDUpdate{.params = params, .grads = grads});
  for (int step = 0; step < 1000; ++step) train.run({{x, xs}, {t, ts}}, {.learning_rate = 4.0});
  std::printf("1000 more steps with SGDUpdate: loss %.5f\n",
              plan.run({{x, xs}, {t, ts}})[0].item());
}
