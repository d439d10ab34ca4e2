// SplitMix64's mixer (Steele, Lea & Flood 2014), shared by every seeded C++ routine: a bijective
// 64-bit hash of z + golden. The Python references (megafim/data/fim_reference.py, the sample-index
// tests) implement the same function, so C++ and Python draw identical numbers.
#pragma once

#include <cstdint>

namespace megafim {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

inline uint64_t splitmix64(uint64_t z) {
  z += kGolden;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

}  // namespace megafim
