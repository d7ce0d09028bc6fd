#include "nn/init.hpp"

#include <fmt/format.h>

#include <cmath>
#include <numbers>
#include <random>

namespace dagrad::init {

namespace {

// A double uniform on [0, 1) from the top 53 bits of one 64-bit word.
double unit_uniform(std::mt19937_64& rng) {
  return static_cast<double>(rng() >> 11) * 0x1.0p-53;
}

void require_floating(DType dtype, std::string_view what) {
  if (!is_floating(dtype)) {
    throw Error(
        fmt::format("init::{}: a random initialiser needs f32 or f64, got {}", what, dtype));
  }
}

template <class Draw>
Tensor fill_with(Shape shape, DType dtype, std::string_view what, Draw&& draw) {
  require_floating(dtype, what);
  Tensor tensor(std::move(shape), dtype);
  const std::int64_t n = tensor.numel();
  if (dtype == DType::f32) {
    float* dst = tensor.data<float>();
    for (std::int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(draw());
  } else {
    double* dst = tensor.data<double>();
    for (std::int64_t i = 0; i < n; ++i) dst[i] = draw();
  }
  return tensor;
}

Tensor uniform_named(Shape shape, double a, double b, std::uint64_t seed, DType dtype,
                     std::string_view what) {
  if (!std::isfinite(a) || !std::isfinite(b) || a > b) {
    throw Error(
        fmt::format("init::{}: needs finite bounds a <= b, got a = {}, b = {}", what, a, b));
  }
  std::mt19937_64 rng(seed);
  return fill_with(std::move(shape), dtype, what, [&] { return a + (b - a) * unit_uniform(rng); });
}

Tensor normal_named(Shape shape, double mean, double stddev, std::uint64_t seed, DType dtype,
                    std::string_view what) {
  if (!std::isfinite(mean) || !std::isfinite(stddev) || stddev < 0) {
    throw Error(fmt::format(
        "init::{}: needs a finite mean and a finite standard deviation >= 0, got mean = {}, "
        "stddev = {}",
        what, mean, stddev));
  }
  std::mt19937_64 rng(seed);
  // Box–Muller gives two independent normals per pair of uniforms; keep the second for the
  // next element. 1 − u keeps the logarithm's argument in (0, 1].
  bool have_spare = false;
  double spare = 0;
  return fill_with(std::move(shape), dtype, what, [&] {
    if (have_spare) {
      have_spare = false;
      return mean + stddev * spare;
    }
    const double radius = std::sqrt(-2.0 * std::log(1.0 - unit_uniform(rng)));
    const double angle = 2.0 * std::numbers::pi * unit_uniform(rng);
    spare = radius * std::sin(angle);
    have_spare = true;
    return mean + stddev * radius * std::cos(angle);
  });
}

}  // namespace

Fans fans(const Shape& shape, std::string_view what) {
  if (shape.rank() == 0) {
    throw Error(fmt::format(
        "init::{}: a fan-based initialiser needs a shape of rank >= 1 ([in,out] for a dense "
        "weight, [O,I,KH,KW] for a convolution), got the scalar shape {}",
        what, shape));
  }
  Fans result;
  if (shape.rank() == 1) {
    result = {shape[0], shape[0]};
  } else if (shape.rank() == 2) {
    result = {shape[0], shape[1]};
  } else {
    std::int64_t receptive = 1;
    for (int axis = 2; axis < shape.rank(); ++axis) receptive *= shape[axis];
    result = {shape[1] * receptive, shape[0] * receptive};
  }
  if (result.in <= 0 || result.out <= 0) {
    throw Error(
        fmt::format("init::{}: shape {} gives fan_in = {} and fan_out = {}; both must be "
                    "positive",
                    what, shape, result.in, result.out));
  }
  return result;
}

Tensor zeros(Shape shape, DType dtype) {
  return Tensor(std::move(shape), dtype);
}

Tensor constant(Shape shape, double value, DType dtype) {
  return Tensor::full(std::move(shape), value, dtype);
}

Tensor uniform(Shape shape, double a, double b, std::uint64_t seed, DType dtype) {
  return uniform_named(std::move(shape), a, b, seed, dtype, "uniform");
}

Tensor normal(Shape shape, double mean, double stddev, std::uint64_t seed, DType dtype) {
  return normal_named(std::move(shape), mean, stddev, seed, dtype, "normal");
}

Tensor lecun_normal(Shape shape, std::uint64_t seed, DType dtype) {
  const Fans f = fans(shape, "lecun_normal");
  const double stddev = std::sqrt(1.0 / static_cast<double>(f.in));
  return normal_named(std::move(shape), 0.0, stddev, seed, dtype, "lecun_normal");
}

Tensor xavier_uniform(Shape shape, std::uint64_t seed, DType dtype) {
  const Fans f = fans(shape, "xavier_uniform");
  const double bound = std::sqrt(6.0 / static_cast<double>(f.in + f.out));
  return uniform_named(std::move(shape), -bound, bound, seed, dtype, "xavier_uniform");
}

Tensor xavier_normal(Shape shape, std::uint64_t seed, DType dtype) {
  const Fans f = fans(shape, "xavier_normal");
  const double stddev = std::sqrt(2.0 / static_cast<double>(f.in + f.out));
  return normal_named(std::move(shape), 0.0, stddev, seed, dtype, "xavier_normal");
}

Tensor he_uniform(Shape shape, std::uint64_t seed, DType dtype) {
  const Fans f = fans(shape, "he_uniform");
  const double bound = std::sqrt(6.0 / static_cast<double>(f.in));
  return uniform_named(std::move(shape), -bound, bound, seed, dtype, "he_uniform");
}

Tensor he_normal(Shape shape, std::uint64_t seed, DType dtype) {
  const Fans f = fans(shape, "he_normal");
  const double stddev = std::sqrt(2.0 / static_cast<double>(f.in));
  return normal_named(std::move(shape), 0.0, stddev, seed, dtype, "he_normal");
}

}  // namespace dagrad::init
