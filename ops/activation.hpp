// Activation functions and the element-wise selections, powers and comparisons around them.
// Every function works element by element on f32 or f64 values; the binary ones broadcast
// their inputs with NumPy rules.
#pragma once

#include <cstdint>
#include <source_location>

#include "graph/graph.hpp"

namespace dagrad {

// ---- activations --------------------------------------------------------------------------

// The perceptron's threshold: y = 1 if x > 0 else 0 (so step(0) = 0).
// Has NO gradient (piecewise constant): grad() through it raises GraphError naming step.
Value step(const Value& x, std::source_location where = std::source_location::current());

// y = x. Gradient: the incoming gradient unchanged.
Value identity(const Value& x, std::source_location where = std::source_location::current());

// y = x if x > 0 else alpha·x. dy/dx = 1 for x > 0, alpha for x <= 0 (alpha at the kink).
Value leaky_relu(const Value& x, double alpha = 0.01,
                 std::source_location where = std::source_location::current());

// y = x if x > 0 else alpha·(e^x − 1). dy/dx = 1 for x > 0, y + alpha = alpha·e^x for x <= 0
// (the left derivative alpha at 0; continuous there when alpha = 1).
Value elu(const Value& x, double alpha = 1.0,
          std::source_location where = std::source_location::current());

// y = ln(1 + e^x), computed stably as max(x, 0) + ln(1 + e^−|x|) (no overflow for large x,
// no underflow to a wrong value for very negative x). dy/dx = sigmoid(x).
Value softplus(const Value& x, std::source_location where = std::source_location::current());

// The standard normal CDF: Φ(x) = ½·(1 + erf(x/√2)). dΦ/dx = φ(x) = e^(−x²/2)/√(2π).
Value normal_cdf(const Value& x, std::source_location where = std::source_location::current());

// GELU, erf form: y = x·Φ(x) = ½·x·(1 + erf(x/√2)). dy/dx = Φ(x) + x·φ(x).
Value gelu(const Value& x, std::source_location where = std::source_location::current());

// GELU's backward as one op: dx = dy·(Φ(x) + x·φ(x)) (one oneDNN eltwise_backward instead of
// Φ, φ and four element-wise steps). dy and x have the same shape.
Value gelu_grad(const Value& dy, const Value& x,
                std::source_location where = std::source_location::current());

// Maxout along `axis` (negative counts from the end). The axis, of size F, is cut into
// F / pieces groups of `pieces` consecutive features; output feature j is the maximum of group j:
//   y[..., j, ...] = max_{k < pieces} x[..., j·pieces + k, ...]   (size F / pieces along axis).
// ShapeError when F is not divisible by pieces. The gradient goes to the arg-max of each group
// (the first one on ties).
Value maxout(const Value& x, std::int64_t pieces, std::int64_t axis = -1,
             std::source_location where = std::source_location::current());

// maxout's backward: dx (x's shape) holding dy[..., j, ...] at the first arg-max of each group
// of x and 0 elsewhere. Linear in dy (its gradient in dy gathers at the same arg-maxes); its
// gradient in x is 0 (true almost everywhere; the value chosen at ties).
Value maxout_grad(const Value& dy, const Value& x, std::int64_t pieces, std::int64_t axis = -1,
                  std::source_location where = std::source_location::current());

// ---- powers -------------------------------------------------------------------------------

// y = x^exponent. dy/dx = exponent·x^(exponent − 1). For a non-integer exponent x must be
// >= 0 (NaN otherwise); for a negative exponent x must be nonzero.
Value pow(const Value& x, double exponent,
          std::source_location where = std::source_location::current());

// y = √x for x >= 0 (NaN for x < 0). dy/dx = 1 / (2·y) (infinite at 0).
Value sqrt(const Value& x, std::source_location where = std::source_location::current());

// ---- selection ----------------------------------------------------------------------------

// y = max(a, b) with broadcasting. The gradient goes to a where a >= b and to b where a < b
// (ties: all of it to a).
Value maximum(const Value& a, const Value& b,
              std::source_location where = std::source_location::current());
// y = min(a, b) with broadcasting. The gradient goes to a where a <= b and to b where a > b
// (ties: all of it to a).
Value minimum(const Value& a, const Value& b,
              std::source_location where = std::source_location::current());

// y = a where cond != 0 else b; cond, a and b broadcast together. cond is an f32/f64 0/1 mask
// or i32; a and b share one floating dtype, which y has. The gradient flows to a where cond
// holds and to b elsewhere; cond gets none (it is a selector, not a quantity).
Value where(const Value& cond, const Value& a, const Value& b,
            std::source_location location = std::source_location::current());

// ---- comparisons --------------------------------------------------------------------------
// 1 where the relation holds and 0 elsewhere, with broadcasting, in the inputs' floating dtype
// (so a mask multiplies directly). No gradient: the result is piecewise constant in a and b.

Value greater(const Value& a, const Value& b,
              std::source_location where = std::source_location::current());  // a > b
Value greater_equal(const Value& a, const Value& b,
                    std::source_location where = std::source_location::current());  // a >= b
Value less(const Value& a, const Value& b,
           std::source_location where = std::source_location::current());  // a < b
Value less_equal(const Value& a, const Value& b,
                 std::source_location where = std::source_location::current());  // a <= b
Value equal(const Value& a, const Value& b,
            std::source_location where = std::source_location::current());  // a == b
Value not_equal(const Value& a, const Value& b,
                std::source_location where = std::source_location::current());  // a != b

}  // namespace dagrad
