// Element-wise arithmetic with NumPy broadcasting, and the basic unary functions.
#pragma once

#include <source_location>

#include "graph/graph.hpp"

namespace dagrad {

using Where = std::source_location;

// a + b, a - b, a * b, a / b with NumPy broadcasting; both inputs of one dtype.
Value add(const Value& a, const Value& b, Where where = Where::current());
Value sub(const Value& a, const Value& b, Where where = Where::current());
Value mul(const Value& a, const Value& b, Where where = Where::current());
Value div(const Value& a, const Value& b, Where where = Where::current());
Value neg(const Value& x, Where where = Where::current());      // -x
Value exp(const Value& x, Where where = Where::current());      // e^x
Value log(const Value& x, Where where = Where::current());      // natural log (x > 0)
Value sigmoid(const Value& x, Where where = Where::current());  // 1 / (1 + e^-x)
Value tanh(const Value& x, Where where = Where::current());
// max(x, 0). Gradient 1 for x > 0 and 0 for x <= 0 (the subgradient 0 at the kink).
Value relu(const Value& x, Where where = Where::current());
// relu's backward: dy where x > 0, else 0. Differentiable in dy; its gradient in x is 0
// (the true derivative almost everywhere, and the value chosen at the kink).
Value relu_grad(const Value& dy, const Value& x, Where where = Where::current());

// A constant scalar of x's dtype, in x's graph.
Value scalar_like(const Value& x, double value);

Value operator+(const Value& a, const Value& b);
Value operator-(const Value& a, const Value& b);
Value operator*(const Value& a, const Value& b);
Value operator/(const Value& a, const Value& b);
Value operator-(const Value& x);
Value operator+(const Value& a, double b);
Value operator-(const Value& a, double b);
Value operator*(const Value& a, double b);
Value operator/(const Value& a, double b);
Value operator+(double a, const Value& b);
Value operator-(double a, const Value& b);
Value operator*(double a, const Value& b);
Value operator/(double a, const Value& b);

}  // namespace dagrad
