#include "graph/attrs.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "graph/error.hpp"

namespace dagrad {

const AttrValue& Attrs::find(const std::string& key) const {
  auto it = items_.find(key);
  if (it == items_.end()) throw GraphError(fmt::format("attribute '{}' is missing", key));
  return it->second;
}

namespace {
template <class T>
const T& typed(const AttrValue& value, const std::string& key, const char* wanted) {
  if (const T* p = std::get_if<T>(&value)) return *p;
  throw GraphError(fmt::format("attribute '{}' is not {}", key, wanted));
}
}  // namespace

std::int64_t Attrs::integer(const std::string& key) const {
  return typed<std::int64_t>(find(key), key, "an integer");
}
double Attrs::real(const std::string& key) const {
  const AttrValue& value = find(key);
  if (const auto* i = std::get_if<std::int64_t>(&value)) return static_cast<double>(*i);
  return typed<double>(value, key, "a number");
}
bool Attrs::boolean(const std::string& key) const {
  return typed<bool>(find(key), key, "a bool");
}
const std::string& Attrs::text(const std::string& key) const {
  return typed<std::string>(find(key), key, "a string");
}
const std::vector<std::int64_t>& Attrs::integers(const std::string& key) const {
  return typed<std::vector<std::int64_t>>(find(key), key, "a list of integers");
}

std::string Attrs::str() const {
  std::string out;
  for (const auto& [key, value] : items_) {
    if (!out.empty()) out += ", ";
    out += key + "=";
    std::visit(
        [&](const auto& v) {
          using T = std::decay_t<decltype(v)>;
          if constexpr (std::is_same_v<T, std::vector<std::int64_t>>) {
            out += fmt::format("[{}]", fmt::join(v, ","));
          } else {
            out += fmt::format("{}", v);
          }
        },
        value);
  }
  return out;
}

}  // namespace dagrad
