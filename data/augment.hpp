// Data augmentation on batches of images [N, C, H, W] (f32 or f64), in place unless noted.
//
// Each random augmentation draws its parameters per image from a caller-owned Random, so a
// run is reproducible from its seed. The deterministic building blocks they use are public
// too. Every function throws Error for images that are not 4-D floating tensors and for
// out-of-range arguments.
#pragma once

#include <cstdint>
#include <vector>

#include "data/random.hpp"
#include "graph/tensor.hpp"

namespace dagrad::data {

// Mirrors image `index` left to right: x[n, c, h, w] <- x[n, c, h, W-1-w].
void flip_horizontal(Tensor& images, std::int64_t index);

// Moves the content of image `index` down by `shift_y` and right by `shift_x` pixels (negative
// values move up/left): x[n, c, h, w] <- x[n, c, h - shift_y, w - shift_x], zero where that
// source lies outside the image.
void translate(Tensor& images, std::int64_t index, std::int64_t shift_y, std::int64_t shift_x);

// Sets the size×size square with top-left corner (top, left) of every channel of image `index`
// to zero; the square must lie inside the image.
void erase_square(Tensor& images, std::int64_t index, std::int64_t top, std::int64_t left,
                  std::int64_t size);

// Flips each image horizontally with the given probability (default one half).
void random_horizontal_flip(Tensor& images, Random& random, double probability = 0.5);

// Random crop with padding: pads each image with `padding` zeros on every side and crops an
// H×W window at a uniformly random position, i.e. translates it by (dy, dx), each uniform in
// [-padding, padding].
void random_crop(Tensor& images, std::int64_t padding, Random& random);

// Cutout: zeroes one size×size square per image (all channels), placed uniformly at random
// entirely inside the image; size must not exceed H or W.
void cutout(Tensor& images, std::int64_t size, Random& random);

// One-hot rows: targets[n, k] = 1 if labels[n] == k else 0, as a [N, num_classes] tensor of
// `dtype`. Throws Error for a label outside [0, num_classes).
Tensor one_hot(const Tensor& labels, std::int64_t num_classes, DType dtype = DType::f32);

struct MixupBatch {
  Tensor images;   // lambda * x + (1 - lambda) * x[partner], same shape as the input
  Tensor targets;  // lambda * one_hot(y) + (1 - lambda) * one_hot(y[partner]), [N, num_classes]
  double lambda = 1.0;
  std::vector<std::int64_t> partners;  // partner[n]: the example image n was mixed with
};

// Mixup (Zhang et al. 2018): draws lambda ~ Beta(alpha, alpha) once for the batch and a
// random permutation `partners`, and mixes each image and its one-hot label with its partner.
// The targets are probabilities (each row sums to 1) for a cross-entropy on soft labels.
// Returns new tensors; the inputs are unchanged. alpha must be positive.
MixupBatch mixup(const Tensor& images, const Tensor& labels, std::int64_t num_classes, double alpha,
                 Random& random);

}  // namespace dagrad::data
