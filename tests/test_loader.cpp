// Mini-batch loading, train/validation splits and normalisation.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <set>
#include <vector>

#include "data/data.hpp"
#include "graph/error.hpp"

namespace dagrad::data {
namespace {

// n examples of shape [1, 2, 2] whose every pixel equals the example's index, with label
// index % 10, so a batch row tells which example it came from.
Dataset numbered_dataset(std::int64_t n) {
  Dataset dataset;
  dataset.num_classes = 10;
  dataset.images = Tensor(Shape{n, 1, 2, 2}, DType::f32);
  dataset.labels = Tensor(Shape{n}, DType::i32);
  for (std::int64_t i = 0; i < n; ++i) {
    for (std::int64_t p = 0; p < 4; ++p) dataset.images.set(i * 4 + p, static_cast<double>(i));
    dataset.labels.set(i, static_cast<double>(i % 10));
  }
  return dataset;
}

std::vector<std::int64_t> epoch_order(Loader& loader, std::int64_t epoch) {
  loader.start_epoch(epoch);
  std::vector<std::int64_t> order;
  while (const Batch* batch = loader.next()) {
    order.insert(order.end(), batch->indices.begin(), batch->indices.end());
  }
  return order;
}

std::vector<std::int64_t> iota_vector(std::int64_t n) {
  std::vector<std::int64_t> values(static_cast<std::size_t>(n));
  std::iota(values.begin(), values.end(), std::int64_t{0});
  return values;
}

TEST(DataLoader, EachExampleIsSeenExactlyOncePerEpochWithMatchingRows) {
  Loader loader(numbered_dataset(23), {.batch_size = 5, .seed = 3});
  EXPECT_EQ(loader.batches_per_epoch(), 5);
  EXPECT_EQ(loader.examples_per_epoch(), 23);
  for (std::int64_t epoch = 0; epoch < 3; ++epoch) {
    loader.start_epoch(epoch);
    std::vector<std::int64_t> seen;
    std::vector<std::int64_t> sizes;
    while (const Batch* batch = loader.next()) {
      sizes.push_back(batch->size());
      ASSERT_EQ(batch->images.shape()[0], batch->size());
      for (std::int64_t row = 0; row < batch->size(); ++row) {
        const std::int64_t index = batch->indices[static_cast<std::size_t>(row)];
        seen.push_back(index);
        for (std::int64_t p = 0; p < 4; ++p) EXPECT_EQ(batch->images.at(row * 4 + p), index);
        EXPECT_EQ(batch->labels.at(row), index % 10);
      }
    }
    EXPECT_EQ(sizes, (std::vector<std::int64_t>{5, 5, 5, 5, 3}));
    EXPECT_NE(seen, iota_vector(23)) << "epoch " << epoch << " was not shuffled";
    std::sort(seen.begin(), seen.end());
    EXPECT_EQ(seen, iota_vector(23));
    EXPECT_EQ(loader.next(), nullptr);  // stays finished until the next epoch starts
  }
}

TEST(DataLoader, SameSeedAndEpochGiveTheSameOrder) {
  Loader first(numbered_dataset(50), {.batch_size = 8, .seed = 42});
  Loader second(numbered_dataset(50), {.batch_size = 8, .seed = 42});
  EXPECT_EQ(epoch_order(first, 4), epoch_order(second, 4));
  const std::vector<std::int64_t> again = epoch_order(first, 4);
  EXPECT_EQ(again, epoch_order(second, 4));
  Loader other_seed(numbered_dataset(50), {.batch_size = 8, .seed = 43});
  EXPECT_NE(epoch_order(other_seed, 4), again);
}

TEST(DataLoader, DifferentEpochsGiveDifferentOrders) {
  Loader loader(numbered_dataset(50), {.batch_size = 8, .seed = 42});
  const std::vector<std::int64_t> epoch0 = epoch_order(loader, 0);
  const std::vector<std::int64_t> epoch1 = epoch_order(loader, 1);
  EXPECT_NE(epoch0, epoch1);
  EXPECT_EQ(epoch_order(loader, 0), epoch0);
}

TEST(DataLoader, WithoutShufflingKeepsDatasetOrder) {
  Loader loader(numbered_dataset(10), {.batch_size = 4, .shuffle = false});
  EXPECT_EQ(epoch_order(loader, 7), iota_vector(10));
}

TEST(DataLoader, DropLastSkipsTheShortBatch) {
  Loader loader(numbered_dataset(23), {.batch_size = 5, .drop_last = true, .seed = 1});
  EXPECT_EQ(loader.batches_per_epoch(), 4);
  EXPECT_EQ(loader.examples_per_epoch(), 20);
  loader.start_epoch(0);
  std::int64_t batches = 0;
  std::set<std::int64_t> seen;
  while (const Batch* batch = loader.next()) {
    ++batches;
    EXPECT_EQ(batch->size(), 5);
    seen.insert(batch->indices.begin(), batch->indices.end());
  }
  EXPECT_EQ(batches, 4);
  EXPECT_EQ(seen.size(), 20U);  // 20 distinct examples, 3 left out this epoch
}

TEST(DataLoader, KeepLastReturnsTheShortBatchWithItsOwnShape) {
  Loader loader(numbered_dataset(7), {.batch_size = 3, .shuffle = false});
  std::vector<Shape> shapes;
  while (const Batch* batch = loader.next()) shapes.push_back(batch->images.shape());
  EXPECT_EQ(shapes, (std::vector<Shape>{{3, 1, 2, 2}, {3, 1, 2, 2}, {1, 1, 2, 2}}));
}

TEST(DataLoader, FullBatchesReuseOneBuffer) {
  Loader loader(numbered_dataset(12), {.batch_size = 4, .seed = 5});
  const void* first_images = loader.next()->images.raw();
  const void* first_labels = loader.next()->labels.raw();
  const Batch* third = loader.next();
  EXPECT_EQ(third->images.raw(), first_images);
  EXPECT_EQ(third->labels.raw(), first_labels);
}

TEST(DataLoader, RefusesBadConfigurations) {
  EXPECT_THROW(Loader(numbered_dataset(5), {.batch_size = 0}), Error);
  EXPECT_THROW(Loader(numbered_dataset(5), {.batch_size = -3}), Error);
  EXPECT_THROW(Loader(numbered_dataset(0), {.batch_size = 4}), Error);
  EXPECT_THROW(Loader(numbered_dataset(3), {.batch_size = 4, .drop_last = true}), Error);
  Dataset mismatched = numbered_dataset(5);
  mismatched.labels = Tensor(Shape{4}, DType::i32);
  EXPECT_THROW(Loader(mismatched, {.batch_size = 2}), Error);
  try {
    Loader(numbered_dataset(5), {.batch_size = 0});
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("batch size must be at least 1, got 0"),
              std::string::npos);
  }
}

TEST(DataSplit, SizesAreExactAndPartsAreDisjoint) {
  const Dataset dataset = numbered_dataset(100);
  const auto [train, validation] = split_train_validation(dataset, 20, 9);
  ASSERT_EQ(train.size(), 80);
  ASSERT_EQ(validation.size(), 20);
  EXPECT_EQ(train.images.shape(), (Shape{80, 1, 2, 2}));
  EXPECT_EQ(validation.num_classes, 10);
  std::vector<std::int64_t> all;
  for (const Dataset* part : {&train, &validation}) {
    for (std::int64_t i = 0; i < part->size(); ++i) {
      const auto index = static_cast<std::int64_t>(part->images.at(i * 4));
      all.push_back(index);
      EXPECT_EQ(part->labels.at(i), index % 10);  // labels travel with their images
    }
  }
  std::sort(all.begin(), all.end());
  EXPECT_EQ(all, iota_vector(100));
  // The validation part is not simply the last 20 examples.
  EXPECT_NE(validation.images.at(0), 80);
}

TEST(DataSplit, IsDeterministicPerSeed) {
  const Dataset dataset = numbered_dataset(60);
  const auto first = split_train_validation(dataset, 10, 1).second.images.to_doubles();
  EXPECT_EQ(split_train_validation(dataset, 10, 1).second.images.to_doubles(), first);
  EXPECT_NE(split_train_validation(dataset, 10, 2).second.images.to_doubles(), first);
}

TEST(DataSplit, RefusesImpossibleSizes) {
  EXPECT_THROW(split_train_validation(numbered_dataset(10), 11, 0), Error);
  EXPECT_THROW(split_train_validation(numbered_dataset(10), -1, 0), Error);
  const auto [train, validation] = split_train_validation(numbered_dataset(10), 0, 0);
  EXPECT_EQ(train.size(), 10);
  EXPECT_EQ(validation.size(), 0);
}

TEST(DataSubset, CopiesTheChosenExamplesInOrder) {
  const std::vector<std::int64_t> indices = {4, 0, 4};
  const Dataset picked = subset(numbered_dataset(6), indices);
  EXPECT_EQ(picked.labels.to_doubles(), (std::vector<double>{4, 0, 4}));
  EXPECT_EQ(picked.images.at(5), 0);
  const std::vector<std::int64_t> outside = {6};
  EXPECT_THROW(subset(numbered_dataset(6), outside), Error);
}

TEST(DataNormalization, UnitRangeMapsBytesOntoZeroOne) {
  Tensor images = Tensor::from({0, 51, 255, 127.5}, Shape{1, 1, 2, 2});
  normalize(images, Normalization::unit_range());
  const std::vector<double> values = images.to_doubles();
  EXPECT_FLOAT_EQ(values[0], 0.0F);
  EXPECT_FLOAT_EQ(values[1], 0.2F);
  EXPECT_FLOAT_EQ(values[2], 1.0F);
  EXPECT_FLOAT_EQ(values[3], 0.5F);
}

TEST(DataNormalization, StandardizeUsesTrainingStatisticsForEverySet) {
  Tensor train = Tensor::from({1, 2, 3, 4}, Shape{4, 1});
  const Normalization statistics = Normalization::standardize(train);
  EXPECT_DOUBLE_EQ(statistics.mean, 2.5);
  EXPECT_DOUBLE_EQ(statistics.scale, std::sqrt(1.25));  // population standard deviation
  normalize(train, statistics);
  const std::vector<double> standardized = train.to_doubles();
  EXPECT_NEAR(standardized[0], -1.5 / std::sqrt(1.25), 1e-6);
  EXPECT_NEAR(standardized[3], 1.5 / std::sqrt(1.25), 1e-6);
  Tensor test = Tensor::from({5, 2.5}, Shape{2, 1});
  normalize(test, statistics);
  EXPECT_NEAR(test.at(0), 2.5 / std::sqrt(1.25), 1e-6);
  EXPECT_NEAR(test.at(1), 0.0, 1e-7);
}

TEST(DataNormalization, RefusesConstantOrEmptyImages) {
  EXPECT_THROW(Normalization::standardize(Tensor::full(Shape{3, 1}, 7.0)), Error);
  EXPECT_THROW(Normalization::standardize(Tensor(Shape{0, 4}, DType::f32)), Error);
  Tensor images = Tensor::full(Shape{2}, 1.0);
  EXPECT_THROW(normalize(images, {0.0, 0.0}), Error);
  Tensor labels = Tensor(Shape{2}, DType::i32);
  EXPECT_THROW(normalize(labels, Normalization::unit_range()), Error);
}

}  // namespace
}  // namespace dagrad::data
