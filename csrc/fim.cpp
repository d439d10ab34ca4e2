// Context-level fill-in-the-middle, the fast path (docs/fim.md). Python module megafim._native.fim.
//
// The definition is megafim/data/fim_reference.py: decode each chosen piece, cut its text at two
// character positions, encode prefix, middle and suffix separately. Here nothing is decoded or
// encoded that the cuts cannot change. The tokenizer's pieces never hold a non-space byte followed
// by a space, so its encoding splits at every such "word boundary" (and the C++ encoder at every pair
// of ASCII bytes that no piece holds side by side): tokens between the first and the last boundary
// inside a part are the original tokens, and only the text next to the part's ends is re-encoded.
// Characters are counted from per-token byte facts computed once. Which token boundaries no merge
// crosses depends on the tokenizer (BoundaryRule): a Hugging Face byte-level BPE tokenizer only
// guarantees them after an ASCII non-whitespace byte, as its pre-tokenizer regex keeps "\n " together.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "byte_bpe_py.h"

#if __has_include("bpe.h")
#include "bpe.h"
#include "splitmix64.h"
#define MEGAFIM_HAVE_BPE 1
#endif

namespace py = pybind11;

namespace megafim {
namespace {

// ---------------------------------------------------------------------------------------------
// Counter-based RNG: identical to fim_reference.py (splitmix64 hash chain, then a counter).
// ---------------------------------------------------------------------------------------------
using megafim::kGolden;
using megafim::splitmix64;

inline uint64_t piece_key(uint64_t seed, uint64_t epoch, uint64_t index, uint64_t piece) {
  uint64_t h = splitmix64(seed);
  h = splitmix64(h ^ epoch);
  h = splitmix64(h ^ index);
  return splitmix64(h ^ piece);
}
// File f of a piece split on the split token (fim_reference.file_key): the first keeps the piece's key.
inline uint64_t file_key(uint64_t key, uint64_t file) { return file == 0 ? key : splitmix64(key ^ file); }
inline uint64_t draw(uint64_t key, uint64_t k) { return splitmix64(key + k * kGolden); }
inline double uniform(uint64_t r) { return static_cast<double>(r >> 11) * 0x1.0p-53; }
inline uint64_t below(uint64_t r, uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(r) * n) >> 64);
}
enum Draw : uint64_t { kDrawFim = 0, kDrawSpm = 1, kDrawCutA = 2, kDrawCutB = 3 };
enum Mode : uint8_t { kAr = 0, kPsm = 1, kSpm = 2 };
enum Kind : uint8_t { kText = 0, kMiddle = 1, kSentinel = 2, kPad = 3 };
// Where encoding a text equals encoding its two sides (megafim/data/tokenizer_hf.py BOUNDARY_*):
// nowhere known (whole parts are re-encoded), before a space that follows a non-space (megafim's
// sentencepiece models), before a space that follows an ASCII non-whitespace byte (byte-level BPE
// with the GPT-2 / Llama 3 / Qwen2 pre-tokenizer regexes).
// Rule 3 (the Llama 3 / Qwen2 regexes) adds: after a newline, when the whitespace that follows it
// holds no other newline and ends at an ASCII non-whitespace byte (`\s*[\r\n]+` ends a pre-token at
// the run's last newline, and no other alternative holds a newline followed by anything else).
enum BoundaryRule : int {
  kNoBoundary = 0, kSpaceAfterNonSpace = 1, kSpaceAfterAsciiNonWhitespace = 2, kAlsoAfterNewline = 3
};
// How a token can continue the whitespace after a newline (rule 3): only spaces, tabs, \v, \f (the
// run goes on); such bytes and then an ASCII non-whitespace byte (the run ends: a boundary); else not.
enum LineClass : uint8_t { kLineWs = 0, kLineStart = 1, kLineNo = 2 };

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

// Facts about each vocabulary entry, computed once. 8 bytes: the boundary tests and the cuts look up
// a few hundred tokens per context, spread over the vocabulary, so the fewer cache lines they touch
// the better (a data loader shares its core's caches with the other work on it).
struct TokenInfo {
  uint16_t n_chars;         // bytes that start a character (a longer token is refused)
  int16_t single;           // the byte of a one-byte token, else -1
  uint8_t first, last;      // its first / last byte when ASCII, else 0xFF
  uint8_t line : 2;         // LineClass
  bool special : 1;         // no bytes: a control token
  bool valid : 1;           // its bytes alone are complete, valid UTF-8
  bool first_space : 1, last_space : 1;
};
static_assert(sizeof(TokenInfo) == 8, "TokenInfo: one 8-byte entry per token");

inline uint8_t line_class(const std::string& b) {
  for (unsigned char x : b) {
    if (x == ' ' || x == '\t' || x == '\v' || x == '\f') continue;
    return x < 0x80 && x != '\n' && x != '\r' ? kLineStart : kLineNo;
  }
  return b.empty() ? kLineNo : kLineWs;
}

// Per token, for the one pass over a piece that counts its characters: the character count in the
// low 7 bits, kSlow when the token needs the byte-by-byte UTF-8 check (byte-fallback, special) or
// holds 128 characters or more. One byte per token keeps the table in L1 (8 KiB for 8000 tokens).
constexpr uint8_t kSlow = 0x80;

// Per token, what the boundary rules 2 and 3 look at, in one byte (a table as small as the one
// above, which every context reads whole, so the few dozen look-ups next to each cut stay in cache):
// starts with a space; ends with an ASCII non-whitespace byte; ends with \n or \r; LineClass << 3.
enum BoundaryBits : uint8_t { kFirstSpace = 1, kLastAsciiNonWs = 2, kLastNewline = 4, kLineShift = 3 };

using EncodeFn = std::function<void(std::string_view, std::vector<int32_t>&)>;
// Encodes texts[i] into *dst[i], all in one call.
using BatchFn = std::function<void(const std::vector<std::string>&, const std::vector<std::vector<int32_t>*>&)>;

// How the re-encoded texts are encoded: the tokenizer's C++ encoder, or a callable (Python), or a
// batch callable that takes a whole piece's texts at once (one call into Python per FIM piece
// instead of up to six: the per-call cost of a Python tokenizer dominates these short texts). A
// byte-level BPE tokenizer's ASCII texts are encoded in C++ (byte_bpe), the others by the callables.
struct Encoder {
  EncodeFn fn;
  BatchFn batch;
  std::shared_ptr<const ByteBpe> byte_bpe;
#ifdef MEGAFIM_HAVE_BPE
  std::shared_ptr<const BpeEncoder> bpe;
#endif
};

// Encodes the few short texts of one context. The C++ encoder's workspace is borrowed at the first
// text and kept to the last (one pool lock per context, not two per text).
class ContextEncoder {
 public:
  explicit ContextEncoder(const Encoder& e) : e_(e) {}
  // `known`: the whole original tokens the text was cut from (for the byte-level encoder), or null.
  void operator()(std::string_view text, std::vector<int32_t>& dst,
                  const std::vector<KnownToken>* known = nullptr) {
    if (e_.byte_bpe) {
      if (!byte_ws_) byte_ws_ = &ByteBpe::workspace();
      if (e_.byte_bpe->encode(text, dst, *byte_ws_, known)) return;
    }
    if (e_.batch) {  // deferred to flush()
      texts_.emplace_back(text);
      dsts_.push_back(&dst);
      return;
    }
#ifdef MEGAFIM_HAVE_BPE
    if (e_.bpe) {
      if (!session_) session_.emplace(*e_.bpe);
      session_->encode(text, dst);
      return;
    }
#endif
    e_.fn(text, dst);
  }
  // Encodes what was deferred; the destinations must still be alive (the piece's Parts).
  void flush() {
    if (texts_.empty()) return;
    e_.batch(texts_, dsts_);
    texts_.clear();
    dsts_.clear();
  }

 private:
  const Encoder& e_;
  std::vector<std::string> texts_;
  std::vector<std::vector<int32_t>*> dsts_;
  ByteBpe::Workspace* byte_ws_ = nullptr;
#ifdef MEGAFIM_HAVE_BPE
  std::optional<BpeEncoder::Session> session_;
#endif
};

struct Specials {
  int32_t eod, prefix, middle, suffix, pad;
};

// The context's three output arrays, written once, left to right. What goes past their end is cut
// off (the context's tail), and what they lack at the end is padding.
struct Output {
  int64_t* tokens;
  float* loss;
  bool* middle;
  size_t n, pos = 0;
  float weight[4];  // loss weight by Kind
  std::vector<uint8_t> modes;
  bool keep_modes = true;  // false: the caller does not want them (no allocation per context)

  void mode(uint8_t m) {
    if (keep_modes) modes.push_back(m);
  }

  Output(int64_t* t, float* l, bool* m, size_t size, bool mask_sentinels)
      : tokens(t), loss(l), middle(m), n(size), weight{1.0f, 1.0f, mask_sentinels ? 0.0f : 1.0f, 0.0f} {}
  bool full() const { return pos >= n; }
  void push(int64_t t, uint8_t k) {
    if (pos < n) put(pos++, t, k);
  }
  template <typename T>
  void push_range(const T* b, const T* e, uint8_t k) {
    const size_t count = std::min<size_t>(e - b, n - std::min(pos, n));
    std::copy(b, b + count, tokens + pos);
    std::fill(loss + pos, loss + pos + count, weight[k]);
    std::fill(middle + pos, middle + pos + count, k == kMiddle);
    pos += count;
  }
  void pad_to_end(int64_t pad_id) {
    for (; pos < n; ++pos) put(pos, pad_id, kPad);
  }

 private:
  void put(size_t i, int64_t t, uint8_t k) {
    tokens[i] = t;
    loss[i] = weight[k];
    middle[i] = k == kMiddle;
  }
};

// One of a FIM piece's three parts as it is written out: re-encoded words, the original tokens
// core[from, to) between them (most of the part: pointed to, not copied), re-encoded words.
struct Part {
  std::vector<int32_t> head, tail;
  size_t from = 0, to = 0;

  void clear() {
    head.clear();
    tail.clear();
    from = to = 0;
  }
  size_t size() const { return head.size() + (to - from) + tail.size(); }
  void keep_first(size_t k) {  // drop all but the first k tokens
    if (k <= head.size()) {
      head.resize(k);
      to = from;
      tail.clear();
    } else if (k - head.size() <= to - from) {
      to = from + (k - head.size());
      tail.clear();
    } else {
      tail.resize(k - head.size() - (to - from));
    }
  }
};

// A position in a piece's core text: byte `off` of token `tok` (tok == m, off == 0: the end).
struct Pos {
  size_t tok;
  uint32_t off;
  bool operator==(const Pos& o) const { return tok == o.tok && off == o.off; }
};

class Fim {
 public:
  Fim(std::vector<std::string> token_bytes, Specials sp, Encoder enc, int rule = kSpaceAfterNonSpace)
      : bytes_(std::move(token_bytes)), sp_(sp), encode_(std::move(enc)), rule_(rule) {
    if (rule < kNoBoundary || rule > kAlsoAfterNewline)
      throw std::invalid_argument("FIM boundary rule " + std::to_string(rule) + " is not 0, 1, 2 or 3");
    info_.resize(bytes_.size());
    packed_.resize(bytes_.size());
    bits_.resize(bytes_.size());
    for (size_t t = 0; t < bytes_.size(); ++t) {
      const std::string& b = bytes_[t];
      if (b.size() > std::numeric_limits<uint16_t>::max())
        throw std::invalid_argument("token " + std::to_string(t) + " has more than 65535 bytes");
      TokenInfo& in = info_[t];
      in = TokenInfo{0, -1, 0xFF, 0xFF, kLineNo, b.empty(), false, false, false};
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
        if (static_cast<unsigned char>(b.front()) < 128) in.first = static_cast<uint8_t>(b.front());
        if (static_cast<unsigned char>(b.back()) < 128) in.last = static_cast<uint8_t>(b.back());
      }
      in.line = line_class(b) & 3;
      packed_[t] = in.valid && in.n_chars < kSlow ? static_cast<uint8_t>(in.n_chars) : kSlow;
      const bool ascii_non_ws = in.last < 0x80 && in.last != ' ' && !(in.last >= '\t' && in.last <= '\r');
      bits_[t] = static_cast<uint8_t>((in.first_space ? kFirstSpace : 0) |
                                      (ascii_non_ws ? kLastAsciiNonWs : 0) |
                                      (in.last == '\n' || in.last == '\r' ? kLastNewline : 0) |
                                      (in.line << kLineShift));
    }
    for (int32_t id : {sp.eod, sp.prefix, sp.middle, sp.suffix, sp.pad})
      if (id < 0 || static_cast<size_t>(id) >= bytes_.size())
        throw std::invalid_argument("FIM special token id " + std::to_string(id) + " is outside the vocabulary");
    known_tokens_ = encode_.byte_bpe && same_model_bytes(*encode_.byte_bpe);
  }

  size_t vocab_size() const { return bytes_.size(); }

  // The whole context: split on end-of-text, transform pieces, join, cut or pad to length. T is the
  // context's integer type (ids are checked against the vocabulary on the way). `split` >= 0: each
  // piece is split again on that id and its files are transformed one by one (files()).
  template <typename T>
  void transform(const T* ctx, size_t n, uint64_t seed, uint64_t epoch, uint64_t index, double rate,
                 double spm_rate, bool keep_length, int64_t split, Output& out) const {
    thread_local std::vector<size_t> eods;
    if (!scan(ctx, n, eods)) throw_bad_id(ctx, n);
    eods.push_back(n);
    ContextEncoder encode(encode_);
    size_t start = 0;
    for (uint64_t p = 0;; ++p) {
      const size_t end = eods[p];
      if (p > 0) out.push(sp_.eod, kText);
      const uint64_t key = piece_key(seed, epoch, index, p);
      // A split id that T cannot hold (uint16 contexts, a vocabulary above 65535) is in no piece: each
      // piece is then its only file, which piece() transforms with the same key.
      if (split >= 0 && static_cast<uint64_t>(split) <= static_cast<uint64_t>(std::numeric_limits<T>::max()))
        files(ctx + start, end - start, p > 0, end < n, key, rate, spm_rate, keep_length, static_cast<T>(split),
              encode, out);
      else
        out.mode(piece(ctx + start, end - start, p > 0, end < n, key, rate, spm_rate, keep_length, encode,
                       out));
      if (end == n) break;
      start = end + 1;
    }
    out.pad_to_end(sp_.pad);  // the tail past n was cut off already
  }

  // The j in [1, n) where the boundary rule lets encoding split the text of tokens[0, n) (for tests
  // against the tokenizer's own pre-tokenizer).
  std::vector<size_t> boundaries(const std::vector<int64_t>& tokens) const {
    for (int64_t t : tokens)
      if (t < 0 || static_cast<size_t>(t) >= bytes_.size()) throw std::invalid_argument("token id outside the vocabulary");
    std::vector<size_t> out;
    for (size_t j = 1; j < tokens.size(); ++j)
      if (boundary(tokens.data(), tokens.size(), j)) out.push_back(j);
    return out;
  }

 private:
  std::vector<std::string> bytes_;
  std::vector<TokenInfo> info_;
  std::vector<uint8_t> packed_;
  std::vector<uint8_t> bits_;  // BoundaryBits
  Specials sp_;
  Encoder encode_;
  int rule_;
  // Whether the byte-level encoder is told which original tokens a re-encoded text holds whole
  // (ByteBpe::encode's `known`): only when every token with bytes here that the model has an entry
  // for has the same bytes there (special tokens have none here and are never in a re-encoded text).
  bool known_tokens_ = false;

  bool same_model_bytes(const ByteBpe& enc) const {
    for (size_t id = 0; id < bytes_.size(); ++id) {
      const int32_t i = static_cast<int32_t>(id);
      if (!bytes_[id].empty() && enc.entry_size(i) > 0 && !enc.entry_is(i, bytes_[id])) return false;
    }
    return true;
  }

  // One pass over the context: the positions of its end-of-text tokens (into `eods`), and whether every
  // id is < the vocabulary size (negative ones wrap around). Compared in T's own width, unsigned, in
  // blocks, so that the loop vectorizes (for the uint16/int32 contexts datasets store; 64-bit lanes
  // need SSE4.2); a block is looked at again only when it holds an end-of-text.
  template <typename T>
  bool scan(const T* ctx, size_t n, std::vector<size_t>& eods) const {
    using U = std::make_unsigned_t<T>;
    const U* u = reinterpret_cast<const U*>(ctx);
    const U eod = static_cast<U>(sp_.eod);
    // With a vocabulary larger than U can count (uint16, >= 65536 ids) every id is in it.
    const U vocab = static_cast<U>(std::min<size_t>(bytes_.size() - 1, std::numeric_limits<U>::max()));
    eods.clear();
    U bad = 0;
    constexpr size_t kBlock = 64;
    for (size_t b = 0; b < n; b += kBlock) {
      const size_t e = std::min(n, b + kBlock);
      U hit = 0;
      for (size_t i = b; i < e; ++i) {
        bad |= static_cast<U>(u[i] > vocab);
        hit |= static_cast<U>(u[i] == eod);
      }
      if (hit)
        for (size_t i = b; i < e; ++i)
          if (u[i] == eod) eods.push_back(i);
    }
    return bad == 0;
  }

  template <typename T>
  [[noreturn]] void throw_bad_id(const T* p, size_t n) const {
    size_t i = 0;
    while (i < n && static_cast<uint64_t>(p[i]) < bytes_.size()) ++i;
    throw std::invalid_argument("token id " + std::to_string(static_cast<int64_t>(p[i])) + " at position " +
                                std::to_string(i) + " is outside the vocabulary of " + std::to_string(bytes_.size()));
  }

  int single(int64_t t) const { return info_[t].single; }
  // Whether no merge crosses from token j - 1 to token j: a space after a non-space (a word start, for
  // any tokenizer here), or with the C++ encoder any pair of ASCII bytes it cuts its input between
  // (it encodes the text between them on its own, so the tokens there are unchanged).
  // Rule 3 looks at the tokens after j up to the end of the core m (at most kLineScan of them): what
  // follows the core is not known, so a run that reaches its end is no boundary.
  static constexpr size_t kLineScan = 16;
  template <typename T>
  bool boundary(const T* core, size_t m, size_t j) const {
    if (rule_ == kNoBoundary) return false;
    if (rule_ >= kSpaceAfterAsciiNonWhitespace) {  // \t..\r and ' ' are \s
      const uint8_t a = bits_[core[j - 1]], b = bits_[core[j]];
      if ((b & kFirstSpace) && (a & kLastAsciiNonWs)) return true;
      if (rule_ != kAlsoAfterNewline || !(a & kLastNewline)) return false;
      for (size_t t = j; t < m && t < j + kLineScan; ++t) {
        const int line = bits_[core[t]] >> kLineShift;
        if (line != kLineWs) return line == kLineStart;
      }
      return false;
    }
    const TokenInfo& a = info_[core[j - 1]];
    const TokenInfo& b = info_[core[j]];
    if (b.first_space && !a.last_space) return true;
#ifdef MEGAFIM_HAVE_BPE
    if (encode_.bpe && encode_.bpe->splits_words()) return encode_.bpe->is_boundary(a.last, b.first);
#endif
    return false;
  }

  // Leading / trailing tokens that hold part of a character cut by the context edge (split_edges).
  template <typename T>
  void edges(const T* tok, size_t n, size_t& lead, size_t& trail) const {
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
  // blocks[k]: characters before token min(k * kCharBlock, m), k = 0..ceil(m / kCharBlock), for
  // locate. Sums per block rather than per token: no store per token and a short dependency chain.
  static constexpr size_t kCharBlock = 32;
  template <typename T>
  int64_t count_chars(const T* tok, size_t m, std::vector<uint64_t>& blocks) const {
    const size_t n_blocks = (m + kCharBlock - 1) / kCharBlock;
    blocks.resize(n_blocks + 1);
    thread_local std::vector<uint8_t> slow;  // per block: holds a kSlow token
    slow.resize(n_blocks);
    uint64_t chars = 0;
    uint32_t any_slow = 0;
    for (size_t k = 0; k < n_blocks; ++k) {  // the common case: only whole, valid characters
      blocks[k] = chars;
      const size_t e = std::min(m, (k + 1) * kCharBlock);
      uint32_t sum = 0, flags = 0;  // sum is exact while no kSlow bit is seen (else recounted below)
#pragma GCC unroll 8
      for (size_t i = k * kCharBlock; i < e; ++i) {
        const uint32_t v = packed_[tok[i]];
        sum += v;
        flags |= v;
      }
      slow[k] = (flags & kSlow) != 0;
      any_slow |= flags;
      chars += sum;
    }
    blocks[n_blocks] = chars;
    if (!(any_slow & kSlow)) return static_cast<int64_t>(chars);
    // Only the blocks holding a kSlow token are checked byte by byte. A block without one holds
    // whole valid characters only: its count stands, and a character left open before it is broken.
    Utf8Checker c;
    uint64_t old_start = blocks[0];
    chars = 0;
    for (size_t k = 0; k < n_blocks; ++k) {
      const uint64_t old_end = blocks[k + 1];
      blocks[k] = chars;
      if (!slow[k]) {
        if (c.need) return -1;
        chars += old_end - old_start;
        old_start = old_end;
        continue;
      }
      old_start = old_end;
      for (size_t i = k * kCharBlock, e = std::min(m, (k + 1) * kCharBlock); i < e; ++i) {
        const TokenInfo& in = info_[tok[i]];
        chars += in.n_chars;
        if (in.special) return -1;
        if (in.valid && c.need == 0) continue;
        for (unsigned char x : bytes_[tok[i]]) c.feed(x);
        if (!c.ok) return -1;
      }
    }
    blocks[n_blocks] = chars;
    return c.complete() ? static_cast<int64_t>(chars) : -1;
  }

  // Where character c starts: in the first token that ends after it (blocks from count_chars).
  template <typename T>
  Pos locate(const T* core, size_t m, uint64_t c, const std::vector<uint64_t>& blocks) const {
    const size_t k = std::upper_bound(blocks.begin() + 1, blocks.end(), c) - (blocks.begin() + 1);
    if (k + 1 == blocks.size()) return Pos{m, 0};  // c is the character count: the end
    size_t t = k * kCharBlock;  // the block that ends after c: the token is in it
    uint64_t seen = blocks[k];
    // packed_ (read whole by count_chars, so in cache) has the count unless the token is kSlow.
    auto chars_of = [&](size_t i) -> uint64_t {
      const uint8_t v = packed_[core[i]];
      return v & kSlow ? info_[core[i]].n_chars : v;
    };
    while (seen + chars_of(t) <= c) seen += chars_of(t++);
    const std::string& b = bytes_[core[t]];
    uint32_t off = 0;
    for (uint64_t left = c - seen;; ++off)
      if (!is_cont(static_cast<uint8_t>(b[off])) && left-- == 0) break;
    return Pos{t, off};
  }

  // Appends the core's text [from, to) to `text`; with `known`, lists there the tokens appended whole.
  template <typename T>
  void append_text(const T* core, Pos from, Pos to, std::string& text, std::vector<KnownToken>* known) const {
    if (known) known->clear();
    for (size_t t = from.tok; t <= to.tok; ++t) {
      if (t == to.tok && to.off == 0) break;
      const std::string& b = bytes_[core[t]];
      const size_t a = t == from.tok ? from.off : 0, e = t == to.tok ? to.off : b.size();
      if (known && a == 0 && e == b.size() && e > 0)
        known->push_back({static_cast<uint32_t>(text.size()), static_cast<int32_t>(core[t])});
      text.append(b, a, e - a);
    }
  }

  // One piece split on `split`: its files transformed in order, the split tokens kept between them. A
  // file next to a split token is not taken for a document start or end (the tokens after a special
  // token need not be what encoding the text alone gives), so the words there are re-encoded.
  template <typename T>
  void files(const T* tok, size_t n, bool after_eod, bool before_eod, uint64_t key, double rate,
             double spm_rate, bool keep_length, T split, ContextEncoder& encode, Output& out) const {
    size_t start = 0;
    for (uint64_t f = 0;; ++f) {
      size_t end = start;
      while (end < n && tok[end] != split) ++end;
      if (f > 0) out.push(split, kText);
      out.mode(piece(tok + start, end - start, after_eod && f == 0, before_eod && end == n, file_key(key, f),
                     rate, spm_rate, keep_length, encode, out));
      if (end == n) break;
      start = end + 1;
    }
  }

  template <typename T>
  uint8_t piece(const T* tok, size_t n, bool after_eod, bool before_eod, uint64_t key, double rate,
                double spm_rate, bool keep_length, ContextEncoder& encode, Output& out) const;
  template <typename T>
  void encode_part(const T* core, size_t m, Pos s, Pos e, bool at_doc_start, bool at_doc_end,
                   ContextEncoder& encode, Part& dst) const;
};

// The core's text [s, e) encoded on its own. Only the words at its two ends are encoded again: every
// token from the first to the last boundary strictly inside is an original token. `at_doc_start`:
// the core begins a document (it follows an end-of-text), so its first tokens are the document's own
// encoding and its start counts as a word boundary; `at_doc_end` likewise for its end.
template <typename T>
void Fim::encode_part(const T* core, size_t m, Pos s, Pos e, bool at_doc_start, bool at_doc_end,
                      ContextEncoder& encode, Part& dst) const {
  dst.clear();
  if (s == e) return;
  thread_local std::string text;
  thread_local std::vector<KnownToken> known_tokens;
  std::vector<KnownToken>* known = known_tokens_ ? &known_tokens : nullptr;
  const size_t inside_end = e.tok + (e.off > 0);  // tokens j < inside_end start before e
  const bool s_boundary = at_doc_start && s == Pos{0, 0};
  const bool e_boundary = at_doc_end && e == Pos{m, 0};
  size_t w1 = s.tok;                               // s itself, or the first boundary after it
  if (!s_boundary) {
    for (++w1; w1 < inside_end && !boundary(core, m, w1);) ++w1;
    if (w1 >= inside_end) {  // no boundary inside: encode it all
      text.clear();
      append_text(core, s, e, text, known);
      encode(text, dst.head, known);
      return;
    }
  }
  size_t w2 = m;                                   // e itself, or the last boundary before it
  if (!e_boundary)
    for (w2 = inside_end - 1; w2 > w1 && !boundary(core, m, w2);) --w2;
  if (!s_boundary) {
    text.clear();
    append_text(core, s, Pos{w1, 0}, text, known);
    encode(text, dst.head, known);
  }
  dst.from = w1;
  dst.to = w2;
  if (!(e_boundary && w2 == m)) {
    text.clear();
    append_text(core, Pos{w2, 0}, e, text, known);
    encode(text, dst.tail, known);
  }
}

template <typename T>
uint8_t Fim::piece(const T* tok, size_t n, bool after_eod, bool before_eod, uint64_t key, double rate,
                   double spm_rate, bool keep_length, ContextEncoder& encode, Output& out) const {
  auto unchanged = [&]() {
    out.push_range(tok, tok + n, kText);
    return kAr;
  };
  if (!(uniform(draw(key, kDrawFim)) < rate)) return unchanged();
  size_t lead, trail;
  edges(tok, n, lead, trail);
  const T* core = tok + lead;
  const size_t m = n - lead - trail;
  thread_local std::vector<uint64_t> blocks;
  const int64_t n_chars = count_chars(core, m, blocks);
  if (n_chars <= 0) return unchanged();
  const uint8_t mode = uniform(draw(key, kDrawSpm)) < spm_rate ? kSpm : kPsm;
  if (out.full() && !keep_length) return mode;  // cut off entirely: only its mode is reported
  uint64_t a = below(draw(key, kDrawCutA), n_chars + 1), b = below(draw(key, kDrawCutB), n_chars + 1);
  if (a > b) std::swap(a, b);
  const Pos A = locate(core, m, a, blocks), B = locate(core, m, b, blocks);

  thread_local Part prefix, middle, suffix;
  const bool doc_start = after_eod && lead == 0, doc_end = before_eod && trail == 0;
  encode_part(core, m, Pos{0, 0}, A, doc_start, doc_end, encode, prefix);
  encode_part(core, m, A, B, doc_start, doc_end, encode, middle);
  encode_part(core, m, B, Pos{m, 0}, doc_start, doc_end, encode, suffix);
  encode.flush();
  suffix.tail.insert(suffix.tail.end(), tok + n - trail, tok + n);
  int64_t pad = 0;
  if (keep_length) {
    const int64_t excess = static_cast<int64_t>(lead + 3 + prefix.size() + middle.size() + suffix.size()) -
                           static_cast<int64_t>(n);
    if (excess > static_cast<int64_t>(suffix.size())) return unchanged();
    if (excess > 0) suffix.keep_first(suffix.size() - excess);
    pad = excess < 0 ? -excess : 0;
  }
  auto put = [&](const Part& part, uint8_t kind) {
    out.push_range(part.head.data(), part.head.data() + part.head.size(), kind);
    out.push_range(core + part.from, core + part.to, kind);
    out.push_range(part.tail.data(), part.tail.data() + part.tail.size(), kind);
  };
  auto put_suffix = [&]() {
    put(suffix, kText);
    for (int64_t i = 0; i < pad; ++i) out.push(sp_.pad, kPad);
  };
  out.push_range(tok, tok + lead, kText);
  out.push(sp_.prefix, kSentinel);
  if (mode == kPsm) {
    put(prefix, kText);
    out.push(sp_.suffix, kSentinel);
    put_suffix();
    out.push(sp_.middle, kSentinel);
  } else {
    out.push(sp_.suffix, kSentinel);
    put_suffix();
    out.push(sp_.middle, kSentinel);
    put(prefix, kText);
  }
  put(middle, kMiddle);
  return mode;
}

// ---------------------------------------------------------------------------------------------
// Python bindings
// ---------------------------------------------------------------------------------------------
struct Options {
  double rate = 0.0, spm_rate = 0.0;
  bool keep_length = false, mask_sentinels = false;
  int64_t split = -1;  // the split token's id (FIM per file), -1: none
};

struct PyFim {
  std::unique_ptr<Fim> fim;
  bool releases_gil = false;  // a native encoder needs no Python: transform runs without the GIL
  Options options;            // what `sample` uses (set_options)
};

std::vector<std::string> to_strings(const py::list& token_bytes) {
  std::vector<std::string> v;
  v.reserve(token_bytes.size());
  for (const py::handle& b : token_bytes) v.push_back(b.cast<std::string>());
  return v;
}

// Transforms `context` into new arrays: (tokens int64, loss float32, middle bool), modes in `modes`.
py::tuple transform_arrays(const PyFim& self, const py::array& context, uint64_t seed, uint64_t epoch,
                           uint64_t index, const Options& o, std::vector<uint8_t>* modes) {
  if (context.ndim() != 1) throw std::invalid_argument("FIM context must be a 1-D token array");
  py::array c = py::array::ensure(context, py::array::c_style);
  // The element type is read here, with the GIL: the transform below may run without it. The
  // dataset passes its .bin dtype (uint16 for vocabularies below 65535) as it is.
  const int type = py::isinstance<py::array_t<uint16_t>>(c) ? 2 : py::isinstance<py::array_t<int64_t>>(c) ? 0
                   : py::isinstance<py::array_t<int32_t>>(c) ? 1 : 3;
  if (type == 3) c = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(c);
  const size_t n = c.shape(0);
  py::array_t<int64_t> tokens(n);
  py::array_t<float> loss(n);
  py::array_t<bool> middle(n);
  Output out(tokens.mutable_data(), loss.mutable_data(), middle.mutable_data(), n, o.mask_sentinels);
  out.keep_modes = modes != nullptr;
  if (o.split >= static_cast<int64_t>(self.fim->vocab_size()))
    throw std::invalid_argument("FIM split token id " + std::to_string(o.split) + " is outside the vocabulary");
  auto go = [&]() {
    const Fim& f = *self.fim;
    if (type == 0 || type == 3)
      f.transform(static_cast<const int64_t*>(c.data()), n, seed, epoch, index, o.rate, o.spm_rate, o.keep_length, o.split, out);
    else if (type == 1)
      f.transform(static_cast<const int32_t*>(c.data()), n, seed, epoch, index, o.rate, o.spm_rate, o.keep_length, o.split, out);
    else
      f.transform(static_cast<const uint16_t*>(c.data()), n, seed, epoch, index, o.rate, o.spm_rate, o.keep_length, o.split, out);
  };
  if (self.releases_gil) {
    py::gil_scoped_release nogil;
    go();
  } else {
    go();
  }
  if (modes) *modes = std::move(out.modes);
  return py::make_tuple(std::move(tokens), std::move(loss), std::move(middle));
}

py::tuple run(const PyFim& self, const py::array& context, uint64_t seed, uint64_t epoch, uint64_t index,
              double rate, double spm_rate, bool keep_length, bool mask_sentinels, int64_t split) {
  std::vector<uint8_t> modes;
  py::tuple arrays = transform_arrays(self, context, seed, epoch, index,
                                      Options{rate, spm_rate, keep_length, mask_sentinels, split}, &modes);
  py::bytes m(reinterpret_cast<const char*>(modes.data()), modes.size());
  return py::make_tuple(arrays[0], arrays[1], arrays[2], m);
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
             py::function encode, int boundaries, py::object encode_batch, py::object byte_bpe) {
            // For tests and tokenizers without a native encoder: encode(str) -> list[int], and
            // optionally encode_batch(list[str]) -> list[list[int]] (then used instead). With
            // `byte_bpe` (HFTokenizer.byte_bpe_spec()) ASCII texts are encoded in C++, the transform
            // runs without the GIL and takes it only to call these.
            Encoder enc;
            enc.fn = [encode](std::string_view text, std::vector<int32_t>& dst) {
              py::gil_scoped_acquire gil;
              py::str s(text.data(), text.size());
              for (const py::handle& t : encode(s)) dst.push_back(t.cast<int32_t>());
            };
            if (!encode_batch.is_none())
              enc.batch = [encode_batch](const std::vector<std::string>& texts,
                                         const std::vector<std::vector<int32_t>*>& dsts) {
                py::gil_scoped_acquire gil;
                py::list in(texts.size());
                for (size_t i = 0; i < texts.size(); ++i) in[i] = py::str(texts[i]);
                py::sequence out = encode_batch(in);
                if (out.size() != texts.size()) throw std::runtime_error("encode_batch: one id list per text expected");
                for (size_t i = 0; i < texts.size(); ++i)
                  for (const py::handle& t : out[i]) dsts[i]->push_back(t.cast<int32_t>());
              };
            if (!byte_bpe.is_none())
              enc.byte_bpe = std::make_shared<const ByteBpe>(byte_bpe_spec_from_python(byte_bpe.cast<py::tuple>()));
            PyFim f;
            f.fim = std::make_unique<Fim>(to_strings(token_bytes), Specials{eod, pre, mid, suf, pad}, enc, boundaries);
            f.releases_gil = enc.byte_bpe != nullptr;
            return f;
          },
          py::arg("token_bytes"), py::arg("eod"), py::arg("fim_prefix"), py::arg("fim_middle"),
          py::arg("fim_suffix"), py::arg("fim_pad"), py::arg("encode"), py::arg("boundaries") = 1,
          py::arg("encode_batch") = py::none(), py::arg("byte_bpe") = py::none())
#ifdef MEGAFIM_HAVE_BPE
      .def_static(
          "with_model_spec",
          [](const py::list& token_bytes, int32_t eod, int32_t pre, int32_t mid, int32_t suf, int32_t pad,
             const py::list& pieces, std::vector<float> scores, std::vector<int> types) {
            // The tokenizer's own C++ encoder (csrc/bpe.h): exact sentencepiece ids, thread-safe.
            BpeModelSpec spec{to_strings(pieces), std::move(scores), std::move(types)};
            Encoder enc;
            enc.bpe = std::make_shared<const BpeEncoder>(std::move(spec));
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
           py::arg("split_token") = -1,
           "-> (tokens int64, loss_mask float32, middle_mask bool, modes bytes: 0 ar, 1 psm, 2 spm; one per "
           "piece, or per file with split_token >= 0)")
      .def(
          "boundaries", [](const PyFim& self, const std::vector<int64_t>& tokens) { return self.fim->boundaries(tokens); },
          py::arg("tokens"), "-> the j where the boundary rule splits tokens[:j] from tokens[j:] (for tests)")
      .def(
          "set_options",
          [](PyFim& self, double rate, double spm_rate, bool keep_length, bool mask_sentinels, int64_t split) {
            self.options = Options{rate, spm_rate, keep_length, mask_sentinels, split};
          },
          py::arg("rate"), py::arg("spm_rate"), py::arg("keep_length"), py::arg("mask_sentinels"),
          py::arg("split_token") = -1)
      // The data loader's call, once per sample: four positional arguments, no modes.
      .def(
          "sample",
          [](const PyFim& self, const py::array& context, uint64_t seed, uint64_t epoch, uint64_t index) {
            return transform_arrays(self, context, seed, epoch, index, self.options, nullptr);
          },
          "(context, seed, epoch, index) -> (tokens int64, loss_mask float32, middle_mask bool), with the "
          "options of set_options");
  m.attr("has_native_encoder") = py::bool_(
#ifdef MEGAFIM_HAVE_BPE
      true
#else
      false
#endif
  );
}
