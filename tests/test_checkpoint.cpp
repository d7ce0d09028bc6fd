// safetensors files and checkpoints: round trips, the byte layout, every malformed-file check,
// and crash safety of the atomic save.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "nn/checkpoint.hpp"
#include "nn/init.hpp"
#include "nn/optimizer.hpp"
#include "nn/safetensors.hpp"

namespace dagrad {
namespace {

namespace fs = std::filesystem;

// A fresh directory per test, removed afterwards.
class Checkpoints : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           fmt::format("dagrad_checkpoint_{}_{}", ::getpid(),
                       ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  fs::path dir_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Writes a file with the given header text (its length prefixed, little-endian) and data bytes.
void write_raw(const std::string& path, const std::string& header, const std::string& data,
               std::uint64_t declared_length = UINT64_MAX) {
  std::ofstream out(path, std::ios::binary);
  const std::uint64_t length = declared_length == UINT64_MAX ? header.size() : declared_length;
  unsigned char prefix[8];
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<unsigned char>(length >> (8 * i));
  out.write(reinterpret_cast<const char*>(prefix), 8);
  out << header << data;
}

void expect_io_error(const std::function<void()>& f, std::initializer_list<std::string> fragments) {
  try {
    f();
    ADD_FAILURE() << "no IOError raised";
  } catch (const IOError& e) {
    for (const auto& fragment : fragments) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos)
          << "\"" << e.what() << "\" lacks \"" << fragment << "\"";
    }
  }
}

TEST_F(Checkpoints, SafetensorsRoundTripKeepsEveryDtypeShapeValueAndMetadata) {
  const NamedTensors tensors = {
      {"weights", Tensor::from({1.5, -2.25, 3.0, 1e-30, 7.0, -0.0}, {2, 3})},
      {"wide", Tensor::from({1.0 / 3.0, -1e300}, {2}, DType::f64)},
      {"labels", Tensor::from_ints(std::vector<std::int32_t>{-7, 0, 2147483647}, {3, 1})},
      {"scale", Tensor::scalar(0.5)},
      {"nothing", Tensor({0, 4}, DType::f32)},
  };
  save_safetensors(path("a.safetensors"), tensors, {{"epoch", "3"}, {"note", "ünïcode ok"}});
  const SafetensorsFile file = load_safetensors(path("a.safetensors"));
  ASSERT_EQ(file.tensors.size(), tensors.size());
  for (const auto& [name, tensor] : tensors) {
    const auto found = std::find_if(file.tensors.begin(), file.tensors.end(),
                                    [&](const auto& entry) { return entry.first == name; });
    ASSERT_NE(found, file.tensors.end()) << name;
    EXPECT_EQ(found->second.desc(), tensor.desc()) << name;
    EXPECT_EQ(found->second.to_doubles(), tensor.to_doubles()) << name;
  }
  EXPECT_EQ(file.metadata, (Metadata{{"epoch", "3"}, {"note", "ünïcode ok"}}));
  EXPECT_FALSE(fs::exists(path("a.safetensors.tmp")));
}

TEST_F(Checkpoints, SafetensorsWithoutMetadataHasNoMetadataEntry) {
  save_safetensors(path("b.safetensors"), {{"x", Tensor::scalar(2.0, DType::f64)}});
  const std::string bytes = read_bytes(path("b.safetensors"));
  std::uint64_t length = 0;
  std::memcpy(&length, bytes.data(), 8);
  const auto header = nlohmann::json::parse(bytes.substr(8, length));
  EXPECT_FALSE(header.contains("__metadata__"));
  const SafetensorsFile file = load_safetensors(path("b.safetensors"));
  EXPECT_TRUE(file.metadata.empty());
  EXPECT_EQ(file.tensors.at(0).second.item(), 2.0);
}

TEST_F(Checkpoints, SafetensorsLayoutIsLengthThenJsonThenLittleEndianData) {
  save_safetensors(
      path("c.safetensors"),
      {{"a", Tensor::from({1.0, 2.0}, {2})}, {"b", Tensor::from({3}, {1}, DType::i32)}},
      {{"k", "v"}});
  const std::string bytes = read_bytes(path("c.safetensors"));
  std::uint64_t length = 0;
  for (int i = 7; i >= 0; --i) length = (length << 8) | static_cast<unsigned char>(bytes[i]);
  EXPECT_EQ(length % 8, 0u);  // padded with spaces
  ASSERT_EQ(bytes.size(), 8 + length + 12);
  const auto header = nlohmann::json::parse(bytes.substr(8, length));
  EXPECT_EQ(header["a"]["dtype"], "F32");
  EXPECT_EQ(header["a"]["shape"], nlohmann::json::array({2}));
  EXPECT_EQ(header["a"]["data_offsets"], nlohmann::json::array({0, 8}));
  EXPECT_EQ(header["b"]["dtype"], "I32");
  EXPECT_EQ(header["b"]["data_offsets"], nlohmann::json::array({8, 12}));
  EXPECT_EQ(header["__metadata__"]["k"], "v");
  // 1.0f = 0x3f800000, little-endian.
  EXPECT_EQ(bytes.substr(8 + length, 4), std::string("\x00\x00\x80\x3f", 4));
  EXPECT_EQ(bytes.substr(8 + length + 8, 4), std::string("\x03\x00\x00\x00", 4));
}

TEST_F(Checkpoints, TruncatedFileNamesTheTensorAndTheOffsets) {
  save_safetensors(path("t.safetensors"), {{"weights", Tensor::full({100}, 1.0)}});
  fs::resize_file(path("t.safetensors"), fs::file_size(path("t.safetensors")) - 10);
  expect_io_error([&] { load_safetensors(path("t.safetensors")); },
                  {"t.safetensors", "tensor \"weights\"", "[0, 400]", "390 bytes"});
  fs::resize_file(path("t.safetensors"), 5);
  expect_io_error([&] { load_safetensors(path("t.safetensors")); }, {"5 bytes"});
}

TEST_F(Checkpoints, HeaderLengthBeyondTheFileIsRejected) {
  write_raw(path("h.safetensors"), "{}", "", 1'000'000);
  expect_io_error([&] { load_safetensors(path("h.safetensors")); },
                  {"h.safetensors", "header length is 1000000 bytes", "only 2 bytes"});
  write_raw(path("g.safetensors"), "{}", "", std::uint64_t{1} << 62);
  expect_io_error([&] { load_safetensors(path("g.safetensors")); },
                  {"g.safetensors", "header length is 4611686018427387904 bytes"});
}

TEST_F(Checkpoints, OffsetsOutOfRangeAreRejectedBeforeReading) {
  write_raw(path("o.safetensors"),
            R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})",
            std::string(8, '\0'));
  expect_io_error([&] { load_safetensors(path("o.safetensors")); },
                  {"tensor \"w\"", "[8, 16] are out of range", "8 bytes"});
  write_raw(path("r.safetensors"),
            R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})",
            std::string(8, '\0'));
  expect_io_error([&] { load_safetensors(path("r.safetensors")); }, {"[8, 0]"});
}

TEST_F(Checkpoints, OffsetsThatDoNotMatchTheShapeAreRejected) {
  write_raw(path("s.safetensors"),
            R"({"w": {"dtype": "F64", "shape": [3], "data_offsets": [0, 16]}})",
            std::string(24, '\0'));
  expect_io_error([&] { load_safetensors(path("s.safetensors")); },
                  {"tensor \"w\"", "span 16 bytes", "F64 [3] needs 24 bytes"});
}

TEST_F(Checkpoints, OverlappingTensorsAreRejected) {
  write_raw(path("v.safetensors"),
            R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "I32", "shape": [2], "data_offsets": [4, 12]}})",
            std::string(12, '\0'));
  expect_io_error([&] { load_safetensors(path("v.safetensors")); },
                  {"\"a\" [0, 8]", "\"b\" [4, 12]", "overlap"});
}

TEST_F(Checkpoints, ATensorNamedTwiceIsRejected) {
  write_raw(path("twice.safetensors"),
            R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
            std::string(8, '\0'));
  expect_io_error([&] { load_safetensors(path("twice.safetensors")); },
                  {"tensor \"w\" appears twice"});
}

TEST_F(Checkpoints, UnknownDtypeAndMalformedFieldsAreRejected) {
  write_raw(path("d.safetensors"),
            R"({"half": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}})",
            std::string(4, '\0'));
  expect_io_error([&] { load_safetensors(path("d.safetensors")); },
                  {"d.safetensors", "tensor \"half\"", "unsupported dtype \"F16\""});
  write_raw(path("n.safetensors"),
            R"({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 0]}})", "");
  expect_io_error([&] { load_safetensors(path("n.safetensors")); }, {"\"shape\" [-2]"});
  write_raw(path("m.safetensors"), R"({"w": {"dtype": "F32", "shape": [1]}})", "");
  expect_io_error([&] { load_safetensors(path("m.safetensors")); }, {"\"data_offsets\""});
  write_raw(path("j.safetensors"), R"({"w": {"dtype": )", "");
  expect_io_error([&] { load_safetensors(path("j.safetensors")); }, {"not valid JSON"});
  write_raw(path("meta.safetensors"), R"({"__metadata__": {"epoch": 3}})", "");
  expect_io_error([&] { load_safetensors(path("meta.safetensors")); },
                  {"metadata \"epoch\" must be a string"});
  expect_io_error([&] { load_safetensors(path("missing.safetensors")); },
                  {"cannot open", "missing.safetensors"});
}

TEST_F(Checkpoints, SaveRefusesDuplicateAndReservedNames) {
  EXPECT_THROW(save_safetensors(path("x"), {{"a", Tensor::scalar(1)}, {"a", Tensor::scalar(2)}}),
               Error);
  EXPECT_THROW(save_safetensors(path("x"), {{"__metadata__", Tensor::scalar(1)}}), Error);
  EXPECT_FALSE(fs::exists(path("x")));
}

TEST_F(Checkpoints, FailedSaveLeavesThePreviousFileIntact) {
  save_safetensors(path("keep.safetensors"), {{"w", Tensor::full({4}, 1.0)}});
  // The temporary file cannot be created: a directory is in its place.
  fs::create_directories(path("keep.safetensors.tmp"));
  expect_io_error(
      [&] {
        save_safetensors(path("keep.safetensors"), {{"w", Tensor::full({4}, 2.0)}});
      },
      {"cannot create", "keep.safetensors.tmp"});
  EXPECT_EQ(load_safetensors(path("keep.safetensors")).tensors.at(0).second.at(0), 1.0);
  // A missing directory.
  expect_io_error([&] { save_safetensors(path("no/such/dir/x.safetensors"), {}); },
                  {"cannot create"});
}

TEST_F(Checkpoints, CheckpointSurvivesAWriterKilledMidWrite) {
  const std::string target = path("model.safetensors");
  save_safetensors(target, {{"w", Tensor::full({1000}, 1.0)}}, {{"version", "old"}});
  constexpr std::int64_t big = 8 << 20;  // 32 MB per write
  bool interrupted_a_write = false;
  for (int attempt = 0; attempt < 5; ++attempt) {
    int ready[2];
    ASSERT_EQ(::pipe(ready), 0);
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      // The child rewrites the checkpoint with new contents until it is killed.
      try {
        const Tensor weights = Tensor::full({big}, 2.0);
        const char go = 'x';
        if (::write(ready[1], &go, 1) != 1) ::_exit(2);
        for (;;) save_safetensors(target, {{"w", weights}}, {{"version", "new"}});
      } catch (...) {
        ::_exit(1);
      }
    }
    ::close(ready[1]);
    char go = 0;
    ASSERT_EQ(::read(ready[0], &go, 1), 1) << "the writer died before starting";
    ::close(ready[0]);
    ::usleep(static_cast<useconds_t>(5000 + 7000 * attempt));
    ::kill(child, SIGKILL);
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFSIGNALED(status)) << "the writer exited on its own, status " << status;
    if (fs::exists(target + ".tmp")) interrupted_a_write = true;

    // Whatever moment the kill hit, the checkpoint is a complete old or new version.
    const SafetensorsFile file = load_safetensors(target);
    ASSERT_EQ(file.tensors.size(), 1u);
    const Tensor& w = file.tensors[0].second;
    if (file.metadata.at("version") == "old") {
      EXPECT_EQ(w.numel(), 1000);
      EXPECT_EQ(w.at(999), 1.0);
    } else {
      EXPECT_EQ(w.numel(), big);
      EXPECT_EQ(w.at(0), 2.0);
      EXPECT_EQ(w.at(big - 1), 2.0);
    }
  }
  EXPECT_TRUE(interrupted_a_write) << "no kill landed while a temporary file was being written";
}

Graph& small_model(Graph& g, double fill) {
  g.parameter("fc1/weight", Tensor::full({3, 2}, fill));
  g.parameter("fc1/bias", Tensor::full({2}, fill + 1, DType::f64));
  g.parameter("bn/running_mean", Tensor::full({2}, fill + 2), /*trainable=*/false);
  return g;
}

TEST_F(Checkpoints, CheckpointRestoresParametersOptimizerStateAndPosition) {
  Graph g;
  small_model(g, 0.5);
  std::vector<Tensor> params = {g.value_of(g.find("fc1/weight")), g.value_of(g.find("fc1/bias"))};
  std::vector<Tensor> grads = {Tensor::full({3, 2}, 0.1), Tensor::full({2}, -0.2, DType::f64)};
  Adam adam({.learning_rate = 0.01});
  adam.step(params, grads);
  adam.step(params, grads);
  std::mt19937_64 rng(123);
  rng.discard(17);
  Checkpoint::save(path("ckpt.safetensors"), g, &adam,
                   {.epoch = 4,
                    .step = 2,
                    .schedule_position = 4,
                    .rng_state = rng_state_string(rng),
                    .extra = {{"model", "mlp"}}});
  const auto next_random = rng();

  Graph restored;
  small_model(restored, 9.0);
  Adam resumed({.learning_rate = 0.01});
  const CheckpointInfo info = Checkpoint::load(path("ckpt.safetensors"), restored, &resumed);
  EXPECT_EQ(info.epoch, 4);
  EXPECT_EQ(info.step, 2);
  EXPECT_EQ(info.schedule_position, 4);
  EXPECT_EQ(info.extra, (Metadata{{"model", "mlp"}}));
  for (const char* name : {"fc1/weight", "fc1/bias", "bn/running_mean"}) {
    EXPECT_EQ(restored.value_of(restored.find(name)).to_doubles(),
              g.value_of(g.find(name)).to_doubles())
        << name;
  }
  std::mt19937_64 restored_rng;
  restore_rng_state(restored_rng, info.rng_state);
  EXPECT_EQ(restored_rng(), next_random);
  // Training continues identically.
  std::vector<Tensor> restored_params = {restored.value_of(restored.find("fc1/weight")),
                                         restored.value_of(restored.find("fc1/bias"))};
  EXPECT_EQ(resumed.steps(), 2);
  adam.step(params, grads);
  resumed.step(restored_params, grads);
  EXPECT_EQ(restored_params[0].to_doubles(), params[0].to_doubles());
  EXPECT_EQ(restored_params[1].to_doubles(), params[1].to_doubles());
}

TEST_F(Checkpoints, ShapeMismatchNamesTheTensorAndBothShapesAndChangesNothing) {
  Graph g;
  small_model(g, 0.5);
  Checkpoint::save(path("ckpt.safetensors"), g, nullptr, {});
  Graph other;
  other.parameter("fc1/weight", Tensor::full({3, 2}, 7.0));
  other.parameter("fc1/bias", Tensor::full({4}, 7.0, DType::f64));
  other.parameter("bn/running_mean", Tensor::full({2}, 7.0), false);
  try {
    Checkpoint::load(path("ckpt.safetensors"), other, nullptr);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("\"param/fc1/bias\""), std::string::npos) << message;
    EXPECT_NE(message.find("f64[2]"), std::string::npos) << message;
    EXPECT_NE(message.find("f64[4]"), std::string::npos) << message;
  }
  EXPECT_EQ(other.value_of(other.find("fc1/weight")).at(0), 7.0);  // untouched
}

TEST_F(Checkpoints, WeightsOnlyFileLoadsWithPositionZero) {
  save_safetensors(path("weights.safetensors"),
                   {{"param/fc1/weight", Tensor::full({3, 2}, 4.0)},
                    {"param/fc1/bias", Tensor::full({2}, 5.0, DType::f64)},
                    {"param/bn/running_mean", Tensor::full({2}, 6.0)}});
  Graph g;
  small_model(g, 0.0);
  const CheckpointInfo info = Checkpoint::load(path("weights.safetensors"), g, nullptr);
  EXPECT_EQ(info.epoch, 0);
  EXPECT_EQ(info.step, 0);
  EXPECT_EQ(g.value_of(g.find("fc1/bias")).to_doubles(), (std::vector<double>{5.0, 5.0}));
  save_safetensors(path("bad.safetensors"), {}, {{"dagrad.epoch", "three"}});
  Graph empty;
  expect_io_error([&] { Checkpoint::load(path("bad.safetensors"), empty, nullptr); },
                  {"metadata \"dagrad.epoch\" must be an integer, got \"three\""});
}

TEST_F(Checkpoints, MissingParameterAndWrongOptimizerAreErrors) {
  Graph g;
  small_model(g, 0.5);
  SGD sgd;
  Checkpoint::save(path("ckpt.safetensors"), g, &sgd, {});
  Graph bigger;
  small_model(bigger, 0.5);
  bigger.parameter("fc2/weight", Tensor::full({2, 2}, 1.0));
  expect_io_error([&] { Checkpoint::load(path("ckpt.safetensors"), bigger, nullptr); },
                  {"parameter \"fc2/weight\" is not in the file"});
  Adam adam;
  try {
    Checkpoint::load(path("ckpt.safetensors"), g, &adam);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("holds SGD state, cannot load it into Adam"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(Checkpoint::save(path("x"), g, nullptr, {.extra = {{"dagrad.epoch", "1"}}}), Error);
  std::mt19937_64 rng;
  EXPECT_THROW(restore_rng_state(rng, "not a state"), Error);
}

}  // namespace
}  // namespace dagrad
