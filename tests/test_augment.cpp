// Augmentations on small known images.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <set>
#include <vector>

#include "data/data.hpp"
#include "graph/error.hpp"

namespace dagrad::data {
namespace {

// `count` copies of a C×H×W image holding 1, 2, 3, ... in row-major order.
Tensor ramp_images(std::int64_t count, std::int64_t channels, std::int64_t height,
                   std::int64_t width) {
  Tensor images(Shape{count, channels, height, width}, DType::f32);
  const std::int64_t image = channels * height * width;
  for (std::int64_t i = 0; i < images.numel(); ++i)
    images.set(i, static_cast<double>(i % image + 1));
  return images;
}

std::vector<double> image_values(const Tensor& images, std::int64_t index) {
  const std::int64_t image = images.numel() / images.shape()[0];
  std::vector<double> values;
  for (std::int64_t i = 0; i < image; ++i) values.push_back(images.at(index * image + i));
  return values;
}

TEST(DataAugment, FlipMirrorsEachRow) {
  Tensor images = ramp_images(1, 1, 2, 3);
  flip_horizontal(images, 0);
  EXPECT_EQ(images.to_doubles(), (std::vector<double>{3, 2, 1, 6, 5, 4}));
  Tensor two_channels = ramp_images(2, 2, 1, 2);
  flip_horizontal(two_channels, 1);
  EXPECT_EQ(two_channels.to_doubles(), (std::vector<double>{1, 2, 3, 4, 2, 1, 4, 3}));
}

TEST(DataAugment, RandomFlipFlipsAboutHalfAndOnlyWholeImages) {
  Tensor images = ramp_images(400, 1, 2, 3);
  Random random(11);
  random_horizontal_flip(images, random);
  int flipped = 0;
  for (std::int64_t n = 0; n < 400; ++n) {
    const std::vector<double> values = image_values(images, n);
    if (values == std::vector<double>{3, 2, 1, 6, 5, 4}) {
      ++flipped;
    } else {
      EXPECT_EQ(values, (std::vector<double>{1, 2, 3, 4, 5, 6}));
    }
  }
  EXPECT_GT(flipped, 150);
  EXPECT_LT(flipped, 250);

  Tensor always = ramp_images(3, 1, 2, 3);
  random_horizontal_flip(always, random, 1.0);
  EXPECT_EQ(image_values(always, 2), (std::vector<double>{3, 2, 1, 6, 5, 4}));
  Tensor never = ramp_images(3, 1, 2, 3);
  random_horizontal_flip(never, random, 0.0);
  EXPECT_EQ(never.to_doubles(), ramp_images(3, 1, 2, 3).to_doubles());
  EXPECT_THROW(random_horizontal_flip(never, random, 1.5), Error);
}

TEST(DataAugment, TranslateShiftsContentAndZeroFills) {
  // 1 2 3 / 4 5 6 / 7 8 9
  Tensor down = ramp_images(1, 1, 3, 3);
  translate(down, 0, 1, 0);
  EXPECT_EQ(down.to_doubles(), (std::vector<double>{0, 0, 0, 1, 2, 3, 4, 5, 6}));
  Tensor left = ramp_images(1, 1, 3, 3);
  translate(left, 0, 0, -1);
  EXPECT_EQ(left.to_doubles(), (std::vector<double>{2, 3, 0, 5, 6, 0, 8, 9, 0}));
  Tensor up_right = ramp_images(1, 1, 3, 3);
  translate(up_right, 0, -1, 1);
  EXPECT_EQ(up_right.to_doubles(), (std::vector<double>{0, 4, 5, 0, 7, 8, 0, 0, 0}));
  Tensor gone = ramp_images(1, 1, 3, 3);
  translate(gone, 0, 3, 0);
  EXPECT_EQ(gone.to_doubles(), std::vector<double>(9, 0.0));
}

TEST(DataAugment, RandomCropWithPaddingIsOneOfTheAllowedShifts) {
  const std::int64_t count = 200;
  Tensor images = ramp_images(count, 1, 3, 3);
  Random random(5);
  random_crop(images, 1, random);
  std::set<std::pair<std::int64_t, std::int64_t>> shifts_seen;
  for (std::int64_t n = 0; n < count; ++n) {
    const std::vector<double> values = image_values(images, n);
    bool matched = false;
    for (std::int64_t dy = -1; dy <= 1 && !matched; ++dy) {
      for (std::int64_t dx = -1; dx <= 1 && !matched; ++dx) {
        Tensor expected = ramp_images(1, 1, 3, 3);
        translate(expected, 0, dy, dx);
        if (expected.to_doubles() == values) {
          matched = true;
          shifts_seen.insert({dy, dx});
        }
      }
    }
    EXPECT_TRUE(matched) << "image " << n << " is not a shift by at most 1 pixel";
  }
  EXPECT_EQ(shifts_seen.size(), 9U);  // every shift in [-1, 1]² occurs among 200 draws

  Tensor unpadded = ramp_images(4, 1, 3, 3);
  random_crop(unpadded, 0, random);
  EXPECT_EQ(unpadded.to_doubles(), ramp_images(4, 1, 3, 3).to_doubles());
  EXPECT_THROW(random_crop(unpadded, -1, random), Error);
}

TEST(DataAugment, CutoutZeroesOneSquarePerImageInEveryChannel) {
  Tensor images = Tensor::full(Shape{6, 2, 5, 5}, 1.0);
  Random random(2);
  cutout(images, 2, random);
  for (std::int64_t n = 0; n < 6; ++n) {
    const std::vector<double> values = image_values(images, n);
    std::vector<std::int64_t> zeros_per_channel(2, 0);
    for (std::size_t i = 0; i < values.size(); ++i) {
      if (values[i] == 0.0) ++zeros_per_channel[i / 25];
    }
    EXPECT_EQ(zeros_per_channel, (std::vector<std::int64_t>{4, 4}));
    // The same square in both channels.
    for (std::size_t i = 0; i < 25; ++i) EXPECT_EQ(values[i], values[i + 25]);
  }
  Tensor square = Tensor::full(Shape{1, 1, 3, 4}, 1.0);
  erase_square(square, 0, 1, 2, 2);
  EXPECT_EQ(square.to_doubles(), (std::vector<double>{1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0}));
  EXPECT_THROW(erase_square(square, 0, 2, 2, 2), Error);
  EXPECT_THROW(cutout(square, 4, random), Error);
}

TEST(DataAugment, OneHotSetsTheLabelColumn) {
  const Tensor targets = one_hot(Tensor::from({2, 0}, Shape{2}, DType::i32), 3);
  EXPECT_EQ(targets.shape(), (Shape{2, 3}));
  EXPECT_EQ(targets.to_doubles(), (std::vector<double>{0, 0, 1, 1, 0, 0}));
  EXPECT_THROW(one_hot(Tensor::from({3}, Shape{1}, DType::i32), 3), Error);
}

TEST(DataAugment, MixupCombinesImagesAndTargetsWithOneLambda) {
  // Image n is constant 10 * (n + 1); labels 0, 1, 2, 1.
  const std::int64_t count = 4;
  Tensor images(Shape{count, 1, 2, 2}, DType::f32);
  for (std::int64_t i = 0; i < images.numel(); ++i) images.set(i, 10.0 * (i / 4 + 1));
  const Tensor labels = Tensor::from({0, 1, 2, 1}, Shape{count}, DType::i32);
  Random random(8);
  const MixupBatch mixed = mixup(images, labels, 3, 0.4, random);

  EXPECT_GE(mixed.lambda, 0.0);
  EXPECT_LE(mixed.lambda, 1.0);
  std::set<std::int64_t> partners(mixed.partners.begin(), mixed.partners.end());
  EXPECT_EQ(partners, (std::set<std::int64_t>{0, 1, 2, 3}));  // a permutation
  EXPECT_EQ(mixed.images.shape(), images.shape());
  EXPECT_EQ(mixed.targets.shape(), (Shape{count, 3}));
  const double lambda = mixed.lambda;
  for (std::int64_t n = 0; n < count; ++n) {
    const std::int64_t partner = mixed.partners[static_cast<std::size_t>(n)];
    const double expected = lambda * 10.0 * (n + 1) + (1 - lambda) * 10.0 * (partner + 1);
    for (std::int64_t p = 0; p < 4; ++p) EXPECT_NEAR(mixed.images.at(n * 4 + p), expected, 1e-4);
    double row_sum = 0.0;
    for (std::int64_t k = 0; k < 3; ++k) {
      const double expected_target = lambda * (labels.at(n) == k ? 1.0 : 0.0) +
                                     (1 - lambda) * (labels.at(partner) == k ? 1.0 : 0.0);
      EXPECT_NEAR(mixed.targets.at(n * 3 + k), expected_target, 1e-6);
      row_sum += mixed.targets.at(n * 3 + k);
    }
    EXPECT_NEAR(row_sum, 1.0, 1e-6);
  }
  // The inputs are untouched.
  EXPECT_EQ(images.at(15), 40.0);
}

TEST(DataAugment, MixupLambdaFollowsASymmetricBeta) {
  // Beta(a, a) has mean 1/2 and variance 1 / (4 (2a + 1)).
  const Tensor images = Tensor::full(Shape{1, 1, 1, 1}, 1.0);
  const Tensor labels = Tensor::from({0}, Shape{1}, DType::i32);
  Random random(21);
  const int draws = 4000;
  double sum = 0.0;
  double squares = 0.0;
  for (int i = 0; i < draws; ++i) {
    const double lambda = mixup(images, labels, 2, 0.4, random).lambda;
    sum += lambda;
    squares += lambda * lambda;
  }
  const double mean = sum / draws;
  const double variance = squares / draws - mean * mean;
  EXPECT_NEAR(mean, 0.5, 0.02);
  EXPECT_NEAR(variance, 1.0 / (4 * (2 * 0.4 + 1)), 0.01);
}

TEST(DataAugment, RefusesBadArguments) {
  Random random(1);
  Tensor flat = Tensor::full(Shape{2, 4}, 1.0);
  EXPECT_THROW(flip_horizontal(flat, 0), Error);
  Tensor images = ramp_images(2, 1, 2, 2);
  EXPECT_THROW(flip_horizontal(images, 2), Error);
  const Tensor labels = Tensor::from({0, 1}, Shape{2}, DType::i32);
  EXPECT_THROW(mixup(images, labels, 2, 0.0, random), Error);
  EXPECT_THROW(mixup(images, labels, 1, 0.4, random), Error);  // label 1 outside [0, 1)
  EXPECT_THROW(mixup(images, Tensor::from({0}, Shape{1}, DType::i32), 2, 0.4, random), Error);
  try {
    flip_horizontal(flat, 0);
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what())
                  .find("flip_horizontal: images must be a floating "
                        "[N, C, H, W] tensor, got f32[2,4]"),
              std::string::npos)
        << error.what();
  }
}

}  // namespace
}  // namespace dagrad::data
