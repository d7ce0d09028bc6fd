#include "data/idx.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "graph/error.hpp"

namespace dagrad::data {

namespace {

constexpr std::size_t magic_bytes = 4;
constexpr const char* known_type_codes = "0x08 u8, 0x09 i8, 0x0B i16, 0x0C i32, 0x0D f32, 0x0E f64";

template <class F>
decltype(auto) visit_idx_type(IdxType type, F&& f) {
  switch (type) {
    case IdxType::u8:
      return f(std::uint8_t{});
    case IdxType::i8:
      return f(std::int8_t{});
    case IdxType::i16:
      return f(std::int16_t{});
    case IdxType::i32:
      return f(std::int32_t{});
    case IdxType::f32:
      return f(float{});
    case IdxType::f64:
      return f(double{});
  }
  throw Error(fmt::format("IDX: unknown element type code 0x{:02X}", static_cast<int>(type)));
}

bool is_known_type_code(std::uint8_t code) {
  switch (code) {
    case 0x08:
    case 0x09:
    case 0x0B:
    case 0x0C:
    case 0x0D:
    case 0x0E:
      return true;
    default:
      return false;
  }
}

// IDX stores elements big-endian; swap each element in place when the host is little-endian.
void swap_big_endian(std::span<std::byte> bytes, std::size_t element_size) {
  if constexpr (std::endian::native == std::endian::big) return;
  if (element_size == 1) return;
  for (std::size_t i = 0; i + element_size <= bytes.size(); i += element_size) {
    std::reverse(bytes.begin() + static_cast<std::ptrdiff_t>(i),
                 bytes.begin() + static_cast<std::ptrdiff_t>(i + element_size));
  }
}

std::string describe(const std::vector<std::int64_t>& dims, IdxType type) {
  return fmt::format("{} {}", fmt::join(dims, "×"), to_string(type));
}

// Sequential reads through zlib's gz* API, which decompresses gzip streams (recognised by
// their 1f 8b magic) and passes other files through unchanged. Keeps the offset reached in
// the decompressed stream and tells a cut-short gzip stream from corrupted data.
class IdxSource {
 public:
  explicit IdxSource(const std::filesystem::path& path) : name_(path.string()) {
    errno = 0;
    file_ = gzopen(name_.c_str(), "rb");
    if (file_ == nullptr) {
      throw IOError(fmt::format("{}: cannot open for reading: {}", name_,
                                errno != 0 ? std::strerror(errno) : "out of memory"));
    }
    gzbuffer(file_, 1 << 17);
  }
  IdxSource(const IdxSource&) = delete;
  IdxSource& operator=(const IdxSource&) = delete;
  ~IdxSource() { gzclose_r(file_); }

  // Reads up to `count` bytes; returns fewer only at the end of the data. Throws IOError on
  // corrupted gzip data or a failing read.
  std::size_t read(std::byte* destination, std::size_t count) {
    std::size_t total = 0;
    while (total < count) {
      const auto chunk = static_cast<unsigned>(std::min<std::size_t>(count - total, 1U << 30));
      const int got = gzread(file_, destination + total, chunk);
      if (got <= 0) break;
      total += static_cast<std::size_t>(got);
      offset_ += got;
    }
    if (total < count) check_end();
    return total;
  }

  const std::string& name() const { return name_; }
  std::int64_t offset() const { return offset_; }
  bool gzip_truncated() const { return gzip_truncated_; }
  // A note for error messages when a short read came from a truncated .gz file, else "".
  std::string truncation_note() const {
    return gzip_truncated_ ? " (the gzip stream is cut short: the .gz file is truncated)" : "";
  }

 private:
  void check_end() {
    int error_number = Z_OK;
    const char* message = gzerror(file_, &error_number);
    if (error_number == Z_OK) return;
    if (error_number == Z_BUF_ERROR) {
      gzip_truncated_ = true;
      return;
    }
    if (error_number == Z_ERRNO) {
      throw IOError(
          fmt::format("{}: read failed at offset {}: {}", name_, offset_, std::strerror(errno)));
    }
    throw IOError(fmt::format("{}: corrupted gzip data after {} decompressed bytes: {}", name_,
                              offset_, message));
  }

  std::string name_;
  gzFile file_ = nullptr;
  std::int64_t offset_ = 0;
  bool gzip_truncated_ = false;
};

template <class T>
T convert_checked(double value, IdxType type) {
  if constexpr (std::is_integral_v<T>) {
    if (!(value >= static_cast<double>(std::numeric_limits<T>::min()) &&
          value <= static_cast<double>(std::numeric_limits<T>::max()) &&
          std::floor(value) == value)) {
      throw Error(
          fmt::format("IdxArray::from_values: {} is not a valid {} value", value, to_string(type)));
    }
  }
  return static_cast<T>(value);
}

}  // namespace

std::size_t size_of(IdxType type) {
  return visit_idx_type(type, [](auto zero) { return sizeof(zero); });
}

std::string_view to_string(IdxType type) {
  switch (type) {
    case IdxType::u8:
      return "u8";
    case IdxType::i8:
      return "i8";
    case IdxType::i16:
      return "i16";
    case IdxType::i32:
      return "i32";
    case IdxType::f32:
      return "f32";
    case IdxType::f64:
      return "f64";
  }
  return "?";
}

std::int64_t IdxArray::numel() const {
  std::int64_t n = 1;
  for (auto d : dims) n *= d;
  return n;
}

double IdxArray::at(std::int64_t flat_index) const {
  const std::size_t element_size = size_of(type);
  if (flat_index < 0 || static_cast<std::size_t>(flat_index) >= data.size() / element_size) {
    throw Error(fmt::format("IdxArray {}: index {} out of range ({} elements)",
                            describe(dims, type), flat_index, data.size() / element_size));
  }
  return visit_idx_type(type, [&](auto zero) {
    decltype(zero) value;
    std::memcpy(&value, data.data() + static_cast<std::size_t>(flat_index) * element_size,
                sizeof(value));
    return static_cast<double>(value);
  });
}

Tensor IdxArray::to_tensor(DType dtype) const {
  if (data.size() != static_cast<std::size_t>(numel()) * size_of(type)) {
    throw Error(fmt::format("IdxArray {}: holds {} bytes, its dimensions need {}",
                            describe(dims, type), data.size(), numel() * size_of(type)));
  }
  Tensor tensor(Shape(dims), dtype);
  visit_idx_type(type, [&](auto source_zero) {
    using Source = decltype(source_zero);
    auto fill = [&](auto* destination) {
      using Destination = std::remove_pointer_t<decltype(destination)>;
      const std::byte* source = data.data();
      for (std::int64_t i = 0; i < tensor.numel(); ++i, source += sizeof(Source)) {
        Source value;
        std::memcpy(&value, source, sizeof(Source));
        destination[i] = static_cast<Destination>(value);
      }
    };
    switch (dtype) {
      case DType::f32:
        fill(tensor.data<float>());
        break;
      case DType::f64:
        fill(tensor.data<double>());
        break;
      case DType::i32:
        fill(tensor.data<std::int32_t>());
        break;
    }
  });
  return tensor;
}

IdxArray IdxArray::from_values(IdxType type, std::vector<std::int64_t> dims,
                               std::span<const double> values) {
  IdxArray array{.type = type, .dims = std::move(dims)};
  if (static_cast<std::int64_t>(values.size()) != array.numel()) {
    throw Error(fmt::format("IdxArray::from_values: {} values given for dimensions {}",
                            values.size(), describe(array.dims, type)));
  }
  const std::size_t element_size = size_of(type);
  array.data.resize(values.size() * element_size);
  visit_idx_type(type, [&](auto zero) {
    using T = decltype(zero);
    for (std::size_t i = 0; i < values.size(); ++i) {
      const T value = convert_checked<T>(values[i], type);
      std::memcpy(array.data.data() + i * element_size, &value, sizeof(T));
    }
  });
  return array;
}

IdxArray read_idx(const std::filesystem::path& path) {
  IdxSource source(path);
  const std::string& name = source.name();

  std::array<std::uint8_t, magic_bytes> magic{};
  const std::size_t magic_read = source.read(reinterpret_cast<std::byte*>(magic.data()), 4);
  if (magic_read < magic_bytes) {
    throw IOError(
        fmt::format("{}: file ends after {} bytes, inside the 4-byte IDX magic (offset {}){}", name,
                    magic_read, magic_read, source.truncation_note()));
  }
  if (magic[0] != 0 || magic[1] != 0) {
    throw IOError(fmt::format(
        "{}: not an IDX file: magic starts with 0x{:02X} 0x{:02X}, expected 0x00 0x00 (offset 0)",
        name, magic[0], magic[1]));
  }
  if (!is_known_type_code(magic[2])) {
    throw IOError(fmt::format("{}: unknown IDX type code 0x{:02X} (offset 2); known codes: {}",
                              name, magic[2], known_type_codes));
  }
  IdxArray array;
  array.type = static_cast<IdxType>(magic[2]);
  const std::size_t dimension_count = magic[3];
  if (dimension_count == 0) {
    throw IOError(fmt::format(
        "{}: dimension count is 0 (offset 3); an IDX file has at least one dimension", name));
  }

  const std::size_t header_bytes = magic_bytes + 4 * dimension_count;
  std::vector<std::uint8_t> dimension_bytes(4 * dimension_count);
  const std::size_t dims_read =
      source.read(reinterpret_cast<std::byte*>(dimension_bytes.data()), dimension_bytes.size());
  if (dims_read < dimension_bytes.size()) {
    throw IOError(fmt::format(
        "{}: header cut short: {} dimensions need a {}-byte header but the file ends after {} "
        "bytes (offset {}){}",
        name, dimension_count, header_bytes, magic_bytes + dims_read, magic_bytes + dims_read,
        source.truncation_note()));
  }

  // Sizes are computed in 64 bits with explicit overflow checks: a corrupted header must
  // produce an error, never a wrapped-around size.
  constexpr auto max_bytes = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
  std::uint64_t data_bytes = size_of(array.type);
  for (std::size_t axis = 0; axis < dimension_count; ++axis) {
    const std::uint8_t* b = dimension_bytes.data() + 4 * axis;
    const std::uint64_t dim = (std::uint64_t{b[0]} << 24) | (std::uint64_t{b[1]} << 16) |
                              (std::uint64_t{b[2]} << 8) | std::uint64_t{b[3]};
    array.dims.push_back(static_cast<std::int64_t>(dim));
    if (dim != 0 && data_bytes > max_bytes / dim) {
      throw IOError(
          fmt::format("{}: header dimensions overflow 64 bits at dimension {} = {} (offset {})",
                      name, axis, dim, magic_bytes + 4 * axis));
    }
    data_bytes *= dim;
  }
  const std::string announced =
      fmt::format("{} = {} bytes of data", describe(array.dims, array.type), data_bytes);

  // Grow the buffer as data actually arrives, so a header announcing far more data than the
  // file holds cannot trigger a huge allocation.
  std::size_t filled = 0;
  while (filled < data_bytes) {
    const std::size_t wanted = static_cast<std::size_t>(
        std::min<std::uint64_t>(data_bytes, filled + std::max<std::size_t>(filled, 1 << 20)));
    array.data.resize(wanted);
    const std::size_t got = source.read(array.data.data() + filled, wanted - filled);
    filled += got;
    if (filled < wanted) break;
  }
  if (filled < data_bytes) {
    throw IOError(fmt::format("{}: header says {} but only {} follow (offset {}){}", name,
                              announced, filled, header_bytes, source.truncation_note()));
  }
  std::byte extra{};
  if (source.read(&extra, 1) != 0) {
    throw IOError(
        fmt::format("{}: header says {}, but the file continues past the end of the "
                    "data (offset {})",
                    name, announced, header_bytes + data_bytes));
  }
  if (source.gzip_truncated()) {
    // All data arrived but the gzip trailer (CRC-32 and length) did not: nothing vouches for it.
    throw IOError(
        fmt::format("{}: header says {}, all present, but the gzip stream is cut short "
                    "before its checksum trailer (the .gz file is truncated)",
                    name, announced));
  }
  swap_big_endian(array.data, size_of(array.type));
  return array;
}

void write_idx(const std::filesystem::path& path, const IdxArray& array, Compression compression) {
  const std::string name = path.string();
  if (array.dims.empty() || array.dims.size() > 255) {
    throw Error(fmt::format("write_idx {}: an IDX file has 1 to 255 dimensions, got {}", name,
                            array.dims.size()));
  }
  for (auto d : array.dims) {
    if (d < 0 || d > std::numeric_limits<std::uint32_t>::max()) {
      throw Error(
          fmt::format("write_idx {}: dimension {} does not fit an unsigned 32-bit field", name, d));
    }
  }
  const std::size_t element_size = size_of(array.type);
  if (array.data.size() != static_cast<std::size_t>(array.numel()) * element_size) {
    throw Error(fmt::format("write_idx {}: array {} holds {} bytes, its dimensions need {}", name,
                            describe(array.dims, array.type), array.data.size(),
                            array.numel() * element_size));
  }

  std::vector<std::byte> bytes;
  bytes.reserve(magic_bytes + 4 * array.dims.size() + array.data.size());
  auto push = [&](std::uint8_t value) { bytes.push_back(static_cast<std::byte>(value)); };
  push(0);
  push(0);
  push(static_cast<std::uint8_t>(array.type));
  push(static_cast<std::uint8_t>(array.dims.size()));
  for (auto d : array.dims) {
    const auto dim = static_cast<std::uint32_t>(d);
    push(static_cast<std::uint8_t>(dim >> 24));
    push(static_cast<std::uint8_t>(dim >> 16));
    push(static_cast<std::uint8_t>(dim >> 8));
    push(static_cast<std::uint8_t>(dim));
  }
  const std::size_t header_bytes = bytes.size();
  bytes.insert(bytes.end(), array.data.begin(), array.data.end());
  swap_big_endian(std::span(bytes).subspan(header_bytes), element_size);

  const bool gzip = compression == Compression::gzip ||
                    (compression == Compression::by_extension && path.extension() == ".gz");
  errno = 0;
  // "T" asks zlib for a plain (transparent) write.
  gzFile file = gzopen(name.c_str(), gzip ? "wb6" : "wbT");
  if (file == nullptr) {
    throw IOError(fmt::format("{}: cannot open for writing: {}", name,
                              errno != 0 ? std::strerror(errno) : "out of memory"));
  }
  std::size_t written = 0;
  while (written < bytes.size()) {
    const auto chunk =
        static_cast<unsigned>(std::min<std::size_t>(bytes.size() - written, 1U << 30));
    const int put = gzwrite(file, bytes.data() + written, chunk);
    if (put <= 0) {
      int error_number = Z_OK;
      const std::string message = gzerror(file, &error_number);
      gzclose_w(file);
      throw IOError(fmt::format("{}: write failed after {} bytes: {}", name, written,
                                error_number == Z_ERRNO ? std::strerror(errno) : message));
    }
    written += static_cast<std::size_t>(put);
  }
  if (gzclose_w(file) != Z_OK) {
    throw IOError(fmt::format("{}: closing after writing {} bytes failed: {}", name, written,
                              std::strerror(errno)));
  }
}

}  // namespace dagrad::data
