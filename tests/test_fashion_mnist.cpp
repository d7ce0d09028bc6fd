// End to end on real data: a small MLP trained on a 2,000-image subset of Fashion-MNIST for a
// few epochs. The loss must fall and the test accuracy must beat a floor far above chance
// (10%). Skipped when the data set is not installed (scripts/setup.sh installs it).
#include <gtest/gtest.h>

#include <filesystem>

#include "dagrad.hpp"
#include "data/data.hpp"
#include "nn/model.hpp"
#include "nn/optimizer.hpp"
#include "nn/trainer.hpp"

namespace dagrad {
namespace {

TEST(FashionMnistEndToEnd, SmallMlpLearnsFromTwoThousandImages) {
  const std::filesystem::path dir(data::default_fashion_mnist_dir);
  if (!std::filesystem::exists(dir / "train-images-idx3-ubyte.gz"))
    GTEST_SKIP() << "Fashion-MNIST not installed";
  data::Dataset train = data::load_mnist_like(dir, data::Split::train, data::ImageLayout::flat);
  data::Dataset test = data::load_mnist_like(dir, data::Split::test, data::ImageLayout::flat);
  std::vector<std::int64_t> first(2000), test_first(2000);
  for (std::int64_t i = 0; i < 2000; ++i)
    first[static_cast<std::size_t>(i)] = test_first[static_cast<std::size_t>(i)] = i;
  train = data::subset(train, first);
  test = data::subset(test, test_first);
  data::normalize(train.images, data::Normalization::unit_range());
  data::normalize(test.images, data::Normalization::unit_range());

  ModelOptions options;
  options.example_shape = {784};
  options.batch_size = 64;
  options.seed = 1;
  Model model(parse_layers("dense:128,relu,dense:10"), options);
  Adam adam(AdamOptions{.learning_rate = 2e-3});
  Trainer trainer(model, adam, nullptr, {.epochs = 5, .batch_size = 64, .seed = 1, .quiet = true});
  History history = trainer.fit(train);
  EXPECT_LT(history.epochs.back().train_loss, 0.6 * history.epochs.front().train_loss);
  Evaluation e = trainer.evaluate(test);
  EXPECT_GT(e.accuracy, 0.72) << "chance is 0.10";
}

}  // namespace
}  // namespace dagrad
