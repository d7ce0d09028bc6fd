// Typed node attributes (axis, stride, alpha, ...), checked on access.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <variant>
#include <vector>

namespace dagrad {

using AttrValue = std::variant<bool, std::int64_t, double, std::string, std::vector<std::int64_t>>;

class Attrs {
 public:
  Attrs() = default;
  Attrs(std::initializer_list<std::pair<const std::string, AttrValue>> items) : items_(items) {}

  bool has(const std::string& key) const { return items_.count(key) != 0; }
  void set(const std::string& key, AttrValue value) { items_[key] = std::move(value); }

  // Typed getters; throw GraphError naming the key when it is missing or of another type.
  std::int64_t integer(const std::string& key) const;
  double real(const std::string& key) const;  // accepts an integer attribute too
  bool boolean(const std::string& key) const;
  const std::string& text(const std::string& key) const;
  const std::vector<std::int64_t>& integers(const std::string& key) const;

  std::int64_t integer_or(const std::string& key, std::int64_t fallback) const {
    return has(key) ? integer(key) : fallback;
  }
  double real_or(const std::string& key, double fallback) const {
    return has(key) ? real(key) : fallback;
  }
  bool boolean_or(const std::string& key, bool fallback) const {
    return has(key) ? boolean(key) : fallback;
  }

  const std::map<std::string, AttrValue>& items() const { return items_; }
  std::string str() const;  // "axis=1, keepdims=true"

 private:
  const AttrValue& find(const std::string& key) const;
  std::map<std::string, AttrValue> items_;
};

}  // namespace dagrad
