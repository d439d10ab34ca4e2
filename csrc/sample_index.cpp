// The GPT dataset's index arrays: per-epoch document order, the sample index that packs documents
// into contexts of seq_length + 1 tokens, the per-epoch sample shuffle, and the blending index.
//
// Everything here is a pure function of its arguments. Randomness comes from SplitMix64 with
// Lemire's unbiased bounded draw and a forward Fisher-Yates shuffle, all fully specified (unlike
// std::shuffle / std::uniform_int_distribution, whose output differs between standard libraries),
// so the same seed gives the same arrays on every machine, and the pure-Python reference in
// tests/data/test_sample_index.py reproduces them bit for bit. The definitions are documented in docs/datasets.md.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "splitmix64.h"

namespace py = pybind11;

namespace {

using megafim::kGolden;
using megafim::splitmix64;

// The seed of one random stream: (user seed, what it shuffles, which epoch) -> 64 bits.
uint64_t stream_seed(uint64_t seed, uint64_t tag, uint64_t epoch) {
  return splitmix64(splitmix64(splitmix64(seed) ^ tag) ^ epoch);
}

struct SplitMix64 {
  uint64_t state;
  explicit SplitMix64(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = state;
    state += kGolden;
    return splitmix64(z);
  }
  // Uniform in [0, n), n >= 1, without modulo bias (Lemire 2019, multiply-and-reject).
  uint64_t below(uint64_t n) {
    unsigned __int128 m = static_cast<unsigned __int128>(next()) * n;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < n) {
      const uint64_t threshold = (0 - n) % n;
      while (low < threshold) {
        m = static_cast<unsigned __int128>(next()) * n;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }
};

constexpr uint64_t kTagDocumentOrder = 1;
constexpr int64_t kPrefetch = 32;
constexpr uint64_t kTagSampleShuffle = 2;

// Forward Fisher-Yates: afterwards a[0:r] is the first r entries of a uniform random permutation,
// and those r entries do not depend on how much further the shuffle would have gone.
template <typename T>
void partial_shuffle(T* a, int64_t n, int64_t r, SplitMix64& rng) {
  const int64_t steps = std::min(r, n - 1);
  // The swap targets depend only on the generator, not on the array: draw them kWindow steps
  // early and prefetch, so the random accesses of a large array overlap instead of queueing.
  constexpr int64_t kWindow = 16;
  int64_t ring[kWindow];
  int64_t drawn = 0;
  auto draw = [&]() {
    const int64_t j = drawn + static_cast<int64_t>(rng.below(static_cast<uint64_t>(n - drawn)));
    ring[drawn % kWindow] = j;
    __builtin_prefetch(a + j);
    ++drawn;
  };
  while (drawn < std::min(kWindow, steps)) draw();
  for (int64_t k = 0; k < steps; ++k) {
    const int64_t j = ring[k % kWindow];
    if (drawn < steps) draw();
    std::swap(a[k], a[j]);
  }
}

// Lazily draws the permutation of one epoch, one position at a time, with exactly the swaps of
// partial_shuffle but remembering only the positions it touched: the first r entries cost O(r)
// memory, however many documents the epoch has.
class LazyPermutation {
 public:
  LazyPermutation(int64_t first, int64_t n, uint64_t seed, bool shuffle)
      : first_(first), n_(n), rng_(seed), shuffle_(shuffle) {}
  int64_t next() {  // the entry at position k_, then k_ advances
    const int64_t k = k_++;
    if (!shuffle_) return first_ + k;
    const int64_t value_k = at(k);
    if (k >= n_ - 1) return value_k;  // the last position draws nothing, as in partial_shuffle
    const int64_t j = k + static_cast<int64_t>(rng_.below(static_cast<uint64_t>(n_ - k)));
    const int64_t value_j = at(j);
    moved_[j] = value_k;
    moved_.erase(k);  // position k is never read again
    return value_j;
  }

 private:
  int64_t at(int64_t pos) const {
    auto it = moved_.find(pos);
    return it == moved_.end() ? first_ + pos : it->second;
  }
  int64_t first_, n_, k_ = 0;
  SplitMix64 rng_;
  bool shuffle_;
  std::unordered_map<int64_t, int64_t> moved_;
};

// The documents [first, last) epoch after epoch, each epoch its own permutation, until the stream
// holds num_tokens tokens: whole epochs, then the head of the next one up to the document that
// completes num_tokens.
template <typename T>
py::array_t<T> document_order_impl(const int32_t* size, int64_t first, int64_t last, int64_t num_tokens,
                                   uint64_t seed, bool shuffle) {
  const int64_t n = last - first;
  int64_t tokens_per_epoch = 0;
  for (int64_t d = first; d < last; ++d) tokens_per_epoch += size[d];
  if (tokens_per_epoch == 0) throw std::invalid_argument("document_order: the documents hold no tokens");
  const int64_t full_epochs = num_tokens / tokens_per_epoch;
  int64_t remaining = num_tokens - full_epochs * tokens_per_epoch;
  std::vector<T> head;
  {
    py::gil_scoped_release release;
    LazyPermutation perm(first, n, stream_seed(seed, kTagDocumentOrder, full_epochs), shuffle);
    while (remaining > 0) {
      const int64_t doc = perm.next();
      head.push_back(static_cast<T>(doc));
      remaining -= size[doc];
    }
  }
  py::array_t<T> out(full_epochs * n + static_cast<int64_t>(head.size()));
  T* data = out.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t e = 0; e < full_epochs; ++e) {
      T* epoch = data + e * n;
      for (int64_t k = 0; k < n; ++k) epoch[k] = static_cast<T>(first + k);
      if (shuffle) {
        SplitMix64 rng(stream_seed(seed, kTagDocumentOrder, static_cast<uint64_t>(e)));
        partial_shuffle(epoch, n, n, rng);
      }
    }
    std::copy(head.begin(), head.end(), data + full_epochs * n);
  }
  return out;
}

py::array document_order(const py::array_t<int32_t, py::array::c_style>& sizes, int64_t first, int64_t last,
                         int64_t num_tokens, uint64_t seed, bool shuffle, bool use_int64) {
  if (first < 0 || last <= first || last > sizes.shape(0)) {
    throw std::invalid_argument("document_order: need 0 <= first < last <= len(sizes), got first=" +
                                std::to_string(first) + " last=" + std::to_string(last));
  }
  if (num_tokens < 1) throw std::invalid_argument("document_order: num_tokens must be >= 1");
  if (!use_int64 && last > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("document_order: document ids exceed int32; pass use_int64=True");
  }
  for (int64_t d = first; d < last; ++d) {
    if (sizes.data()[d] < 0) throw std::invalid_argument("document_order: negative document size");
  }
  if (use_int64) return document_order_impl<int64_t>(sizes.data(), first, last, num_tokens, seed, shuffle);
  return document_order_impl<int32_t>(sizes.data(), first, last, num_tokens, seed, shuffle);
}

// sample_index[i] = (k, o): token i * seq_length of the stream made by concatenating the documents
// doc_order[0], doc_order[1], ... is token o of document doc_order[k] (empty documents are skipped,
// so o < sizes[doc_order[k]]). Sample i is the stream's tokens [i*L, i*L + L], inclusive: it ends
// on the token where sample i + 1 starts, as in Megatron-LM.
template <typename D, typename T>
py::array_t<T> sample_index_impl(const py::array_t<int32_t, py::array::c_style>& sizes,
                                 const py::array_t<D, py::array::c_style>& doc_order,
                                 int64_t seq_length, int64_t num_samples) {
  const int32_t* size = sizes.data();
  const D* order = doc_order.data();
  const int64_t num_sizes = sizes.shape(0);
  const int64_t num_order = doc_order.shape(0);
  py::array_t<T> out({num_samples + 1, static_cast<int64_t>(2)});
  T* dst = out.mutable_data();
  std::string error;
  {
    py::gil_scoped_release release;
    int64_t k = 0;
    int64_t offset = 0;
    for (int64_t i = 0; i <= num_samples && error.empty(); ++i) {
      // Move to the document that holds the token `offset` tokens past the start of order[k].
      while (true) {
        if (k >= num_order) {
          error = "sample_index: the document order holds fewer tokens than sample " +
                  std::to_string(i) + " needs";
          break;
        }
        const int64_t doc = static_cast<int64_t>(order[k]);
        if (doc < 0 || doc >= num_sizes) {
          error = "sample_index: document id " + std::to_string(doc) + " at position " +
                  std::to_string(k) + " is out of range [0, " + std::to_string(num_sizes) + ")";
          break;
        }
        // The sizes are gathered in shuffled order, a cache miss each: ask for one well ahead.
        if (k + kPrefetch < num_order) {
          const int64_t ahead = static_cast<int64_t>(order[k + kPrefetch]);
          if (ahead >= 0 && ahead < num_sizes) __builtin_prefetch(size + ahead);
        }
        if (offset < size[doc]) break;
        offset -= size[doc];
        ++k;
      }
      if (!error.empty()) break;
      dst[2 * i] = static_cast<T>(k);
      dst[2 * i + 1] = static_cast<T>(offset);
      offset += seq_length;
    }
  }
  if (!error.empty()) throw std::invalid_argument(error);
  return out;
}

template <typename D>
py::array sample_index_dispatch(const py::array_t<int32_t, py::array::c_style>& sizes,
                                const py::array_t<D, py::array::c_style>& doc_order, int64_t seq_length,
                                int64_t num_samples, bool use_int64) {
  if (seq_length < 1) throw std::invalid_argument("sample_index: seq_length must be >= 1");
  if (num_samples < 0) throw std::invalid_argument("sample_index: num_samples must be >= 0");
  if (use_int64) return sample_index_impl<D, int64_t>(sizes, doc_order, seq_length, num_samples);
  if (doc_order.shape(0) > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("sample_index: document positions exceed int32; pass use_int64=True");
  }
  return sample_index_impl<D, int32_t>(sizes, doc_order, seq_length, num_samples);
}

// Shuffle the samples of each epoch among themselves: epoch e owns the unshuffled sample ids
// [epoch_starts[e], epoch_starts[e + 1]). The output lists the first num_out entries of the
// concatenated per-epoch permutations; only the last epoch it reaches is cut short, and that one
// costs extra memory of min(what is dropped of it, a hash entry per kept sample), not a full copy.
template <typename T>
py::array_t<T> shuffle_samples_impl(const py::array_t<int64_t, py::array::c_style>& epoch_starts,
                                    int64_t num_out, uint64_t seed, bool shuffle) {
  const int64_t* starts = epoch_starts.data();
  const int64_t num_epochs = epoch_starts.shape(0) - 1;
  py::array_t<T> out(num_out);
  T* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t e = 0; e < num_epochs && starts[e] < num_out; ++e) {
      const int64_t a = starts[e];
      const int64_t n = starts[e + 1] - a;
      const int64_t r = std::min(n, num_out - a);
      SplitMix64 rng(stream_seed(seed, kTagSampleShuffle, static_cast<uint64_t>(e)));
      if (r == n || !shuffle) {  // a whole epoch (or no shuffle): in place
        for (int64_t k = 0; k < r; ++k) dst[a + k] = static_cast<T>(a + k);
        if (shuffle) partial_shuffle(dst + a, n, r, rng);
      } else if (r < n / 16) {  // the head of a cut epoch: only the touched positions are stored
        LazyPermutation perm(a, n, stream_seed(seed, kTagSampleShuffle, static_cast<uint64_t>(e)), true);
        for (int64_t k = 0; k < r; ++k) dst[a + k] = static_cast<T>(perm.next());
      } else {  // most of a cut epoch: positions < r live in the output, the rest in a side buffer
        T* head = dst + a;
        std::vector<T> tail(static_cast<size_t>(n - r));
        for (int64_t k = 0; k < r; ++k) head[k] = static_cast<T>(a + k);
        for (int64_t k = r; k < n; ++k) tail[k - r] = static_cast<T>(a + k);
        auto at = [&](int64_t pos) -> T& { return pos < r ? head[pos] : tail[pos - r]; };
        for (int64_t k = 0; k < r; ++k) {  // r < n, so every step draws, as in partial_shuffle
          const int64_t j = k + static_cast<int64_t>(rng.below(static_cast<uint64_t>(n - k)));
          std::swap(at(k), at(j));
        }
      }
    }
  }
  return out;
}

py::array shuffle_samples(const py::array_t<int64_t, py::array::c_style>& epoch_starts, int64_t num_out,
                          uint64_t seed, bool shuffle, bool use_int64) {
  const int64_t* starts = epoch_starts.data();
  const int64_t m = epoch_starts.shape(0);
  if (epoch_starts.ndim() != 1 || m < 2 || starts[0] != 0) {
    throw std::invalid_argument("shuffle_samples: epoch_starts must be 1-D, start at 0, have >= 2 entries");
  }
  for (int64_t e = 0; e + 1 < m; ++e) {
    if (starts[e + 1] < starts[e]) throw std::invalid_argument("shuffle_samples: epoch_starts must not decrease");
  }
  if (num_out < 0 || num_out > starts[m - 1]) {
    throw std::invalid_argument("shuffle_samples: num_out must be in [0, epoch_starts[-1]]");
  }
  if (use_int64) return shuffle_samples_impl<int64_t>(epoch_starts, num_out, seed, shuffle);
  if (starts[m - 1] > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("shuffle_samples: sample ids exceed int32; pass use_int64=True");
  }
  return shuffle_samples_impl<int32_t>(epoch_starts, num_out, seed, shuffle);
}

// Blending: sample n goes to the dataset whose count lags its target weight * (n + 1) the most
// (ties to the lowest index). Every prefix of n samples then holds within one sample of
// weight * n from each dataset (checked by tests/data/test_blending.py).
py::tuple blending_index(const py::array_t<double, py::array::c_style>& weights, int64_t size) {
  const int64_t k = weights.shape(0);
  if (weights.ndim() != 1 || k < 1 || k > std::numeric_limits<int16_t>::max()) {
    throw std::invalid_argument("blending_index: need 1 to 32767 weights");
  }
  if (size < 0) throw std::invalid_argument("blending_index: size must be >= 0");
  const double* w = weights.data();
  for (int64_t d = 0; d < k; ++d) {
    if (!(w[d] >= 0.0)) throw std::invalid_argument("blending_index: weights must be >= 0");
  }
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  int16_t* di = dataset_index.mutable_data();
  int64_t* dsi = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> count(static_cast<size_t>(k), 0);
    for (int64_t n = 0; n < size; ++n) {
      const double target = static_cast<double>(n + 1);
      int64_t best = 0;
      double best_error = w[0] * target - static_cast<double>(count[0]);
      for (int64_t d = 1; d < k; ++d) {
        const double error = w[d] * target - static_cast<double>(count[d]);
        if (error > best_error) {
          best_error = error;
          best = d;
        }
      }
      di[n] = static_cast<int16_t>(best);
      dsi[n] = count[best]++;
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

PYBIND11_MODULE(sample_index, m) {
  m.doc() = "Index arrays of the GPT dataset: document order, sample index, sample shuffle, blending.";
  m.def("mix64", &splitmix64, "SplitMix64's mixer (exposed so tests can check the Python reference).");
  m.def("stream_seed", &stream_seed, py::arg("seed"), py::arg("tag"), py::arg("epoch"));
  m.def("document_order", &document_order, py::arg("sizes"), py::arg("first"), py::arg("last"),
        py::arg("num_tokens"), py::arg("seed"), py::arg("shuffle") = true, py::arg("use_int64") = false,
        "Per-epoch permutations of the document ids [first, last), until num_tokens tokens.");
  m.def("sample_index", &sample_index_dispatch<int32_t>, py::arg("sizes"), py::arg("doc_order"),
        py::arg("seq_length"), py::arg("num_samples"), py::arg("use_int64") = false);
  m.def("sample_index", &sample_index_dispatch<int64_t>, py::arg("sizes"), py::arg("doc_order"),
        py::arg("seq_length"), py::arg("num_samples"), py::arg("use_int64") = false,
        "(num_samples + 1, 2) array of (document position, offset) where each sample starts.");
  m.def("shuffle_samples", &shuffle_samples, py::arg("epoch_starts"), py::arg("num_out"), py::arg("seed"),
        py::arg("shuffle") = true, py::arg("use_int64") = false,
        "Per-epoch shuffled sample ids, the first num_out of them.");
  m.def("blending_index", &blending_index, py::arg("weights"), py::arg("size"),
        "(dataset_index int16, dataset_sample_index int64) for `size` blended samples.");
}
