#include "data/random.hpp"

#include <limits>
#include <utility>

namespace dagrad::data {

std::uint64_t mix_seed(std::uint64_t seed, std::uint64_t stream) {
  std::uint64_t z = seed + 0x9e3779b97f4a7c15ULL * (stream + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

std::uint64_t Random::below(std::uint64_t bound) {
  if (bound <= 1) return 0;
  // Accept only draws below the largest multiple of `bound`, so every residue is equally likely.
  const std::uint64_t limit =
      std::numeric_limits<std::uint64_t>::max() - std::numeric_limits<std::uint64_t>::max() % bound;
  std::uint64_t draw = engine_();
  while (draw >= limit) draw = engine_();
  return draw % bound;
}

std::int64_t Random::between(std::int64_t low, std::int64_t high) {
  if (high <= low) return low;
  const auto span = static_cast<std::uint64_t>(high - low) + 1;
  return low + static_cast<std::int64_t>(below(span));
}

double Random::uniform() {
  return static_cast<double>(engine_() >> 11) * 0x1.0p-53;
}

double Random::beta(double a, double b) {
  const double x = std::gamma_distribution<double>(a, 1.0)(engine_);
  const double y = std::gamma_distribution<double>(b, 1.0)(engine_);
  // Both tiny (possible for very small a, b): fall back to the two-point limit of Beta.
  if (x + y <= 0.0) return uniform() < a / (a + b) ? 1.0 : 0.0;
  return x / (x + y);
}

void Random::shuffle(std::span<std::int64_t> values) {
  for (std::size_t i = values.size(); i > 1; --i) {
    const auto j = static_cast<std::size_t>(below(i));
    std::swap(values[i - 1], values[j]);
  }
}

}  // namespace dagrad::data
