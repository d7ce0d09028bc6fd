// Uses the installed headers and library: d/dx sum(x*x) at x = (1, 2, 3) is (2, 4, 6).
#include <cstdio>
#include <dagrad.hpp>

int main() {
  dagrad::Graph g;
  auto x = g.input("x", {3});
  auto loss = dagrad::sum(x * x);
  auto dx = dagrad::grad(loss, {x})[0];
  auto plan = dagrad::compile(g, {dx});
  auto out = plan.run({{x, dagrad::Tensor::from({1, 2, 3}, {3})}});
  const bool ok = out[0].at(0) == 2 && out[0].at(1) == 4 && out[0].at(2) == 6;
  std::printf("consumer: %s\n", ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
