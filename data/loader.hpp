// Mini-batches over a Dataset, reshuffled each epoch from a seed.
//
//   Loader loader(train, {.batch_size = 64, .seed = 7});
//   for (std::int64_t epoch = 0; epoch < epochs; ++epoch) {
//     loader.start_epoch(epoch);
//     while (const Batch* batch = loader.next()) step(batch->images, batch->labels);
//   }
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "data/dataset.hpp"
#include "graph/tensor.hpp"

namespace dagrad::data {

struct LoaderOptions {
  std::int64_t batch_size = 64;
  bool shuffle = true;
  // Drop the last batch when it would be smaller than batch_size; otherwise keep it.
  bool drop_last = false;
  std::uint64_t seed = 0;
};

// One mini-batch. Its tensors are the loader's reusable buffers: the next call to next()
// overwrites them, so clone() what must outlive the step.
struct Batch {
  Tensor images;                          // [B, ...] with the dataset's image shape
  Tensor labels;                          // [B]
  std::span<const std::int64_t> indices;  // dataset index of each example in the batch
  std::int64_t size() const { return labels.numel(); }
};

class Loader {
 public:
  // Throws Error when batch_size < 1, the dataset is empty, images and labels disagree on
  // the example count, or drop_last leaves no batch at all. Starts epoch 0.
  Loader(Dataset dataset, LoaderOptions options);

  // Orders the examples for `epoch`: a permutation seeded by mix_seed(seed, epoch) when
  // shuffling (the same seed and epoch give the same order), the dataset order otherwise.
  void start_epoch(std::int64_t epoch);
  // The next batch of the current epoch, or nullptr when the epoch is over.
  const Batch* next();

  std::int64_t batches_per_epoch() const;
  std::int64_t examples_per_epoch() const;
  std::int64_t epoch() const { return epoch_; }
  // The order of the current epoch (dataset indices).
  std::span<const std::int64_t> order() const { return order_; }
  const Dataset& dataset() const { return dataset_; }

 private:
  Dataset dataset_;
  LoaderOptions options_;
  std::vector<std::int64_t> order_;
  std::int64_t epoch_ = 0;
  std::int64_t position_ = 0;
  std::size_t image_bytes_ = 0;
  std::size_t label_bytes_ = 0;
  Tensor images_buffer_;  // [batch_size, ...], reused for every full batch
  Tensor labels_buffer_;
  Batch batch_;
};

}  // namespace dagrad::data
