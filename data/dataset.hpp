// In-memory image classification datasets (MNIST, Fashion-MNIST and anything stored the
// same way): loading, normalisation, train/validation splits.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "graph/tensor.hpp"

namespace dagrad::data {

// Examples stored as two tensors with the same first dimension N.
struct Dataset {
  Tensor images;  // f32 [N, C, H, W] or [N, C*H*W]
  Tensor labels;  // i32 [N], each in [0, num_classes)
  std::int64_t num_classes = 0;

  std::int64_t size() const { return labels.numel(); }
};

enum class Split { train, test };

enum class ImageLayout {
  nchw,  // [N, 1, H, W], for convolutions
  flat,  // [N, H*W], for dense layers
};

// Where the Debian package dataset-fashion-mnist installs the four IDX files.
inline constexpr std::string_view default_fashion_mnist_dir = "/usr/share/datasets/fashion-mnist/";

// The Fashion-MNIST class names, indexed by label.
std::span<const std::string_view> fashion_mnist_class_names();

// Reads an images IDX file (3-D [N, H, W], any numeric type, converted to f32 with the raw pixel
// values 0..255) and a labels IDX file (1-D [N], integer type, each in [0, num_classes)).
// Throws IOError naming both files when the counts differ, and naming the file, the index
// and the value when a label is out of range.
Dataset load_idx_pair(const std::filesystem::path& images_file,
                      const std::filesystem::path& labels_file, ImageLayout layout,
                      std::int64_t num_classes = 10);

// Reads one split of an MNIST-like dataset (10 classes) from `dir`, which holds
// train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
// t10k-labels-idx1-ubyte, each plain or with a .gz suffix. Throws IOError saying which files
// are missing and how to get them.
Dataset load_mnist_like(const std::filesystem::path& dir, Split split,
                        ImageLayout layout = ImageLayout::nchw);

// An affine pixel transform: x -> (x - mean) / scale, applied to every image element.
struct Normalization {
  double mean = 0.0;
  double scale = 1.0;

  // Maps raw u8 pixels 0..255 onto [0, 1].
  static Normalization unit_range() { return {0.0, 255.0}; }
  // Mean and standard deviation over every element of `images` (use the TRAINING images,
  // then apply the result to the validation and test sets too). Throws Error when the images
  // are empty or constant.
  static Normalization standardize(const Tensor& images);
};

// Applies `normalization` in place to the f32 or f64 `images`.
void normalize(Tensor& images, const Normalization& normalization);

// The examples at `indices`, in that order (copied). Throws Error for an index out of range.
Dataset subset(const Dataset& dataset, std::span<const std::int64_t> indices);

// A seeded random split: {train, validation} with `validation_size` examples held out.
// Disjoint, together they hold every example once. Throws Error when validation_size is
// negative or larger than the dataset.
std::pair<Dataset, Dataset> split_train_validation(const Dataset& dataset,
                                                   std::int64_t validation_size,
                                                   std::uint64_t seed);

enum class Scaling {
  unit_range,   // x / 255
  standardize,  // (x - mean) / std, both measured on the training part
};

struct TrainingDataOptions {
  std::filesystem::path dir{default_fashion_mnist_dir};
  ImageLayout layout = ImageLayout::nchw;
  std::int64_t validation_size = 5000;  // held out of the train split
  std::uint64_t seed = 0;               // chooses the validation examples
  Scaling scaling = Scaling::unit_range;
};

// The three sets a training run needs, normalised alike.
struct TrainingData {
  Dataset train;                // train split minus the validation examples
  Dataset validation;           // validation_size examples of the train split
  Dataset test;                 // the test split
  Normalization normalization;  // what was applied to all three
};

// Loads both splits of an MNIST-like dataset from options.dir, holds out a seeded validation
// set from the train split, and normalises all three sets with the transform chosen by
// options.scaling (standardisation statistics come from the training part only, so nothing
// about the validation or test images leaks into training).
TrainingData load_training_data(const TrainingDataOptions& options = {});

}  // namespace dagrad::data
