#include "data/loader.hpp"

#include <fmt/format.h>

#include <cstring>
#include <memory>
#include <numeric>

#include "data/random.hpp"
#include "graph/error.hpp"

namespace dagrad::data {

namespace {

// The first `rows` rows of `buffer`, sharing its storage.
Tensor leading_rows(const Tensor& buffer, std::int64_t rows) {
  Shape shape = buffer.shape();
  shape[0] = rows;
  return Tensor::view(TensorDesc{buffer.dtype(), shape}, const_cast<void*>(buffer.raw()),
                      std::make_shared<Tensor>(buffer));
}

}  // namespace

Loader::Loader(Dataset dataset, LoaderOptions options)
    : dataset_(std::move(dataset)), options_(options) {
  const std::int64_t n = dataset_.size();
  if (options_.batch_size < 1) {
    throw Error(fmt::format("Loader: batch size must be at least 1, got {}", options_.batch_size));
  }
  if (dataset_.labels.shape().rank() != 1 || dataset_.images.shape().rank() < 1 ||
      dataset_.images.shape()[0] != n) {
    throw Error(fmt::format("Loader: images {} and labels {} must share their first dimension",
                            dataset_.images.desc(), dataset_.labels.desc()));
  }
  if (n == 0) throw Error("Loader: the dataset is empty (0 examples)");
  if (options_.drop_last && n < options_.batch_size) {
    throw Error(
        fmt::format("Loader: drop_last with {} examples and batch size {} leaves no batch at all",
                    n, options_.batch_size));
  }
  image_bytes_ = dataset_.images.bytes() / static_cast<std::size_t>(n);
  label_bytes_ = size_of(dataset_.labels.dtype());
  const std::int64_t buffer_rows = std::min(options_.batch_size, n);
  Shape images_shape = dataset_.images.shape();
  images_shape[0] = buffer_rows;
  images_buffer_ = Tensor(images_shape, dataset_.images.dtype());
  labels_buffer_ = Tensor(Shape{buffer_rows}, dataset_.labels.dtype());
  order_.resize(static_cast<std::size_t>(n));
  start_epoch(0);
}

void Loader::start_epoch(std::int64_t epoch) {
  epoch_ = epoch;
  position_ = 0;
  std::iota(order_.begin(), order_.end(), std::int64_t{0});
  if (options_.shuffle) {
    Random random(mix_seed(options_.seed, static_cast<std::uint64_t>(epoch)));
    random.shuffle(order_);
  }
}

std::int64_t Loader::batches_per_epoch() const {
  const std::int64_t n = dataset_.size();
  return options_.drop_last ? n / options_.batch_size
                            : (n + options_.batch_size - 1) / options_.batch_size;
}

std::int64_t Loader::examples_per_epoch() const {
  return options_.drop_last ? batches_per_epoch() * options_.batch_size : dataset_.size();
}

const Batch* Loader::next() {
  const std::int64_t n = dataset_.size();
  const std::int64_t rows = std::min(options_.batch_size, n - position_);
  if (rows <= 0 || (options_.drop_last && rows < options_.batch_size)) return nullptr;

  const auto* source_images = static_cast<const std::byte*>(dataset_.images.raw());
  const auto* source_labels = static_cast<const std::byte*>(dataset_.labels.raw());
  auto* images = static_cast<std::byte*>(images_buffer_.raw());
  auto* labels = static_cast<std::byte*>(labels_buffer_.raw());
  for (std::int64_t row = 0; row < rows; ++row) {
    const auto source = static_cast<std::size_t>(order_[static_cast<std::size_t>(position_ + row)]);
    const auto destination = static_cast<std::size_t>(row);
    std::memcpy(images + destination * image_bytes_, source_images + source * image_bytes_,
                image_bytes_);
    std::memcpy(labels + destination * label_bytes_, source_labels + source * label_bytes_,
                label_bytes_);
  }
  if (rows == images_buffer_.shape()[0]) {
    batch_.images = images_buffer_;
    batch_.labels = labels_buffer_;
  } else {
    batch_.images = leading_rows(images_buffer_, rows);
    batch_.labels = leading_rows(labels_buffer_, rows);
  }
  batch_.indices = std::span<const std::int64_t>(order_).subspan(
      static_cast<std::size_t>(position_), static_cast<std::size_t>(rows));
  position_ += rows;
  return &batch_;
}

}  // namespace dagrad::data
