// safetensors files: an 8-byte little-endian header length N, N bytes of JSON header
//   {"<name>": {"dtype": "F32"|"F64"|"I32", "shape": [...], "data_offsets": [begin, end]}, …,
//    "__metadata__": {"<key>": "<string>", …}}
// then the raw little-endian tensor bytes; offsets are relative to the end of the header.
#pragma once

#include <map>
#include <string>

#include "nn/named_tensors.hpp"

namespace dagrad {

using Metadata = std::map<std::string, std::string>;

struct SafetensorsFile {
  NamedTensors tensors;  // in the order of their data offsets
  Metadata metadata;
};

// Writes `tensors` (f32, f64 or i32; names unique, not "__metadata__") and `metadata` to
// `path`, atomically: the bytes go to `path + ".tmp"`, which is flushed, fsync'ed and renamed
// over `path` (then the directory is fsync'ed). A crash or error mid-write never damages a
// previous file at `path`. The header is padded with spaces to a multiple of 8 bytes.
// Throws IOError naming the file and the reason, Error for a bad name.
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const Metadata& metadata = {});

// Reads a file written by save_safetensors (or any conforming writer). Validates, before reading
// any tensor data: the header length against the file size, the JSON, and for every tensor its
// dtype, shape and data_offsets (in range, begin <= end, end − begin = numel · dtype size,
// no two tensors overlapping). Throws IOError naming the file, the tensor and the field/values.
SafetensorsFile load_safetensors(const std::string& path);

}  // namespace dagrad
