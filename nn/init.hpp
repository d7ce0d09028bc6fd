// Parameter initialisers: seeded, reproducible tensors of a given shape and dtype.
//
// Every random initialiser draws from std::mt19937_64 seeded with `seed`, turning its 64-bit
// words into doubles with our own (portable) conversion: the same seed gives the same tensor on
// every platform and standard library. Values are drawn in f64 and rounded to the dtype.
//
// Fans. fan_in / fan_out are read from the shape:
//   rank 1  [n]                 fan_in = fan_out = n            (a bias or a scale)
//   rank 2  [in, out]           dense weight used as matmul(x, W): fan_in = in, fan_out = out
//   rank ≥3 [O, I, KH, KW, ...] convolution weight: receptive = KH·KW·…,
//                               fan_in = I·receptive, fan_out = O·receptive
// A fan-based initialiser refuses (dagrad::Error) a scalar shape and a fan of 0.
#pragma once

#include <cstdint>

#include "graph/tensor.hpp"

namespace dagrad::init {

struct Fans {
  std::int64_t in = 0;
  std::int64_t out = 0;
};

// fan_in and fan_out of a weight of `shape` (see the table above); `what` names the caller in
// error messages.
Fans fans(const Shape& shape, std::string_view what = "fans");

// All zeros (any dtype).
Tensor zeros(Shape shape, DType dtype = DType::f32);
// All `value` (any dtype; converted).
Tensor constant(Shape shape, double value, DType dtype = DType::f32);

// Uniform on [a, b). Error when a > b or either bound is not finite.
Tensor uniform(Shape shape, double a, double b, std::uint64_t seed, DType dtype = DType::f32);
// Normal with mean `mean` and standard deviation `stddev` ≥ 0 (Box–Muller).
Tensor normal(Shape shape, double mean, double stddev, std::uint64_t seed,
              DType dtype = DType::f32);

// LeCun normal: N(0, σ²) with σ² = 1 / fan_in.
Tensor lecun_normal(Shape shape, std::uint64_t seed, DType dtype = DType::f32);
// Xavier/Glorot uniform: U(−r, r) with r = √(6 / (fan_in + fan_out)).
Tensor xavier_uniform(Shape shape, std::uint64_t seed, DType dtype = DType::f32);
// Xavier/Glorot normal: N(0, σ²) with σ = √(2 / (fan_in + fan_out)).
Tensor xavier_normal(Shape shape, std::uint64_t seed, DType dtype = DType::f32);
// He/Kaiming uniform: U(−r, r) with r = √(6 / fan_in) (variance 2 / fan_in).
Tensor he_uniform(Shape shape, std::uint64_t seed, DType dtype = DType::f32);
// He/Kaiming normal: N(0, σ²) with σ = √(2 / fan_in).
Tensor he_normal(Shape shape, std::uint64_t seed, DType dtype = DType::f32);

}  // namespace dagrad::init
