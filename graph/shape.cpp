#include "graph/shape.hpp"

#include <fmt/ranges.h>

#include "graph/error.hpp"

namespace dagrad {

std::vector<std::int64_t> Shape::strides() const {
  std::vector<std::int64_t> strides(dims_.size(), 1);
  for (int i = rank() - 2; i >= 0; --i) strides[i] = strides[i + 1] * dims_[i + 1];
  return strides;
}

std::string Shape::str() const {
  return fmt::format("[{}]", fmt::join(dims_, ","));
}

std::string TensorDesc::str() const {
  return fmt::format("{}{}", dtype, shape.str());
}

int normalize_axis(std::int64_t axis, int rank, std::string_view what) {
  if (axis < -rank || axis >= rank) {
    throw ShapeError(fmt::format("{}: axis {} is out of range for rank {} (valid: {}..{})", what,
                                 axis, rank, -rank, rank - 1));
  }
  return static_cast<int>(axis < 0 ? axis + rank : axis);
}

Shape broadcast_shapes(const Shape& a, const Shape& b, std::string_view what) {
  const int rank = std::max(a.rank(), b.rank());
  std::vector<std::int64_t> dims(static_cast<std::size_t>(rank));
  for (int i = 0; i < rank; ++i) {
    const int ia = a.rank() - rank + i;
    const int ib = b.rank() - rank + i;
    const std::int64_t da = ia >= 0 ? a[ia] : 1;
    const std::int64_t db = ib >= 0 ? b[ib] : 1;
    if (da != db && da != 1 && db != 1) {
      throw ShapeError(fmt::format(
          "{}: cannot broadcast {} with {}: sizes {} and {} differ at axis {} (counted from the "
          "right: {})",
          what, a, b, da, db, i, rank - i));
    }
    dims[static_cast<std::size_t>(i)] = da == 1 ? db : da;
  }
  return Shape(std::move(dims));
}

}  // namespace dagrad
