#include "nn/safetensors.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

namespace dagrad {

namespace {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; dagrad reads and writes it as raw memory");

// A header this large is certainly not a checkpoint (the reference implementation caps at 100 MB).
constexpr std::uint64_t max_header_bytes = 100u << 20;

std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return "F32";
    case DType::f64:
      return "F64";
    case DType::i32:
      return "I32";
  }
  return "?";
}

std::string errno_text() {
  return std::strerror(errno);
}

// Owns a POSIX file descriptor.
class File {
 public:
  File(const std::string& path, int flags, mode_t mode = 0)
      : fd_(::open(path.c_str(), flags, mode)) {}
  ~File() {
    if (fd_ >= 0) ::close(fd_);
  }
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  int fd() const { return fd_; }
  bool close() {
    const int result = ::close(fd_);
    fd_ = -1;
    return result == 0;
  }

 private:
  int fd_;
};

void write_all(int fd, const void* data, std::size_t bytes, const std::string& path) {
  const auto* cursor = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t written = ::write(fd, cursor, std::min<std::size_t>(bytes, 1u << 30));
    if (written < 0) {
      if (errno == EINTR) continue;
      throw IOError(fmt::format("save_safetensors: cannot write \"{}\": {}", path, errno_text()));
    }
    cursor += written;
    bytes -= static_cast<std::size_t>(written);
  }
}

}  // namespace

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const Metadata& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    header["__metadata__"] = std::move(meta);
  }
  std::set<std::string> names;
  std::uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (name == "__metadata__" || name.empty()) {
      throw Error(fmt::format("save_safetensors \"{}\": \"{}\" cannot name a tensor", path, name));
    }
    if (!names.insert(name).second) {
      throw Error(fmt::format("save_safetensors \"{}\": two tensors are named \"{}\"", path, name));
    }
    if (!tensor.defined()) {
      throw Error(fmt::format("save_safetensors \"{}\": tensor \"{}\" has no data", path, name));
    }
    const std::uint64_t end = offset + tensor.bytes();
    header[name] = {{"dtype", dtype_name(tensor.dtype())},
                    {"shape", tensor.shape().dims()},
                    {"data_offsets", {offset, end}}};
    offset = end;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const std::uint64_t header_length = text.size();

  const std::string temporary = path + ".tmp";
  {
    File file(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (file.fd() < 0) {
      throw IOError(
          fmt::format("save_safetensors: cannot create \"{}\": {}", temporary, errno_text()));
    }
    try {
      write_all(file.fd(), &header_length, sizeof header_length, temporary);
      write_all(file.fd(), text.data(), text.size(), temporary);
      for (const auto& entry : tensors) {
        write_all(file.fd(), entry.second.raw(), entry.second.bytes(), temporary);
      }
      if (::fsync(file.fd()) != 0) {
        throw IOError(
            fmt::format("save_safetensors: cannot fsync \"{}\": {}", temporary, errno_text()));
      }
      if (!file.close()) {
        throw IOError(
            fmt::format("save_safetensors: cannot close \"{}\": {}", temporary, errno_text()));
      }
    } catch (...) {
      ::unlink(temporary.c_str());
      throw;
    }
  }
  if (::rename(temporary.c_str(), path.c_str()) != 0) {
    const std::string reason = errno_text();
    ::unlink(temporary.c_str());
    throw IOError(fmt::format("save_safetensors: cannot rename \"{}\" to \"{}\": {}", temporary,
                              path, reason));
  }
  // Make the rename itself durable. Failing to open the directory (e.g. no read permission) is
  // not an error: the data is already safe in the file.
  std::filesystem::path directory = std::filesystem::path(path).parent_path();
  if (directory.empty()) directory = std::filesystem::path(".");
  File dir(directory.string(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir.fd() >= 0) ::fsync(dir.fd());
}

SafetensorsFile load_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    throw IOError(fmt::format("load_safetensors: cannot open \"{}\": {}", path, errno_text()));
  in.seekg(0, std::ios::end);
  const auto file_size = static_cast<std::uint64_t>(in.tellg());
  in.seekg(0);
  if (file_size < 8) {
    throw IOError(
        fmt::format("load_safetensors \"{}\": the file has {} bytes, fewer than the "
                    "8-byte header length",
                    path, file_size));
  }
  std::uint64_t header_length = 0;
  in.read(reinterpret_cast<char*>(&header_length), sizeof header_length);
  if (header_length > max_header_bytes) {
    throw IOError(
        fmt::format("load_safetensors \"{}\": the header length is {} bytes, more than "
                    "the {} bytes a safetensors header may have (not a safetensors file?)",
                    path, header_length, max_header_bytes));
  }
  if (header_length > file_size - 8) {
    throw IOError(
        fmt::format("load_safetensors \"{}\": the header length is {} bytes but the file "
                    "has only {} bytes after the 8-byte length (truncated or not a "
                    "safetensors file)",
                    path, header_length, file_size - 8));
  }
  std::string text(header_length, '\0');
  in.read(text.data(), static_cast<std::streamsize>(header_length));
  if (!in) throw IOError(fmt::format("load_safetensors \"{}\": cannot read the header", path));
  const std::uint64_t data_size = file_size - 8 - header_length;

  // JSON keeps the last of two equal keys silently; a file naming one tensor twice is refused.
  std::set<std::string> top_level_keys;
  std::string duplicate;
  const nlohmann::json::parser_callback_t find_duplicates =
      [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
        if (depth == 1 && event == nlohmann::json::parse_event_t::key && parsed.is_string() &&
            !top_level_keys.insert(parsed.get<std::string>()).second && duplicate.empty()) {
          duplicate = parsed.get<std::string>();
        }
        return true;
      };
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text, find_duplicates);
  } catch (const nlohmann::json::exception& e) {
    throw IOError(
        fmt::format("load_safetensors \"{}\": the header is not valid JSON: {}", path, e.what()));
  }
  if (!header.is_object()) {
    throw IOError(fmt::format("load_safetensors \"{}\": the header is a JSON {}, not an object",
                              path, header.type_name()));
  }
  if (!duplicate.empty()) {
    throw IOError(fmt::format("load_safetensors \"{}\": tensor \"{}\" appears twice in the header",
                              path, duplicate));
  }

  struct Entry {
    std::string name;
    TensorDesc desc;
    std::uint64_t begin = 0;
    std::uint64_t end = 0;
  };
  std::vector<Entry> entries;
  SafetensorsFile result;
  for (const auto& [name, field] : header.items()) {
    const auto fail = [&](const std::string& what) {
      throw IOError(fmt::format("load_safetensors \"{}\": tensor \"{}\": {}", path, name, what));
    };
    if (name == "__metadata__") {
      if (!field.is_object()) {
        throw IOError(
            fmt::format("load_safetensors \"{}\": \"__metadata__\" must be an object of "
                        "strings, got {}",
                        path, field.dump()));
      }
      for (const auto& [key, value] : field.items()) {
        if (!value.is_string()) {
          throw IOError(
              fmt::format("load_safetensors \"{}\": metadata \"{}\" must be a string, got "
                          "{}",
                          path, key, value.dump()));
        }
        result.metadata[key] = value.get<std::string>();
      }
      continue;
    }
    if (!field.is_object()) fail(fmt::format("the entry must be an object, got {}", field.dump()));
    Entry entry{.name = name};
    // dtype
    if (!field.contains("dtype") || !field["dtype"].is_string()) {
      fail("\"dtype\" is missing or not a string");
    }
    const auto dtype = field["dtype"].get<std::string>();
    if (dtype == "F32") {
      entry.desc.dtype = DType::f32;
    } else if (dtype == "F64") {
      entry.desc.dtype = DType::f64;
    } else if (dtype == "I32") {
      entry.desc.dtype = DType::i32;
    } else {
      fail(fmt::format("unsupported dtype \"{}\" (dagrad reads F32, F64 and I32)", dtype));
    }
    // shape, with the byte count computed without overflow
    if (!field.contains("shape") || !field["shape"].is_array()) {
      fail("\"shape\" is missing or not an array");
    }
    std::uint64_t numel = 1;
    bool overflow = false;
    for (const auto& dim : field["shape"]) {
      if (!dim.is_number_integer() || dim.get<std::int64_t>() < 0) {
        fail(fmt::format("\"shape\" {} must hold non-negative integers", field["shape"].dump()));
      }
      const auto d = dim.get<std::uint64_t>();
      if (d != 0 && numel > (std::numeric_limits<std::uint64_t>::max() / 16) / d) overflow = true;
      numel *= d;
      entry.desc.shape.dims().push_back(static_cast<std::int64_t>(d));
    }
    if (overflow) fail(fmt::format("\"shape\" {} is too large", field["shape"].dump()));
    // data_offsets
    const auto& offsets = field.contains("data_offsets") ? field["data_offsets"] : nlohmann::json();
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned()) {
      fail(fmt::format("\"data_offsets\" must be [begin, end] with non-negative integers, got {}",
                       offsets.dump()));
    }
    entry.begin = offsets[0].get<std::uint64_t>();
    entry.end = offsets[1].get<std::uint64_t>();
    if (entry.begin > entry.end || entry.end > data_size) {
      fail(fmt::format("\"data_offsets\" [{}, {}] are out of range: the data section has {} bytes",
                       entry.begin, entry.end, data_size));
    }
    const std::uint64_t expected = numel * size_of(entry.desc.dtype);
    if (entry.end - entry.begin != expected) {
      fail(fmt::format("\"data_offsets\" [{}, {}] span {} bytes but {} {} needs {} bytes",
                       entry.begin, entry.end, entry.end - entry.begin, dtype, entry.desc.shape,
                       expected));
    }
    entries.push_back(std::move(entry));
  }
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.begin < b.begin; });
  for (std::size_t i = 1; i < entries.size(); ++i) {
    if (entries[i].begin < entries[i - 1].end) {
      throw IOError(
          fmt::format("load_safetensors \"{}\": tensors \"{}\" [{}, {}] and \"{}\" [{}, "
                      "{}] overlap",
                      path, entries[i - 1].name, entries[i - 1].begin, entries[i - 1].end,
                      entries[i].name, entries[i].begin, entries[i].end));
    }
  }

  const std::uint64_t data_start = 8 + header_length;
  for (const Entry& entry : entries) {
    Tensor tensor(entry.desc);
    if (tensor.bytes() > 0) {
      in.seekg(static_cast<std::streamoff>(data_start + entry.begin));
      in.read(static_cast<char*>(tensor.raw()), static_cast<std::streamsize>(tensor.bytes()));
      if (!in) {
        throw IOError(
            fmt::format("load_safetensors \"{}\": tensor \"{}\": cannot read {} bytes at "
                        "offset {}",
                        path, entry.name, tensor.bytes(), data_start + entry.begin));
      }
    }
    result.tensors.emplace_back(entry.name, std::move(tensor));
  }
  return result;
}

}  // namespace dagrad
