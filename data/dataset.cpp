#include "data/dataset.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <tuple>

#include "data/idx.hpp"
#include "data/random.hpp"
#include "graph/error.hpp"

namespace dagrad::data {

namespace {

constexpr std::array<std::string_view, 10> fashion_mnist_names = {
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot",
};

// The file `stem` or `stem.gz` in `dir`, whichever exists (plain first); empty when neither.
std::filesystem::path find_idx_file(const std::filesystem::path& dir, const std::string& stem) {
  std::error_code ignored;
  for (const std::string& name : {stem, stem + ".gz"}) {
    const std::filesystem::path candidate = dir / name;
    if (std::filesystem::is_regular_file(candidate, ignored)) return candidate;
  }
  return {};
}

template <class F>
void visit_floating(Tensor& images, std::string_view what, F&& f) {
  switch (images.dtype()) {
    case DType::f32:
      f(images.data<float>());
      return;
    case DType::f64:
      f(images.data<double>());
      return;
    case DType::i32:
      break;
  }
  throw Error(fmt::format("{}: images must be f32 or f64, got {}", what, images.desc()));
}

}  // namespace

std::span<const std::string_view> fashion_mnist_class_names() {
  return fashion_mnist_names;
}

Dataset load_idx_pair(const std::filesystem::path& images_file,
                      const std::filesystem::path& labels_file, ImageLayout layout,
                      std::int64_t num_classes) {
  const IdxArray images = read_idx(images_file);
  const IdxArray labels = read_idx(labels_file);
  if (images.dims.size() != 3) {
    throw IOError(fmt::format("{}: expected 3-D images [N, H, W], the file holds {} {}",
                              images_file.string(), fmt::join(images.dims, "×"),
                              to_string(images.type)));
  }
  if (labels.dims.size() != 1) {
    throw IOError(fmt::format("{}: expected 1-D labels [N], the file holds {} {}",
                              labels_file.string(), fmt::join(labels.dims, "×"),
                              to_string(labels.type)));
  }
  if (labels.type == IdxType::f32 || labels.type == IdxType::f64) {
    throw IOError(fmt::format("{}: labels must be integers, the file holds {}",
                              labels_file.string(), to_string(labels.type)));
  }
  if (images.dims[0] != labels.dims[0]) {
    throw IOError(fmt::format("{} holds {} images but {} holds {} labels", images_file.string(),
                              images.dims[0], labels_file.string(), labels.dims[0]));
  }

  Dataset dataset;
  dataset.num_classes = num_classes;
  dataset.labels = labels.to_tensor(DType::i32);
  const auto label_values = std::as_const(dataset.labels).span<std::int32_t>();
  for (std::size_t i = 0; i < label_values.size(); ++i) {
    if (label_values[i] < 0 || label_values[i] >= num_classes) {
      throw IOError(fmt::format("{}: label {} at index {} is outside [0, {})", labels_file.string(),
                                label_values[i], i, num_classes));
    }
  }

  const std::int64_t count = images.dims[0];
  const std::int64_t height = images.dims[1];
  const std::int64_t width = images.dims[2];
  const Tensor pixels = images.to_tensor(DType::f32);
  dataset.images = layout == ImageLayout::nchw ? pixels.reshaped(Shape{count, 1, height, width})
                                               : pixels.reshaped(Shape{count, height * width});
  return dataset;
}

Dataset load_mnist_like(const std::filesystem::path& dir, Split split, ImageLayout layout) {
  const std::string prefix = split == Split::train ? "train" : "t10k";
  const std::string images_stem = prefix + "-images-idx3-ubyte";
  const std::string labels_stem = prefix + "-labels-idx1-ubyte";
  const std::filesystem::path images_file = find_idx_file(dir, images_stem);
  const std::filesystem::path labels_file = find_idx_file(dir, labels_stem);

  std::vector<std::string> missing;
  if (images_file.empty()) missing.push_back(images_stem + "(.gz)");
  if (labels_file.empty()) missing.push_back(labels_stem + "(.gz)");
  if (!missing.empty()) {
    throw IOError(fmt::format(
        "{}: missing {} for the {} split. Install Fashion-MNIST with `apt-get install "
        "dataset-fashion-mnist` (it goes to {}), or point --data at a directory holding the four "
        "IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        "t10k-labels-idx1-ubyte (plain or .gz)",
        dir.string(), fmt::join(missing, " and "), prefix == "train" ? "train" : "test",
        default_fashion_mnist_dir));
  }
  return load_idx_pair(images_file, labels_file, layout, 10);
}

Normalization Normalization::standardize(const Tensor& images) {
  if (images.numel() == 0) {
    throw Error(fmt::format("Normalization::standardize: no pixels in images {}", images.desc()));
  }
  Tensor view = images;  // shares storage; visit_floating needs a non-const tensor
  double mean = 0.0;
  double variance = 0.0;
  visit_floating(view, "Normalization::standardize", [&](const auto* values) {
    const std::int64_t n = images.numel();
    double sum = 0.0;
    for (std::int64_t i = 0; i < n; ++i) sum += values[i];
    mean = sum / static_cast<double>(n);
    // Two passes: the squared deviations from the exact mean do not cancel catastrophically.
    double squares = 0.0;
    for (std::int64_t i = 0; i < n; ++i) {
      const double deviation = values[i] - mean;
      squares += deviation * deviation;
    }
    variance = squares / static_cast<double>(n);
  });
  if (!(variance > 0.0)) {
    throw Error(fmt::format(
        "Normalization::standardize: images {} are constant ({}), their standard deviation is 0",
        images.desc(), mean));
  }
  return {mean, std::sqrt(variance)};
}

void normalize(Tensor& images, const Normalization& normalization) {
  if (!(normalization.scale != 0.0) || !std::isfinite(normalization.scale)) {
    throw Error(
        fmt::format("normalize: scale must be finite and non-zero, got {}", normalization.scale));
  }
  visit_floating(images, "normalize", [&](auto* values) {
    using T = std::remove_pointer_t<decltype(values)>;
    const auto mean = static_cast<T>(normalization.mean);
    const auto inverse_scale = static_cast<T>(1.0 / normalization.scale);
    for (std::int64_t i = 0; i < images.numel(); ++i)
      values[i] = (values[i] - mean) * inverse_scale;
  });
}

Dataset subset(const Dataset& dataset, std::span<const std::int64_t> indices) {
  const std::int64_t n = dataset.size();
  if (dataset.images.shape().rank() == 0 || dataset.images.shape()[0] != n) {
    throw Error(fmt::format("subset: images {} do not match labels {}", dataset.images.desc(),
                            dataset.labels.desc()));
  }
  Shape images_shape = dataset.images.shape();
  images_shape[0] = static_cast<std::int64_t>(indices.size());
  Dataset result;
  result.num_classes = dataset.num_classes;
  result.images = Tensor(images_shape, dataset.images.dtype());
  result.labels = Tensor(Shape{static_cast<std::int64_t>(indices.size())}, dataset.labels.dtype());

  const std::size_t image_bytes = n == 0 ? 0 : dataset.images.bytes() / static_cast<std::size_t>(n);
  const std::size_t label_bytes = size_of(dataset.labels.dtype());
  const auto* source_images = static_cast<const std::byte*>(dataset.images.raw());
  const auto* source_labels = static_cast<const std::byte*>(dataset.labels.raw());
  auto* images = static_cast<std::byte*>(result.images.raw());
  auto* labels = static_cast<std::byte*>(result.labels.raw());
  for (std::size_t i = 0; i < indices.size(); ++i) {
    const std::int64_t index = indices[i];
    if (index < 0 || index >= n) {
      throw Error(fmt::format("subset: index {} (position {}) is outside a dataset of {} examples",
                              index, i, n));
    }
    const auto source = static_cast<std::size_t>(index);
    std::memcpy(images + i * image_bytes, source_images + source * image_bytes, image_bytes);
    std::memcpy(labels + i * label_bytes, source_labels + source * label_bytes, label_bytes);
  }
  return result;
}

std::pair<Dataset, Dataset> split_train_validation(const Dataset& dataset,
                                                   std::int64_t validation_size,
                                                   std::uint64_t seed) {
  const std::int64_t n = dataset.size();
  if (validation_size < 0 || validation_size > n) {
    throw Error(fmt::format(
        "split_train_validation: cannot hold out {} validation examples from a dataset of {}",
        validation_size, n));
  }
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) order[static_cast<std::size_t>(i)] = i;
  Random random(seed);
  random.shuffle(order);
  const auto cut = order.begin() + validation_size;
  // Each part keeps the original order; loaders shuffle anyway.
  std::sort(order.begin(), cut);
  std::sort(cut, order.end());
  const std::span<const std::int64_t> all(order);
  const auto validation_count = static_cast<std::size_t>(validation_size);
  return {subset(dataset, all.subspan(validation_count)),
          subset(dataset, all.first(validation_count))};
}

TrainingData load_training_data(const TrainingDataOptions& options) {
  const Dataset full_train = load_mnist_like(options.dir, Split::train, options.layout);
  TrainingData data;
  data.test = load_mnist_like(options.dir, Split::test, options.layout);
  std::tie(data.train, data.validation) =
      split_train_validation(full_train, options.validation_size, options.seed);
  data.normalization = options.scaling == Scaling::standardize
                           ? Normalization::standardize(data.train.images)
                           : Normalization::unit_range();
  for (Dataset* part : {&data.train, &data.validation, &data.test}) {
    normalize(part->images, data.normalization);
  }
  return data;
}

}  // namespace dagrad::data
