// Seeded randomness for data loading and augmentation.
//
// The engine is std::mt19937_64, whose output sequence the C++ standard fixes, and the
// integer and [0,1) draws below are written here rather than taken from the <random>
// distributions (whose algorithms vary between standard libraries), so a shuffle order
// depends only on the seed. Beta draws use std::gamma_distribution and are reproducible
// within one standard library.
#pragma once

#include <cstdint>
#include <random>
#include <span>

namespace dagrad::data {

// Mixes a stream number (an epoch, a worker) into a seed with the splitmix64 finaliser, so
// nearby seeds and streams give unrelated sequences.
std::uint64_t mix_seed(std::uint64_t seed, std::uint64_t stream);

class Random {
 public:
  explicit Random(std::uint64_t seed) : engine_(seed) {}

  std::uint64_t next() { return engine_(); }
  // Uniform integer in [0, bound); bound must be positive. Rejection sampling, no modulo bias.
  std::uint64_t below(std::uint64_t bound);
  // Uniform integer in [low, high] (inclusive).
  std::int64_t between(std::int64_t low, std::int64_t high);
  // Uniform double in [0, 1) with 53 random bits.
  double uniform();
  // True with the given probability.
  bool bernoulli(double probability) { return uniform() < probability; }
  // A draw from Beta(a, b) = X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b); a, b > 0.
  double beta(double a, double b);
  // Fisher–Yates shuffle in place.
  void shuffle(std::span<std::int64_t> values);

 private:
  std::mt19937_64 engine_;
};

}  // namespace dagrad::data
