// Shape (row-major dimensions) and TensorDesc (dtype + shape).
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "graph/dtype.hpp"

namespace dagrad {

// Dimensions of a dense row-major tensor. A scalar has rank 0.
class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<std::int64_t> dims) : dims_(dims) {}
  explicit Shape(std::vector<std::int64_t> dims) : dims_(std::move(dims)) {}

  int rank() const { return static_cast<int>(dims_.size()); }
  std::int64_t operator[](int axis) const { return dims_[static_cast<std::size_t>(axis)]; }
  std::int64_t& operator[](int axis) { return dims_[static_cast<std::size_t>(axis)]; }
  const std::vector<std::int64_t>& dims() const { return dims_; }
  std::vector<std::int64_t>& dims() { return dims_; }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : dims_) n *= d;
    return n;
  }
  // Row-major strides in elements.
  std::vector<std::int64_t> strides() const;
  bool operator==(const Shape&) const = default;
  auto operator<=>(const Shape&) const = default;
  std::string str() const;  // "[2,3]"

 private:
  std::vector<std::int64_t> dims_;
};

// dtype and shape of a value; fixed when the node that produces it is added.
struct TensorDesc {
  DType dtype = DType::f32;
  Shape shape;
  std::int64_t numel() const { return shape.numel(); }
  std::size_t bytes() const { return static_cast<std::size_t>(numel()) * size_of(dtype); }
  bool operator==(const TensorDesc&) const = default;
  std::string str() const;  // "f32[2,3]"
};

// Normalises a possibly negative axis against a rank; throws ShapeError naming `what`.
int normalize_axis(std::int64_t axis, int rank, std::string_view what);

// NumPy broadcasting of two shapes; throws ShapeError naming `what` when they are incompatible.
Shape broadcast_shapes(const Shape& a, const Shape& b, std::string_view what);

}  // namespace dagrad

template <>
struct fmt::formatter<dagrad::Shape> : fmt::formatter<std::string> {
  auto format(const dagrad::Shape& shape, format_context& ctx) const {
    return fmt::formatter<std::string>::format(shape.str(), ctx);
  }
};
template <>
struct fmt::formatter<dagrad::TensorDesc> : fmt::formatter<std::string> {
  auto format(const dagrad::TensorDesc& desc, format_context& ctx) const {
    return fmt::formatter<std::string>::format(desc.str(), ctx);
  }
};
