#include "graph/tensor.hpp"

#include <fmt/format.h>

#include <cstdlib>
#include <cstring>

namespace dagrad {

namespace {

std::shared_ptr<void> allocate(std::size_t bytes) {
  const std::size_t rounded =
      (bytes + Tensor::alignment - 1) / Tensor::alignment * Tensor::alignment;
  void* memory = std::aligned_alloc(Tensor::alignment, rounded == 0 ? Tensor::alignment : rounded);
  if (memory == nullptr) throw Error(fmt::format("tensor: cannot allocate {} bytes", bytes));
  std::memset(memory, 0, rounded == 0 ? Tensor::alignment : rounded);
  return std::shared_ptr<void>(memory, [](void* p) { std::free(p); });
}

// oneDNN 2.6's SGEMM (AVX2, no-copy path) runs x·W at about 60 % of its speed when W's rows are
// a multiple of 4 KiB apart and W starts on a 64-byte boundary. Measured with a raw oneDNN
// matmul, [64,3136]·[3136,1024], one thread: 38 GFLOP/s at offsets 0 and 64, 29 at 32, 63–64 at
// 16 bytes past a 64-byte boundary; shapes with other row lengths ([128,784]·[784,256], ...)
// are the same at every offset. Such f32 matrices (a dense layer with 1024 outputs) therefore
// start 16 bytes past a 64-byte boundary.
std::size_t storage_offset(const TensorDesc& desc) {
  if (desc.dtype != DType::f32 || desc.shape.rank() < 2) return 0;
  const std::size_t row_bytes = static_cast<std::size_t>(desc.shape.dims().back()) * sizeof(float);
  return row_bytes > 0 && row_bytes % 4096 == 0 ? Tensor::row_offset_4k : 0;
}

template <class F>
decltype(auto) visit_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32:
      return f(float{});
    case DType::f64:
      return f(double{});
    case DType::i32:
      return f(std::int32_t{});
  }
  throw Error("tensor: unknown dtype");
}

}  // namespace

Tensor::Tensor(TensorDesc desc) : desc_(std::move(desc)) {
  for (auto d : desc_.shape.dims()) {
    if (d < 0) throw ShapeError(fmt::format("tensor: negative dimension in shape {}", desc_.shape));
  }
  const std::size_t offset = storage_offset(desc_);
  owner_ = allocate(desc_.bytes() + offset);
  data_ = static_cast<char*>(owner_.get()) + offset;
}

Tensor Tensor::from(std::span<const double> values, Shape shape, DType dtype) {
  Tensor t(std::move(shape), dtype);
  if (static_cast<std::int64_t>(values.size()) != t.numel()) {
    throw Error(fmt::format("Tensor::from: {} values given for shape {} ({} elements)",
                            values.size(), t.shape(), t.numel()));
  }
  for (std::size_t i = 0; i < values.size(); ++i) t.set(static_cast<std::int64_t>(i), values[i]);
  return t;
}

Tensor Tensor::from_floats(std::span<const float> values, Shape shape) {
  Tensor t(std::move(shape), DType::f32);
  if (static_cast<std::int64_t>(values.size()) != t.numel()) {
    throw Error(fmt::format("Tensor::from_floats: {} values given for shape {} ({} elements)",
                            values.size(), t.shape(), t.numel()));
  }
  std::memcpy(t.raw(), values.data(), values.size_bytes());
  return t;
}

Tensor Tensor::from_ints(std::span<const std::int32_t> values, Shape shape) {
  Tensor t(std::move(shape), DType::i32);
  if (static_cast<std::int64_t>(values.size()) != t.numel()) {
    throw Error(fmt::format("Tensor::from_ints: {} values given for shape {} ({} elements)",
                            values.size(), t.shape(), t.numel()));
  }
  std::memcpy(t.raw(), values.data(), values.size_bytes());
  return t;
}

Tensor Tensor::scalar(double value, DType dtype) {
  Tensor t(Shape{}, dtype);
  t.set(0, value);
  return t;
}

Tensor Tensor::full(Shape shape, double value, DType dtype) {
  Tensor t(std::move(shape), dtype);
  t.fill(value);
  return t;
}

Tensor Tensor::view(TensorDesc desc, void* data, std::shared_ptr<void> owner) {
  Tensor t;
  t.desc_ = std::move(desc);
  t.owner_ = std::move(owner);
  t.data_ = data;
  return t;
}

void Tensor::check_type(DType wanted) const {
  if (wanted != desc_.dtype) {
    throw Error(
        fmt::format("tensor {}: accessed as {}, but its dtype is {}", desc_, wanted, desc_.dtype));
  }
}

double Tensor::at(std::int64_t i) const {
  if (i < 0 || i >= numel()) {
    throw Error(fmt::format("tensor {}: index {} out of range ({} elements)", desc_, i, numel()));
  }
  return visit_dtype(desc_.dtype, [&](auto zero) -> double {
    using T = decltype(zero);
    return static_cast<double>(static_cast<const T*>(data_)[i]);
  });
}

void Tensor::set(std::int64_t i, double value) {
  if (i < 0 || i >= numel()) {
    throw Error(fmt::format("tensor {}: index {} out of range ({} elements)", desc_, i, numel()));
  }
  visit_dtype(desc_.dtype, [&](auto zero) {
    using T = decltype(zero);
    static_cast<T*>(data_)[i] = static_cast<T>(value);
  });
}

double Tensor::item() const {
  if (numel() != 1) {
    throw Error(
        fmt::format("tensor {}: item() needs exactly one element, it has {}", desc_, numel()));
  }
  return at(0);
}

std::vector<double> Tensor::to_doubles() const {
  std::vector<double> out(static_cast<std::size_t>(numel()));
  for (std::int64_t i = 0; i < numel(); ++i) out[static_cast<std::size_t>(i)] = at(i);
  return out;
}

Tensor Tensor::clone() const {
  Tensor t(desc_);
  if (bytes() > 0) std::memcpy(t.raw(), data_, bytes());
  return t;
}

Tensor Tensor::to(DType dtype) const {
  if (dtype == desc_.dtype) return clone();
  Tensor t(shape(), dtype);
  visit_dtype(desc_.dtype, [&](auto src_zero) {
    using S = decltype(src_zero);
    visit_dtype(dtype, [&](auto dst_zero) {
      using D = decltype(dst_zero);
      const S* src = static_cast<const S*>(data_);
      D* dst = static_cast<D*>(t.raw());
      for (std::int64_t i = 0; i < numel(); ++i) dst[i] = static_cast<D>(src[i]);
    });
  });
  return t;
}

Tensor Tensor::reshaped(Shape shape) const {
  if (shape.numel() != numel()) {
    throw ShapeError(
        fmt::format("tensor {}: cannot reshape to {} ({} elements)", desc_, shape, shape.numel()));
  }
  Tensor t = *this;
  t.desc_.shape = std::move(shape);
  return t;
}

void Tensor::fill(double value) {
  visit_dtype(desc_.dtype, [&](auto zero) {
    using T = decltype(zero);
    T* p = static_cast<T*>(data_);
    for (std::int64_t i = 0; i < numel(); ++i) p[i] = static_cast<T>(value);
  });
}

void Tensor::copy_from(const Tensor& source) {
  if (source.desc() != desc_) {
    throw Error(fmt::format("tensor copy: source is {}, destination is {}", source.desc(), desc_));
  }
  if (bytes() > 0) std::memcpy(data_, source.raw(), bytes());
}

}  // namespace dagrad
