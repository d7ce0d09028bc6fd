// IDX reading and writing, and loading MNIST-like datasets from IDX files.
// Every file is written by the test into its own temporary directory.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "data/data.hpp"
#include "graph/error.hpp"

namespace dagrad::data {
namespace {

namespace fs = std::filesystem;

class IdxFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("dagrad_idx_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  fs::path file(const std::string& name) const { return dir_ / name; }

  fs::path write_bytes(const std::string& name, const std::vector<std::uint8_t>& bytes) const {
    const fs::path path = file(name);
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
    return path;
  }

  static std::vector<std::uint8_t> read_bytes(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  }

  fs::path dir_;
};

// The message of the IOError `action` throws; fails the test when it throws nothing else.
template <class F>
std::string io_error_message(F&& action) {
  try {
    action();
  } catch (const IOError& error) {
    return error.what();
  }
  ADD_FAILURE() << "no IOError was thrown";
  return {};
}

IdxArray ramp_u8(std::vector<std::int64_t> dims) {
  std::int64_t count = 1;
  for (auto d : dims) count *= d;
  std::vector<double> values(static_cast<std::size_t>(count));
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = static_cast<double>((i * 7) % 256);
  return IdxArray::from_values(IdxType::u8, std::move(dims), values);
}

TEST_F(IdxFiles, PlainWriterFollowsTheFormatByteForByte) {
  const std::vector<double> values = {1, 2, 3, 250, 251, 252};
  write_idx(file("a.idx"), IdxArray::from_values(IdxType::u8, {2, 3}, values));
  const std::vector<std::uint8_t> expected = {0x00, 0x00, 0x08, 0x02, 0, 0, 0,   2,   0,
                                              0,    0,    3,    1,    2, 3, 250, 251, 252};
  EXPECT_EQ(read_bytes(file("a.idx")), expected);
}

TEST_F(IdxFiles, ReadsHandWrittenBigEndianElements) {
  // i16 [2]: 0x0102 = 258 and 0xFFFE = -2; i32 [1]: 0x00010000 = 65536.
  const IdxArray shorts =
      read_idx(write_bytes("s.idx", {0, 0, 0x0B, 1, 0, 0, 0, 2, 0x01, 0x02, 0xFF, 0xFE}));
  EXPECT_EQ(shorts.type, IdxType::i16);
  EXPECT_EQ(shorts.dims, (std::vector<std::int64_t>{2}));
  EXPECT_EQ(shorts.at(0), 258);
  EXPECT_EQ(shorts.at(1), -2);
  const IdxArray ints = read_idx(write_bytes("i.idx", {0, 0, 0x0C, 1, 0, 0, 0, 1, 0, 1, 0, 0}));
  EXPECT_EQ(ints.at(0), 65536);
  // f32 1.5 is 0x3FC00000.
  const IdxArray floats =
      read_idx(write_bytes("f.idx", {0, 0, 0x0D, 1, 0, 0, 0, 1, 0x3F, 0xC0, 0x00, 0x00}));
  EXPECT_EQ(floats.at(0), 1.5);
}

TEST_F(IdxFiles, PlainRoundTripKeepsDimensionsAndValues) {
  const IdxArray written = ramp_u8({5, 4, 3});
  write_idx(file("images-idx3-ubyte"), written);
  const IdxArray read = read_idx(file("images-idx3-ubyte"));
  EXPECT_EQ(read.type, IdxType::u8);
  EXPECT_EQ(read.dims, written.dims);
  EXPECT_EQ(read.data, written.data);
  EXPECT_EQ(read.at(59), (59 * 7) % 256);
}

TEST_F(IdxFiles, GzipRoundTripIsDetectedByMagicNotName) {
  const IdxArray written = ramp_u8({20, 28, 28});
  write_idx(file("images.gz"), written);  // gzip chosen by the extension
  write_idx(file("compressed.idx"), written, Compression::gzip);
  for (const char* name : {"images.gz", "compressed.idx"}) {
    SCOPED_TRACE(name);
    const std::vector<std::uint8_t> bytes = read_bytes(file(name));
    ASSERT_GE(bytes.size(), 2U);
    EXPECT_EQ(bytes[0], 0x1F);
    EXPECT_EQ(bytes[1], 0x8B);
    EXPECT_LT(bytes.size(), written.data.size());  // compressed
    const IdxArray read = read_idx(file(name));
    EXPECT_EQ(read.dims, written.dims);
    EXPECT_EQ(read.data, written.data);
  }
}

TEST_F(IdxFiles, EveryElementTypeRoundTrips) {
  struct Case {
    IdxType type;
    std::vector<double> values;
  };
  const std::vector<Case> cases = {
      {IdxType::u8, {0, 1, 255}},           {IdxType::i8, {-128, -1, 127}},
      {IdxType::i16, {-32768, 258, 32767}}, {IdxType::i32, {-2147483648.0, 65536, 2147483647.0}},
      {IdxType::f32, {-1.5, 0.25, 3e38}},   {IdxType::f64, {-1e300, 0.1, 1e-300}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(to_string(c.type)));
    for (const char* name : {"t.idx", "t.idx.gz"}) {
      write_idx(file(name), IdxArray::from_values(c.type, {3}, c.values));
      const IdxArray read = read_idx(file(name));
      EXPECT_EQ(read.type, c.type);
      ASSERT_EQ(read.numel(), 3);
      for (std::int64_t i = 0; i < 3; ++i) {
        EXPECT_EQ(read.at(i), c.type == IdxType::f32
                                  ? static_cast<double>(static_cast<float>(c.values[i]))
                                  : c.values[i]);
      }
    }
  }
  EXPECT_THROW(IdxArray::from_values(IdxType::u8, {1}, std::vector<double>{256}), Error);
  EXPECT_THROW(IdxArray::from_values(IdxType::i8, {1}, std::vector<double>{0.5}), Error);
}

TEST_F(IdxFiles, ConvertsToTensorsOfEachDtype) {
  const IdxArray array =
      IdxArray::from_values(IdxType::i16, {2, 2}, std::vector<double>{-3, 0, 7, 300});
  const Tensor floats = array.to_tensor(DType::f32);
  EXPECT_EQ(floats.shape(), (Shape{2, 2}));
  EXPECT_EQ(floats.to_doubles(), (std::vector<double>{-3, 0, 7, 300}));
  const Tensor ints = array.to_tensor(DType::i32);
  EXPECT_EQ(ints.dtype(), DType::i32);
  EXPECT_EQ(ints.to_doubles(), (std::vector<double>{-3, 0, 7, 300}));
}

TEST_F(IdxFiles, TruncatedDataNamesFileSizesAndOffset) {
  write_idx(file("train-images-idx3-ubyte"), ramp_u8({3, 4, 4}));
  fs::resize_file(file("train-images-idx3-ubyte"), 16 + 5);
  const std::string message = io_error_message([&] { read_idx(file("train-images-idx3-ubyte")); });
  EXPECT_NE(message.find("train-images-idx3-ubyte"), std::string::npos) << message;
  EXPECT_NE(message.find("header says 3×4×4 u8 = 48 bytes of data but only 5 follow (offset 16)"),
            std::string::npos)
      << message;
}

TEST_F(IdxFiles, TruncatedGzipIsAnIOError) {
  write_idx(file("labels.gz"), ramp_u8({4000}));
  const auto full = fs::file_size(file("labels.gz"));
  fs::resize_file(file("labels.gz"), full / 2);
  const std::string message = io_error_message([&] { read_idx(file("labels.gz")); });
  EXPECT_NE(message.find("labels.gz"), std::string::npos) << message;
  EXPECT_NE(message.find("header says 4000 u8 = 4000 bytes of data but only"), std::string::npos)
      << message;
  EXPECT_NE(message.find("truncated"), std::string::npos) << message;
}

TEST_F(IdxFiles, CorruptedGzipIsAnIOError) {
  write_idx(file("labels.gz"), ramp_u8({4000}));
  std::vector<std::uint8_t> bytes = read_bytes(file("labels.gz"));
  for (std::size_t i = 12; i < bytes.size() - 8; ++i) bytes[i] ^= 0x5A;
  write_bytes("labels.gz", bytes);
  const std::string message = io_error_message([&] { read_idx(file("labels.gz")); });
  EXPECT_NE(message.find("labels.gz"), std::string::npos) << message;
  EXPECT_NE(message.find("corrupted gzip data"), std::string::npos) << message;
}

TEST_F(IdxFiles, EveryTruncationOfAPlainOrGzipFileIsAnIOError) {
  for (const char* name : {"whole", "whole.gz"}) {
    SCOPED_TRACE(name);
    write_idx(file(name), IdxArray::from_values(IdxType::i16, {3, 5}, std::vector<double>(15, 7)));
    const std::vector<std::uint8_t> bytes = read_bytes(file(name));
    EXPECT_EQ(read_idx(file(name)).numel(), 15);
    for (std::size_t length = 0; length < bytes.size(); ++length) {
      write_bytes("cut", std::vector<std::uint8_t>(
                             bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(length)));
      EXPECT_THROW(read_idx(file("cut")), IOError) << "prefix of " << length << " bytes";
    }
  }
}

TEST_F(IdxFiles, TruncatedHeaderNamesTheOffset) {
  // Three dimensions need a 16-byte header; the file stops after 10 bytes.
  const fs::path short_dims = write_bytes("short-dims", {0, 0, 8, 3, 0, 0, 0, 1, 0, 0});
  const std::string message = io_error_message([&] { read_idx(short_dims); });
  EXPECT_NE(message.find("short-dims"), std::string::npos) << message;
  EXPECT_NE(message.find("3 dimensions need a 16-byte header but the file ends after 10 bytes "
                         "(offset 10)"),
            std::string::npos)
      << message;

  const fs::path short_magic = write_bytes("short-magic", {0, 0});
  EXPECT_NE(io_error_message([&] { read_idx(short_magic); }).find("inside the 4-byte IDX magic"),
            std::string::npos);
  const fs::path empty = write_bytes("empty", {});
  EXPECT_NE(io_error_message([&] { read_idx(empty); }).find("file ends after 0 bytes"),
            std::string::npos);
}

TEST_F(IdxFiles, WrongMagicIsRefused) {
  const fs::path path = write_bytes("wrong-magic", {0x12, 0x34, 8, 1, 0, 0, 0, 1, 9});
  const std::string message = io_error_message([&] { read_idx(path); });
  EXPECT_NE(message.find("wrong-magic: not an IDX file: magic starts with 0x12 0x34, expected "
                         "0x00 0x00 (offset 0)"),
            std::string::npos)
      << message;
}

TEST_F(IdxFiles, WrongTypeCodeIsRefused) {
  const fs::path path = write_bytes("wrong-type", {0, 0, 0x07, 1, 0, 0, 0, 1, 9});
  const std::string message = io_error_message([&] { read_idx(path); });
  EXPECT_NE(message.find("wrong-type: unknown IDX type code 0x07 (offset 2)"), std::string::npos)
      << message;
  const fs::path no_dims = write_bytes("no-dims", {0, 0, 0x08, 0});
  EXPECT_NE(io_error_message([&] { read_idx(no_dims); }).find("dimension count is 0 (offset 3)"),
            std::string::npos);
}

TEST_F(IdxFiles, TrailingBytesAreRefused) {
  const fs::path path = write_bytes("long", {0, 0, 8, 1, 0, 0, 0, 2, 1, 2, 3});
  const std::string message = io_error_message([&] { read_idx(path); });
  EXPECT_NE(message.find("continues past the end of the data (offset 10)"), std::string::npos)
      << message;
}

TEST_F(IdxFiles, HugeHeadersFailWithoutOverflowOrHugeAllocation) {
  // 2^20 × 2^20 × 2^20 u8 = 2^60 bytes announced, none present.
  const fs::path huge =
      write_bytes("huge", {0, 0, 8, 3, 0, 0x10, 0, 0, 0, 0x10, 0, 0, 0, 0x10, 0, 0});
  EXPECT_NE(io_error_message([&] {
              read_idx(huge);
            }).find("= 1152921504606846976 bytes of data but only 0 follow (offset 16)"),
            std::string::npos);
  // 4 × (2^32 - 1) f64 elements do not fit in 64 bits.
  std::vector<std::uint8_t> bytes(4 + 16, 0xFF);
  bytes[0] = 0;
  bytes[1] = 0;
  bytes[2] = 0x0E;
  bytes[3] = 4;
  const fs::path overflow = write_bytes("overflow", bytes);
  EXPECT_NE(io_error_message([&] { read_idx(overflow); }).find("overflow 64 bits"),
            std::string::npos);
}

TEST_F(IdxFiles, MissingFileNamesThePath) {
  const std::string message = io_error_message([&] { read_idx(file("nowhere.gz")); });
  EXPECT_NE(message.find("nowhere.gz: cannot open for reading"), std::string::npos) << message;
}

TEST_F(IdxFiles, LoadsAnMnistLikeDirectoryInBothLayouts) {
  // Plain images and gzipped labels, as any mix of the two must work.
  write_idx(file("t10k-images-idx3-ubyte"), ramp_u8({6, 3, 2}));
  write_idx(file("t10k-labels-idx1-ubyte.gz"),
            IdxArray::from_values(IdxType::u8, {6}, std::vector<double>{9, 0, 1, 2, 3, 9}));
  const Dataset nchw = load_mnist_like(dir_, Split::test);
  EXPECT_EQ(nchw.images.shape(), (Shape{6, 1, 3, 2}));
  EXPECT_EQ(nchw.images.dtype(), DType::f32);
  EXPECT_EQ(nchw.images.at(7), 49);  // raw pixel value, not yet normalised
  EXPECT_EQ(nchw.labels.dtype(), DType::i32);
  EXPECT_EQ(nchw.labels.to_doubles(), (std::vector<double>{9, 0, 1, 2, 3, 9}));
  EXPECT_EQ(nchw.num_classes, 10);
  EXPECT_EQ(nchw.size(), 6);
  const Dataset flat = load_mnist_like(dir_, Split::test, ImageLayout::flat);
  EXPECT_EQ(flat.images.shape(), (Shape{6, 6}));
  EXPECT_EQ(flat.images.to_doubles(), nchw.images.to_doubles());
}

TEST_F(IdxFiles, ImageAndLabelCountMismatchNamesBothFiles) {
  write_idx(file("train-images-idx3-ubyte.gz"), ramp_u8({5, 2, 2}));
  write_idx(file("train-labels-idx1-ubyte.gz"), ramp_u8({4}));
  const std::string message = io_error_message([&] { load_mnist_like(dir_, Split::train); });
  EXPECT_NE(message.find("train-images-idx3-ubyte.gz holds 5 images but"), std::string::npos)
      << message;
  EXPECT_NE(message.find("train-labels-idx1-ubyte.gz holds 4 labels"), std::string::npos)
      << message;
}

TEST_F(IdxFiles, OutOfRangeLabelNamesIndexAndValue) {
  write_idx(file("train-images-idx3-ubyte"), ramp_u8({3, 2, 2}));
  write_idx(file("train-labels-idx1-ubyte"),
            IdxArray::from_values(IdxType::u8, {3}, std::vector<double>{1, 12, 3}));
  const std::string message = io_error_message([&] { load_mnist_like(dir_, Split::train); });
  EXPECT_NE(message.find("label 12 at index 1 is outside [0, 10)"), std::string::npos) << message;
}

TEST_F(IdxFiles, MissingFilesSayWhichAndHowToGetThem) {
  write_idx(file("train-labels-idx1-ubyte"), ramp_u8({3}));
  const std::string message = io_error_message([&] { load_mnist_like(dir_, Split::train); });
  EXPECT_NE(message.find("missing train-images-idx3-ubyte(.gz)"), std::string::npos) << message;
  EXPECT_EQ(message.find("train-labels-idx1-ubyte(.gz) and"), std::string::npos) << message;
  EXPECT_NE(message.find("apt-get install dataset-fashion-mnist"), std::string::npos) << message;
  EXPECT_NE(message.find("--data"), std::string::npos) << message;
}

TEST_F(IdxFiles, TrainingDataIsSplitAndNormalisedWithTrainingStatistics) {
  // Train images 0..9 are constant images of value 10 * n; test images 0..3 likewise.
  auto constant_images = [](std::int64_t count) {
    std::vector<double> values;
    for (std::int64_t n = 0; n < count; ++n) values.insert(values.end(), 4, 10.0 * n);
    return IdxArray::from_values(IdxType::u8, {count, 2, 2}, values);
  };
  write_idx(file("train-images-idx3-ubyte.gz"), constant_images(10));
  const std::vector<double> labels = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
  write_idx(file("train-labels-idx1-ubyte.gz"), IdxArray::from_values(IdxType::u8, {10}, labels));
  write_idx(file("t10k-images-idx3-ubyte.gz"), constant_images(4));
  write_idx(file("t10k-labels-idx1-ubyte.gz"),
            IdxArray::from_values(IdxType::u8, {4}, std::span(labels).first(4)));

  const TrainingData unit = load_training_data(
      {.dir = dir_, .layout = ImageLayout::flat, .validation_size = 3, .seed = 4});
  EXPECT_EQ(unit.train.size(), 7);
  EXPECT_EQ(unit.validation.size(), 3);
  EXPECT_EQ(unit.test.size(), 4);
  EXPECT_EQ(unit.test.images.shape(), (Shape{4, 4}));
  EXPECT_FLOAT_EQ(static_cast<float>(unit.test.images.at(12)), 30.0F / 255.0F);

  const TrainingData standard = load_training_data(
      {.dir = dir_, .validation_size = 3, .seed = 4, .scaling = Scaling::standardize});
  // Statistics of the 7 training images only: recompute them from the raw values.
  double sum = 0.0;
  double squares = 0.0;
  std::vector<double> raw_train;
  for (std::int64_t n = 0; n < 7; ++n) {
    const double raw = unit.train.images.at(n * 4) * 255.0;
    raw_train.push_back(raw);
    sum += raw;
  }
  const double mean = sum / 7.0;
  // Three held-out images (10 n each) can never average 45, so the training mean differs from
  // the mean over all ten images, 45: the check below tells the two apart.
  EXPECT_NE(mean, 45.0);
  for (double raw : raw_train) squares += (raw - mean) * (raw - mean);
  const double deviation = std::sqrt(squares / 7.0);
  EXPECT_NEAR(standard.normalization.mean, mean, 1e-4);
  EXPECT_NEAR(standard.normalization.scale, deviation, 1e-4);
  EXPECT_NEAR(standard.test.images.at(12), (30.0 - mean) / deviation, 1e-5);
  EXPECT_NEAR(standard.validation.images.at(0),
              (unit.validation.images.at(0) * 255.0 - mean) / deviation, 1e-4);
}

TEST(FashionMnist, HasTenClassNames) {
  const auto names = fashion_mnist_class_names();
  ASSERT_EQ(names.size(), 10U);
  EXPECT_EQ(names[0], "T-shirt/top");
  EXPECT_EQ(names[9], "Ankle boot");
}

// Smoke test on the real files of the Debian package dataset-fashion-mnist, when installed.
TEST(FashionMnist, RealTestSplitHasTenThousandBalancedExamples) {
  const fs::path dir(default_fashion_mnist_dir);
  if (!fs::exists(dir / "t10k-labels-idx1-ubyte.gz") &&
      !fs::exists(dir / "t10k-labels-idx1-ubyte")) {
    GTEST_SKIP() << "Fashion-MNIST is not installed in " << dir;
  }
  const Dataset test = load_mnist_like(dir, Split::test);
  ASSERT_EQ(test.size(), 10000);
  EXPECT_EQ(test.images.shape(), (Shape{10000, 1, 28, 28}));
  std::array<int, 10> per_class{};
  for (std::int32_t label : std::as_const(test.labels).span<std::int32_t>()) ++per_class[label];
  for (int count : per_class) EXPECT_EQ(count, 1000);
  const auto pixels = std::as_const(test.images).span<float>();
  EXPECT_EQ(*std::min_element(pixels.begin(), pixels.end()), 0.0F);
  EXPECT_EQ(*std::max_element(pixels.begin(), pixels.end()), 255.0F);
}

}  // namespace
}  // namespace dagrad::data
