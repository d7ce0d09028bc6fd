#include "data/augment.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string_view>

#include "graph/error.hpp"

namespace dagrad::data {

namespace {

struct ImageGeometry {
  std::int64_t count, channels, height, width;
  std::int64_t plane() const { return height * width; }
  std::int64_t image() const { return channels * height * width; }
};

ImageGeometry geometry(const Tensor& images, std::string_view what) {
  if (images.shape().rank() != 4 || !is_floating(images.dtype())) {
    throw Error(fmt::format("{}: images must be a floating [N, C, H, W] tensor, got {}", what,
                            images.desc()));
  }
  const Shape& s = images.shape();
  return {s[0], s[1], s[2], s[3]};
}

void check_index(const ImageGeometry& g, std::int64_t index, std::string_view what) {
  if (index < 0 || index >= g.count) {
    throw Error(fmt::format("{}: image index {} is outside a batch of {}", what, index, g.count));
  }
}

// Calls f(T* pixels) with the image data typed as float or double.
template <class F>
void with_pixels(Tensor& images, F&& f) {
  if (images.dtype() == DType::f64) {
    f(images.data<double>());
  } else {
    f(images.data<float>());
  }
}

}  // namespace

void flip_horizontal(Tensor& images, std::int64_t index) {
  const ImageGeometry g = geometry(images, "flip_horizontal");
  check_index(g, index, "flip_horizontal");
  with_pixels(images, [&](auto* pixels) {
    auto* image = pixels + index * g.image();
    for (std::int64_t row = 0; row < g.channels * g.height; ++row) {
      std::reverse(image + row * g.width, image + (row + 1) * g.width);
    }
  });
}

void translate(Tensor& images, std::int64_t index, std::int64_t shift_y, std::int64_t shift_x) {
  const ImageGeometry g = geometry(images, "translate");
  check_index(g, index, "translate");
  with_pixels(images, [&](auto* pixels) {
    auto* image = pixels + index * g.image();
    for (std::int64_t c = 0; c < g.channels; ++c) {
      auto* plane = image + c * g.plane();
      // Walk rows and columns in the direction that reads each source before overwriting it,
      // so the shift needs no scratch buffer.
      for (std::int64_t i = 0; i < g.height; ++i) {
        const std::int64_t h = shift_y > 0 ? g.height - 1 - i : i;
        const std::int64_t source_h = h - shift_y;
        for (std::int64_t j = 0; j < g.width; ++j) {
          const std::int64_t w = shift_x > 0 ? g.width - 1 - j : j;
          const std::int64_t source_w = w - shift_x;
          const bool inside =
              source_h >= 0 && source_h < g.height && source_w >= 0 && source_w < g.width;
          plane[h * g.width + w] = inside ? plane[source_h * g.width + source_w] : 0;
        }
      }
    }
  });
}

void erase_square(Tensor& images, std::int64_t index, std::int64_t top, std::int64_t left,
                  std::int64_t size) {
  const ImageGeometry g = geometry(images, "erase_square");
  check_index(g, index, "erase_square");
  if (size < 0 || top < 0 || left < 0 || top + size > g.height || left + size > g.width) {
    throw Error(
        fmt::format("erase_square: a {}×{} square at (top {}, left {}) does not fit a {}×{} image",
                    size, size, top, left, g.height, g.width));
  }
  with_pixels(images, [&](auto* pixels) {
    auto* image = pixels + index * g.image();
    for (std::int64_t c = 0; c < g.channels; ++c) {
      for (std::int64_t h = top; h < top + size; ++h) {
        auto* row = image + c * g.plane() + h * g.width;
        std::fill(row + left, row + left + size, 0);
      }
    }
  });
}

void random_horizontal_flip(Tensor& images, Random& random, double probability) {
  const ImageGeometry g = geometry(images, "random_horizontal_flip");
  if (!(probability >= 0.0 && probability <= 1.0)) {
    throw Error(
        fmt::format("random_horizontal_flip: probability must be in [0, 1], got {}", probability));
  }
  for (std::int64_t n = 0; n < g.count; ++n) {
    if (random.bernoulli(probability)) flip_horizontal(images, n);
  }
}

void random_crop(Tensor& images, std::int64_t padding, Random& random) {
  const ImageGeometry g = geometry(images, "random_crop");
  if (padding < 0) {
    throw Error(fmt::format("random_crop: padding must be non-negative, got {}", padding));
  }
  for (std::int64_t n = 0; n < g.count; ++n) {
    const std::int64_t shift_y = random.between(-padding, padding);
    const std::int64_t shift_x = random.between(-padding, padding);
    translate(images, n, shift_y, shift_x);
  }
}

void cutout(Tensor& images, std::int64_t size, Random& random) {
  const ImageGeometry g = geometry(images, "cutout");
  if (size < 0 || size > g.height || size > g.width) {
    throw Error(fmt::format("cutout: square size {} must be in [0, {}] for {}×{} images", size,
                            std::min(g.height, g.width), g.height, g.width));
  }
  for (std::int64_t n = 0; n < g.count; ++n) {
    const std::int64_t top = random.between(0, g.height - size);
    const std::int64_t left = random.between(0, g.width - size);
    erase_square(images, n, top, left, size);
  }
}

Tensor one_hot(const Tensor& labels, std::int64_t num_classes, DType dtype) {
  if (labels.shape().rank() != 1 || labels.dtype() != DType::i32) {
    throw Error(fmt::format("one_hot: labels must be i32 [N], got {}", labels.desc()));
  }
  if (num_classes < 1) {
    throw Error(fmt::format("one_hot: need at least one class, got {}", num_classes));
  }
  Tensor targets(Shape{labels.numel(), num_classes}, dtype);
  const auto values = labels.span<std::int32_t>();
  for (std::size_t n = 0; n < values.size(); ++n) {
    if (values[n] < 0 || values[n] >= num_classes) {
      throw Error(fmt::format("one_hot: label {} at index {} is outside [0, {})", values[n], n,
                              num_classes));
    }
    targets.set(static_cast<std::int64_t>(n) * num_classes + values[n], 1.0);
  }
  return targets;
}

MixupBatch mixup(const Tensor& images, const Tensor& labels, std::int64_t num_classes, double alpha,
                 Random& random) {
  const ImageGeometry g = geometry(images, "mixup");
  if (!(alpha > 0.0) || !std::isfinite(alpha)) {
    throw Error(fmt::format("mixup: alpha must be positive and finite, got {}", alpha));
  }
  if (labels.numel() != g.count) {
    throw Error(fmt::format("mixup: {} labels for a batch of {} images {}", labels.numel(), g.count,
                            images.desc()));
  }
  const Tensor targets = one_hot(labels, num_classes, images.dtype());

  MixupBatch batch;
  batch.lambda = random.beta(alpha, alpha);
  batch.partners.resize(static_cast<std::size_t>(g.count));
  std::iota(batch.partners.begin(), batch.partners.end(), std::int64_t{0});
  random.shuffle(batch.partners);

  batch.images = Tensor(images.shape(), images.dtype());
  batch.targets = Tensor(targets.shape(), targets.dtype());
  Tensor source_images = images;  // shares storage; only read
  Tensor source_targets = targets;
  with_pixels(batch.images, [&](auto* mixed_images) {
    using T = std::remove_pointer_t<decltype(mixed_images)>;
    const T* x = source_images.data<T>();
    const T* y = source_targets.data<T>();
    T* mixed_targets = batch.targets.data<T>();
    const auto lambda = static_cast<T>(batch.lambda);
    // 1 - lambda computed in double, so the two weights sum to 1 as closely as T allows.
    const auto other = static_cast<T>(1.0 - batch.lambda);
    for (std::int64_t n = 0; n < g.count; ++n) {
      const std::int64_t partner = batch.partners[static_cast<std::size_t>(n)];
      for (std::int64_t i = 0; i < g.image(); ++i) {
        mixed_images[n * g.image() + i] =
            lambda * x[n * g.image() + i] + other * x[partner * g.image() + i];
      }
      for (std::int64_t k = 0; k < num_classes; ++k) {
        mixed_targets[n * num_classes + k] =
            lambda * y[n * num_classes + k] + other * y[partner * num_classes + k];
      }
    }
  });
  return batch;
}

}  // namespace dagrad::data
