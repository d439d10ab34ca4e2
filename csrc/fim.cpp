// Context-level fill-in-the-middle, the fast path (docs/fim.md). Python module megafim._native.fim.
//
// The definition is megafim/data/fim_reference.py: decode each chosen piece, cut its text at two
// character positions, encode prefix, middle and suffix separately. Here nothing is decoded or
// encoded that the cuts cannot change. The tokenizer's pieces never hold a non-space byte followed
// by a space, so its encoding splits at every such "word boundary": tokens between the first and the
// last word boundary inside a part are the original tokens, and only the words next to the part's
// ends are re-encoded. Characters are counted from per-token byte facts computed once.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#if __has_include("bpe.h")
#include "bpe.h"
#define MEGAFIM_HAVE_BPE 1
#endif

namespace py = pybind11;

namespace megafim {
namespace {

// ---------------------------------------------------------------------------------------------
// Counter-based RNG: identical to fim_reference.py (splitmix64 hash chain, then a counter).
// ---------------------------------------------------------------------------------------------
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

inline uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + kGolden;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}
inline uint64_t piece_key(uint64_t seed, uint64_t epoch, uint64_t index, uint64_t piece) {
  uint64_t h = splitmix64(seed);
  h = splitmix64(h ^ epoch);
  h = splitmix64(h ^ index);
  return splitmix64(h ^ piece);
}
inline uint64_t draw(uint64_t key, uint64_t k) { return splitmix64(key + k * kGolden); }
inline double uniform(uint64_t r) { return static_cast<double>(r >> 11) * 0x1.0p-53; }
inline uint64_t below(uint64_t r, uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(r) * n) >> 64);
}
enum Draw : uint64_t { kDrawFim = 0, kDrawSpm = 1, kDrawCutA = 2, kDrawCutB = 3 };
enum Mode : uint8_t { kAr = 0, kPsm = 1, kSpm = 2 };
enum Kind : uint8_t { kText = 0, kMiddle = 1, kSentinel = 2, kPad = 3 };

// ---------------------------------------------------------------------------------------------
// Strict UTF-8 (the same bytes Python's strict decoder accepts).
// ---------------------------------------------------------------------------------------------
struct Utf8Checker {
  int need = 0;            // continuation bytes still expected
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the next continuation byte
  bool ok = true;
  void feed(uint8_t b) {
    if (need > 0) {
      if (b < lo || b > hi) { ok = false; return; }
      lo = 0x80; hi = 0xBF; --need;
      return;
    }
    if (b < 0x80) return;
    if (b >= 0xC2 && b <= 0xDF) { need = 1; return; }
    if (b >= 0xE0 && b <= 0xEF) {
      need = 2;
      if (b == 0xE0) lo = 0xA0;   // no overlong forms
      if (b == 0xED) hi = 0x9F;   // no surrogates
      return;
    }
    if (b >= 0xF0 && b <= 0xF4) {
      need = 3;
      if (b == 0xF0) lo = 0x90;
      if (b == 0xF4) hi = 0x8F;   // nothing above U+10FFFF
      return;
    }
    ok = false;
  }
  bool complete() const { return ok && need == 0; }
};

inline bool is_cont(uint8_t b) { return (b & 0xC0) == 0x80; }
inline int utf8_len(uint8_t lead) {
  if (lead < 0x80) return 1;
  if (lead >= 0xC0 && lead < 0xE0) return 2;
  if (lead >= 0xE0 && lead < 0xF0) return 3;
  if (lead >= 0xF0 && lead < 0xF8) return 4;
  return 0;
}

// Facts about each vocabulary entry, computed once.
struct TokenInfo {
  uint32_t n_bytes = 0;
  uint32_t n_chars = 0;     // bytes that start a character
  int16_t single = -1;      // the byte of a one-byte token, else -1
  bool special = false;     // no bytes: a control token
  bool valid = false;       // its bytes alone are complete, valid UTF-8
  bool first_space = false, last_space = false;
};

using Encoder = std::function<void(std::string_view, std::vector<int32_t>&)>;

struct Specials {
  int32_t eod, prefix, middle, suffix, pad;
};

struct Output {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> kinds;
  std::vector<uint8_t> modes;
  void push(int32_t t, uint8_t k) { tokens.push_back(t); kinds.push_back(k); }
  void push_range(const int32_t* b, const int32_t* e, uint8_t k) {
    tokens.insert(tokens.end(), b, e);
    kinds.insert(kinds.end(), e - b, k);
  }
};

class Fim {
 public:
  Fim(std::vector<std::string> token_bytes, Specials sp, Encoder enc)
      : bytes_(std::move(token_bytes)), sp_(sp), encode_(std::move(enc)) {
    info_.resize(bytes_.size());
    for (size_t t = 0; t < bytes_.size(); ++t) {
      const std::string& b = bytes_[t];
      TokenInfo& in = info_[t];
      in.n_bytes = static_cast<uint32_t>(b.size());
      in.special = b.empty();
      Utf8Checker c;
      for (unsigned char x : b) {
        in.n_chars += !is_cont(x);
        c.feed(x);
      }
      in.valid = !b.empty() && c.complete();
      if (b.size() == 1) in.single = static_cast<uint8_t>(b[0]);
      if (!b.empty()) {
        in.first_space = b.front() == ' ';
        in.last_space = b.back() == ' ';
      }
    }
    for (int32_t id : {sp.eod, sp.prefix, sp.middle, sp.suffix, sp.pad})
      if (id < 0 || static_cast<size_t>(id) >= bytes_.size())
        throw std::invalid_argument("FIM special token id " + std::to_string(id) + " is outside the vocabulary");
  }

  // The whole context: split on end-of-text, transform pieces, join, cut or pad to length.
  Output transform(const int32_t* ctx, size_t n, uint64_t seed, uint64_t epoch, uint64_t index, double rate,
                   double spm_rate, bool keep_length) const {
    for (size_t i = 0; i < n; ++i)
      if (ctx[i] < 0 || static_cast<size_t>(ctx[i]) >= bytes_.size())
        throw std::invalid_argument("token id " + std::to_string(ctx[i]) + " at position " + std::to_string(i) +
                                    " is outside the vocabulary of " + std::to_string(bytes_.size()));
    Output out;
    out.tokens.reserve(n + 64);
    out.kinds.reserve(n + 64);
    size_t start = 0;
    for (uint64_t p = 0;; ++p) {
      size_t end = start;
      while (end < n && ctx[end] != sp_.eod) ++end;
      if (p > 0) out.push(sp_.eod, kText);
      out.modes.push_back(piece(ctx + start, end - start, piece_key(seed, epoch, index, p), rate, spm_rate,
                                keep_length, out));
      if (end == n) break;
      start = end + 1;
    }
    out.tokens.resize(n, sp_.pad);  // cut the tail off, or pad it
    out.kinds.resize(n, kPad);
    return out;
  }

 private:
  std::vector<std::string> bytes_;
  std::vector<TokenInfo> info_;
  Specials sp_;
  Encoder encode_;

  int single(int32_t t) const { return info_[t].single; }

  // Leading / trailing tokens that hold part of a character cut by the context edge (split_edges).
  void edges(const int32_t* tok, size_t n, size_t& lead, size_t& trail) const {
    lead = 0;
    while (lead < n && single(tok[lead]) >= 0 && is_cont(single(tok[lead]))) ++lead;
    size_t j = n;
    int conts = 0;
    while (conts < 3 && j > lead && single(tok[j - 1]) >= 0 && is_cont(single(tok[j - 1]))) {
      --j;
      ++conts;
    }
    trail = 0;
    if (j > lead && single(tok[j - 1]) >= 0 && utf8_len(single(tok[j - 1])) > conts + 1) trail = conts + 1;
  }

  // Number of characters of the core, or -1 when it cannot take part in FIM (piece_text is None).
  int64_t count_chars(const int32_t* tok, size_t m) const {
    Utf8Checker c;
    int64_t chars = 0;
    for (size_t i = 0; i < m; ++i) {
      const TokenInfo& in = info_[tok[i]];
      if (in.special) return -1;
      if (in.valid && c.need == 0) {
        chars += in.n_chars;
        continue;
      }
      for (unsigned char x : bytes_[tok[i]]) c.feed(x);
      if (!c.ok) return -1;
      chars += in.n_chars;
    }
    return c.complete() ? chars : -1;
  }

  uint8_t piece(const int32_t* tok, size_t n, uint64_t key, double rate, double spm_rate, bool keep_length,
                Output& out) const;
  void encode_part(const int32_t* core, const std::vector<uint64_t>& start, uint64_t s, uint64_t e,
                   std::vector<int32_t>& dst) const;
};

// The core's text [s, e) encoded on its own (byte offsets; start[i] is token i's first byte).
void Fim::encode_part(const int32_t* core, const std::vector<uint64_t>& start, uint64_t s, uint64_t e,
                      std::vector<int32_t>& dst) const {
  if (s >= e) return;
  const size_t m = start.size() - 1;
  // Token holding byte s, and the first token starting after s.
  size_t ts = std::upper_bound(start.begin(), start.end(), s) - start.begin() - 1;
  auto is_word_start = [&](size_t j) { return info_[core[j]].first_space && !info_[core[j - 1]].last_space; };
  size_t w1 = ts + 1;
  while (w1 < m && start[w1] < e && !is_word_start(w1)) ++w1;
  std::string text;
  auto append = [&](uint64_t from, uint64_t to) {  // bytes [from, to) of the core
    size_t t = std::upper_bound(start.begin(), start.end(), from) - start.begin() - 1;
    for (; t < m && start[t] < to; ++t) {
      uint64_t a = std::max(from, start[t]), b = std::min(to, start[t + 1]);
      text.append(bytes_[core[t]], a - start[t], b - a);
    }
  };
  if (w1 >= m || start[w1] >= e) {  // no word boundary inside: encode it all
    append(s, e);
    encode_(text, dst);
    return;
  }
  size_t w2 = std::upper_bound(start.begin(), start.end(), e - 1) - start.begin() - 1;  // token holding e-1
  while (w2 > w1 && !(start[w2] < e && is_word_start(w2))) --w2;
  append(s, start[w1]);
  encode_(text, dst);
  dst.insert(dst.end(), core + w1, core + w2);
  text.clear();
  append(start[w2], e);
  encode_(text, dst);
}

uint8_t Fim::piece(const int32_t* tok, size_t n, uint64_t key, double rate, double spm_rate, bool keep_length,
                   Output& out) const {
  auto unchanged = [&]() {
    out.push_range(tok, tok + n, kText);
    return kAr;
  };
  if (!(uniform(draw(key, kDrawFim)) < rate)) return unchanged();
  size_t lead, trail;
  edges(tok, n, lead, trail);
  const int32_t* core = tok + lead;
  const size_t m = n - lead - trail;
  const int64_t n_chars = count_chars(core, m);
  if (n_chars <= 0) return unchanged();
  const uint8_t mode = uniform(draw(key, kDrawSpm)) < spm_rate ? kSpm : kPsm;
  uint64_t a = below(draw(key, kDrawCutA), n_chars + 1), b = below(draw(key, kDrawCutB), n_chars + 1);
  if (a > b) std::swap(a, b);

  std::vector<uint64_t> start(m + 1, 0), chars(m + 1, 0);
  for (size_t i = 0; i < m; ++i) {
    start[i + 1] = start[i] + info_[core[i]].n_bytes;
    chars[i + 1] = chars[i] + info_[core[i]].n_chars;
  }
  auto byte_of_char = [&](uint64_t c) -> uint64_t {
    if (c >= static_cast<uint64_t>(n_chars)) return start[m];
    size_t t = std::upper_bound(chars.begin(), chars.end(), c) - chars.begin() - 1;
    uint64_t k = c - chars[t], off = 0;
    const std::string& b = bytes_[core[t]];
    while (true) {
      if (!is_cont(static_cast<uint8_t>(b[off])) && k-- == 0) break;
      ++off;
    }
    return start[t] + off;
  };
  const uint64_t A = byte_of_char(a), B = byte_of_char(b);
  thread_local std::vector<int32_t> prefix, middle, suffix;
  prefix.clear();
  middle.clear();
  suffix.clear();
  encode_part(core, start, 0, A, prefix);
  encode_part(core, start, A, B, middle);
  encode_part(core, start, B, start[m], suffix);
  suffix.insert(suffix.end(), tok + n - trail, tok + n);
  int64_t pad = 0;
  if (keep_length) {
    const int64_t excess = static_cast<int64_t>(lead + 3 + prefix.size() + middle.size() + suffix.size()) -
                           static_cast<int64_t>(n);
    if (excess > static_cast<int64_t>(suffix.size())) return unchanged();
    if (excess > 0) suffix.resize(suffix.size() - excess);
    pad = excess < 0 ? -excess : 0;
  }
  auto put_suffix = [&]() {
    out.push_range(suffix.data(), suffix.data() + suffix.size(), kText);
    for (int64_t i = 0; i < pad; ++i) out.push(sp_.pad, kPad);
  };
  out.push_range(tok, tok + lead, kText);
  out.push(sp_.prefix, kSentinel);
  if (mode == kPsm) {
    out.push_range(prefix.data(), prefix.data() + prefix.size(), kText);
    out.push(sp_.suffix, kSentinel);
    put_suffix();
    out.push(sp_.middle, kSentinel);
  } else {
    out.push(sp_.suffix, kSentinel);
    put_suffix();
    out.push(sp_.middle, kSentinel);
    out.push_range(prefix.data(), prefix.data() + prefix.size(), kText);
  }
  out.push_range(middle.data(), middle.data() + middle.size(), kMiddle);
  return mode;
}

// ---------------------------------------------------------------------------------------------
// Python bindings
// ---------------------------------------------------------------------------------------------
struct PyFim {
  std::unique_ptr<Fim> fim;
  bool releases_gil = false;  // a native encoder needs no Python: transform runs without the GIL
};

std::vector<std::string> to_strings(const py::list& token_bytes) {
  std::vector<std::string> v;
  v.reserve(token_bytes.size());
  for (const py::handle& b : token_bytes) v.push_back(b.cast<std::string>());
  return v;
}

py::tuple run(const PyFim& self, py::array_t<int32_t, py::array::c_style | py::array::forcecast> context,
              uint64_t seed, uint64_t epoch, uint64_t index, double rate, double spm_rate, bool keep_length,
              bool mask_sentinels) {
  if (context.ndim() != 1) throw std::invalid_argument("FIM context must be a 1-D token array");
  const int32_t* ctx = context.data();
  const size_t n = context.shape(0);
  Output out;
  if (self.releases_gil) {
    py::gil_scoped_release nogil;
    out = self.fim->transform(ctx, n, seed, epoch, index, rate, spm_rate, keep_length);
  } else {
    out = self.fim->transform(ctx, n, seed, epoch, index, rate, spm_rate, keep_length);
  }
  py::array_t<int32_t> tokens(n);
  py::array_t<float> loss(n);
  py::array_t<bool> middle(n);
  py::array_t<uint8_t> modes(out.modes.size());
  std::copy(out.tokens.begin(), out.tokens.end(), tokens.mutable_data());
  float* l = loss.mutable_data();
  bool* mid = middle.mutable_data();
  for (size_t i = 0; i < n; ++i) {
    const uint8_t k = out.kinds[i];
    l[i] = (k == kPad || (mask_sentinels && k == kSentinel)) ? 0.0f : 1.0f;
    mid[i] = k == kMiddle;
  }
  std::copy(out.modes.begin(), out.modes.end(), modes.mutable_data());
  return py::make_tuple(tokens, loss, middle, modes);
}

}  // namespace
}  // namespace megafim

PYBIND11_MODULE(fim, m) {
  using namespace megafim;
  m.doc() = "Context-level fill-in-the-middle, the fast path of megafim.data.fim (docs/fim.md).";
  py::class_<PyFim>(m, "Fim")
      .def_static(
          "with_callable",
          [](const py::list& token_bytes, int32_t eod, int32_t pre, int32_t mid, int32_t suf, int32_t pad,
             py::function encode) {
            // For tests and tokenizers without a native encoder: encode(str) -> list[int].
            Encoder enc = [encode](std::string_view text, std::vector<int32_t>& dst) {
              py::str s(text.data(), text.size());
              for (const py::handle& t : encode(s)) dst.push_back(t.cast<int32_t>());
            };
            PyFim f;
            f.fim = std::make_unique<Fim>(to_strings(token_bytes), Specials{eod, pre, mid, suf, pad}, enc);
            return f;
          },
          py::arg("token_bytes"), py::arg("eod"), py::arg("fim_prefix"), py::arg("fim_middle"),
          py::arg("fim_suffix"), py::arg("fim_pad"), py::arg("encode"))
#ifdef MEGAFIM_HAVE_BPE
      .def_static(
          "with_model_spec",
          [](const py::list& token_bytes, int32_t eod, int32_t pre, int32_t mid, int32_t suf, int32_t pad,
             const py::list& pieces, std::vector<float> scores, std::vector<int> types) {
            // The tokenizer's own C++ encoder (csrc/bpe.h): exact sentencepiece ids, thread-safe.
            BpeModelSpec spec{to_strings(pieces), std::move(scores), std::move(types)};
            auto bpe = std::make_shared<const BpeEncoder>(std::move(spec));
            Encoder enc = [bpe](std::string_view text, std::vector<int32_t>& dst) { bpe->encode(text, dst); };
            PyFim f;
            f.fim = std::make_unique<Fim>(to_strings(token_bytes), Specials{eod, pre, mid, suf, pad}, enc);
            f.releases_gil = true;
            return f;
          },
          py::arg("token_bytes"), py::arg("eod"), py::arg("fim_prefix"), py::arg("fim_middle"),
          py::arg("fim_suffix"), py::arg("fim_pad"), py::arg("pieces"), py::arg("scores"), py::arg("types"))
#endif
      .def("transform", &run, py::arg("context"), py::arg("seed"), py::arg("epoch"), py::arg("index"),
           py::arg("rate"), py::arg("spm_rate"), py::arg("keep_length"), py::arg("mask_sentinels"),
           "-> (tokens int32, loss_mask float32, middle_mask bool, modes uint8: 0 ar, 1 psm, 2 spm)");
  m.attr("has_native_encoder") = py::bool_(
#ifdef MEGAFIM_HAVE_BPE
      true
#else
      false
#endif
  );
}
