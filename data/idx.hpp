// IDX files, the format of MNIST and Fashion-MNIST.
//
// Layout: magic 0x00 0x00 <type code> <dimension count>, then one big-endian u32 per
// dimension, then the elements in row-major order, big-endian. Files may be gzip-compressed
// (recognised by the 1f 8b magic, not by the name).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string_view>
#include <vector>

#include "graph/tensor.hpp"

namespace dagrad::data {

// Element types of IDX files; the value is the type code in byte 2 of the magic.
enum class IdxType : std::uint8_t {
  u8 = 0x08,
  i8 = 0x09,
  i16 = 0x0B,
  i32 = 0x0C,
  f32 = 0x0D,
  f64 = 0x0E,
};

std::size_t size_of(IdxType type);
std::string_view to_string(IdxType type);

// The contents of one IDX file: element type, dimensions, and the elements in host byte
// order, row-major.
struct IdxArray {
  IdxType type = IdxType::u8;
  std::vector<std::int64_t> dims;
  std::vector<std::byte> data;

  std::int64_t numel() const;
  // Element at a flat row-major index, converted to double; throws Error when out of range.
  double at(std::int64_t flat_index) const;
  // All elements converted to `dtype`, with shape `dims`.
  Tensor to_tensor(DType dtype) const;

  // An array of `type` and `dims` holding `values` (row-major); throws Error when the count
  // does not match or a value does not fit the type (integers must be whole and in range).
  static IdxArray from_values(IdxType type, std::vector<std::int64_t> dims,
                              std::span<const double> values);
};

// Reads an IDX file, plain or gzip. Throws IOError naming the file, the offset (in the
// decompressed stream) or field, and the values when the file is missing, truncated,
// corrupted, has a bad magic or type code, or holds more or fewer bytes than its header says.
IdxArray read_idx(const std::filesystem::path& path);

enum class Compression {
  by_extension,  // gzip when the name ends in ".gz", plain otherwise
  none,
  gzip,
};

// Writes `array` as an IDX file; throws IOError when the file cannot be written.
void write_idx(const std::filesystem::path& path, const IdxArray& array,
               Compression compression = Compression::by_extension);

}  // namespace dagrad::data
