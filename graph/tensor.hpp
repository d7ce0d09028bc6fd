// Tensor: dense row-major storage, 64-byte aligned (f32 matrices whose rows are a multiple of
// 4 KiB long start row_offset_4k bytes later: oneDNN's SGEMM is slow on them otherwise, see
// tensor.cpp), shared by reference.
// Lives in graph/ (not runtime/) because parameters and constants keep their data in the graph.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <vector>

#include "graph/error.hpp"
#include "graph/shape.hpp"

namespace dagrad {

class Tensor {
 public:
  static constexpr std::size_t alignment = 64;
  static constexpr std::size_t row_offset_4k = 16;

  Tensor() = default;
  // Allocates zero-filled storage for `desc`.
  explicit Tensor(TensorDesc desc);
  Tensor(Shape shape, DType dtype) : Tensor(TensorDesc{dtype, std::move(shape)}) {}

  // A tensor of `shape` holding `values` (row-major), converted to `dtype`.
  // Throws Error when the number of values does not match the shape.
  static Tensor from(std::span<const double> values, Shape shape, DType dtype = DType::f32);
  static Tensor from(std::initializer_list<double> values, Shape shape, DType dtype = DType::f32) {
    return from(std::span<const double>(values.begin(), values.size()), std::move(shape), dtype);
  }
  static Tensor from_floats(std::span<const float> values, Shape shape);
  static Tensor from_ints(std::span<const std::int32_t> values, Shape shape);
  static Tensor scalar(double value, DType dtype = DType::f32);
  static Tensor full(Shape shape, double value, DType dtype = DType::f32);
  // A non-owning view of memory kept alive by `owner`.
  static Tensor view(TensorDesc desc, void* data, std::shared_ptr<void> owner);

  bool defined() const { return data_ != nullptr || desc_.numel() == 0; }
  const TensorDesc& desc() const { return desc_; }
  const Shape& shape() const { return desc_.shape; }
  DType dtype() const { return desc_.dtype; }
  std::int64_t numel() const { return desc_.numel(); }
  std::size_t bytes() const { return desc_.bytes(); }

  void* raw() { return data_; }
  const void* raw() const { return data_; }
  // Typed access; throws Error when T does not match the dtype.
  template <class T>
  T* data() {
    check_type(dtype_of<T>());
    return static_cast<T*>(data_);
  }
  template <class T>
  const T* data() const {
    check_type(dtype_of<T>());
    return static_cast<const T*>(data_);
  }
  template <class T>
  std::span<T> span() {
    return {data<T>(), static_cast<std::size_t>(numel())};
  }
  template <class T>
  std::span<const T> span() const {
    return {data<T>(), static_cast<std::size_t>(numel())};
  }

  // Element at a flat row-major index, converted to double.
  double at(std::int64_t flat_index) const;
  void set(std::int64_t flat_index, double value);
  // The single value of a one-element tensor.
  double item() const;
  // All values converted to double.
  std::vector<double> to_doubles() const;

  Tensor clone() const;
  Tensor to(DType dtype) const;
  // Same storage, new shape with the same number of elements.
  Tensor reshaped(Shape shape) const;
  void fill(double value);
  void copy_from(const Tensor& source);  // same desc required

 private:
  void check_type(DType wanted) const;

  TensorDesc desc_;
  std::shared_ptr<void> owner_;
  void* data_ = nullptr;
};

}  // namespace dagrad
