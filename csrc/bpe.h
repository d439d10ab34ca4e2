// megafim's BPE encoder: sentencepiece's BPE ids, faster, header-only (docs/tokenizer.md).
//
//   megafim::BpeEncoder enc(spec);        // spec: the model's pieces, scores and piece types
//   std::vector<int32_t> ids;
//   enc.encode(utf8_text, ids);           // appends; safe to call from many threads at once
//
// It reproduces sentencepiece's BPE encoding (src/bpe_model.cc + byte fallback) for models trained
// by tools/train_tokenizer.py (identity normalization, no dummy prefix, byte fallback), with one
// deliberate difference: a literal U+2581 in the text, which sentencepiece would treat as a space,
// is encoded as its three UTF-8 byte pieces, so that decoding gives the text back exactly.
//
// Why it is fast: sentencepiece merges only adjacent symbols whose concatenation is a piece, so where
// two adjacent characters appear next to each other in no piece, no merge ever crosses. At load we
// record which pairs of ASCII characters occur inside some piece (a space is U+2581 there); the text
// is cut between any two ASCII characters that do not, e.g. wherever a space follows a non-space and
// between digits. Each segment is encoded on its own (the same merges happen in the same order) and
// looked up first in a word -> ids cache held by the workspace of the calling thread.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace megafim {

// sentencepiece's piece types (sentencepiece_model.proto)
enum BpePieceType : int {
  kPieceNormal = 1, kPieceUnknown = 2, kPieceControl = 3, kPieceUserDefined = 4, kPieceUnused = 5, kPieceByte = 6
};

struct BpeModelSpec {
  std::vector<std::string> pieces;  // UTF-8, with U+2581 standing for a space
  std::vector<float> scores;
  std::vector<int> types;           // BpePieceType
};

namespace bpe_detail {

inline uint64_t mix64(uint64_t h) {  // murmur3's finalizer
  h ^= h >> 33; h *= 0xff51afd7ed558ccdULL; h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ULL; h ^= h >> 33;
  return h;
}

inline uint64_t hash_bytes(const char* p, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ULL ^ (n * 0x100000001B3ULL);
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    h = (h ^ v) * 0x9E3779B97F4A7C15ULL;
    h ^= h >> 29;
    p += 8; n -= 8;
  }
  uint64_t v = 0;
  std::memcpy(&v, p, n);
  return mix64(h ^ v) | 1;  // never 0: 0 marks an empty slot
}

// Length of the well-formed UTF-8 character at s (n bytes left), or 0 when malformed. The same rules
// as sentencepiece's decoder: no overlong forms, no surrogates, nothing above U+10FFFF.
inline int utf8_char_len(const unsigned char* s, size_t n) {
  const unsigned c = s[0];
  if (c < 0x80) return 1;
  auto cont = [&](size_t i) { return i < n && (s[i] & 0xC0) == 0x80; };
  if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    if (!cont(1) || !cont(2)) return 0;
    if (c == 0xE0 && s[1] < 0xA0) return 0;   // overlong
    if (c == 0xED && s[1] >= 0xA0) return 0;  // surrogate
    return 3;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (!cont(1) || !cont(2) || !cont(3)) return 0;
    if (c == 0xF0 && s[1] < 0x90) return 0;   // overlong
    if (c == 0xF4 && s[1] >= 0x90) return 0;  // above U+10FFFF
    return 4;
  }
  return 0;
}

// Open-addressing hash map from byte strings to ids; keys live in the map's own arena. Used both for
// the model's pieces (read-only after load) and for the per-thread word caches.
class BytesMap {
 public:
  struct Found { uint32_t value_off, value_len; };

  size_t size() const { return used_; }
  size_t key_bytes() const { return keys_.size(); }

  const Found* find(std::string_view key, uint64_t h) const {
    if (slots_.empty()) return nullptr;
    const size_t mask = slots_.size() - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
      const Slot& s = slots_[i];
      if (s.hash == 0) return nullptr;
      if (s.hash == h && s.key_len == key.size() && std::memcmp(keys_.data() + s.key_off, key.data(), key.size()) == 0)
        return &s.found;
    }
  }

  // Inserts (key -> found) unless key is present; returns false when it was.
  bool insert(std::string_view key, uint64_t h, Found found) {
    if ((used_ + 1) * 2 > slots_.size()) grow();
    const size_t mask = slots_.size() - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
      Slot& s = slots_[i];
      if (s.hash == 0) {
        s.hash = h;
        s.key_off = static_cast<uint32_t>(keys_.size());
        s.key_len = static_cast<uint32_t>(key.size());
        s.found = found;
        keys_.append(key.data(), key.size());
        ++used_;
        return true;
      }
      if (s.hash == h && s.key_len == key.size() && std::memcmp(keys_.data() + s.key_off, key.data(), key.size()) == 0)
        return false;
    }
  }

  void clear() { slots_.assign(slots_.size(), Slot{}); keys_.clear(); used_ = 0; }

 private:
  struct Slot { uint64_t hash = 0; uint32_t key_off = 0, key_len = 0; Found found{0, 0}; };

  void grow() {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(std::max<size_t>(64, old.size() * 2), Slot{});
    const size_t mask = slots_.size() - 1;
    for (const Slot& s : old) {
      if (s.hash == 0) continue;
      size_t i = s.hash & mask;
      while (slots_[i].hash != 0) i = (i + 1) & mask;
      slots_[i] = s;
    }
  }

  std::vector<Slot> slots_;
  std::string keys_;
  size_t used_ = 0;
};

// (left piece id, right piece id) -> the mergeable piece that is their concatenation, and its score.
// Read-only after load; small (one entry per way of splitting a piece into two pieces).
class PairMap {
 public:
  struct Entry { uint64_t key; int32_t id; float score; };

  void build(const std::vector<Entry>& entries) {
    size_t size = 64;
    while (size < entries.size() * 2) size *= 2;
    shift_ = 64 - __builtin_ctzll(size);
    slots_.assign(size, Entry{kEmpty, -1, 0.0f});
    for (const Entry& e : entries) {
      size_t i = slot(e.key);
      while (slots_[i].key != kEmpty && slots_[i].key != e.key) i = (i + 1) & (size - 1);
      slots_[i] = e;
    }
  }
  static uint64_t key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
  }
  // The entry of (left, right), or nullptr when their concatenation is no mergeable piece.
  const Entry* find(uint64_t k) const {
    for (size_t i = slot(k);; i = (i + 1) & (slots_.size() - 1)) {
      const Entry& e = slots_[i];
      if (e.key == k) return &e;
      if (e.key == kEmpty) return nullptr;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t(0);  // ids are < 2^31: no real key is all ones
  size_t slot(uint64_t k) const { return (k * 0x9E3779B97F4A7C15ULL) >> shift_; }
  std::vector<Entry> slots_;
  int shift_ = 58;
};

struct Symbol { int32_t prev, next; uint32_t start, len; };  // a span of the normalized word
struct SymbolPair { float score; int32_t left, right; uint32_t size; };
inline bool pair_less(const SymbolPair& a, const SymbolPair& b) {  // max-heap: higher score, then leftmost
  return a.score < b.score || (a.score == b.score && a.left > b.left);
}

// Scratch space and the word cache of one thread at a time.
struct Workspace {
  static constexpr size_t kMaxCachedWordBytes = 64;
  static constexpr size_t kMaxCacheEntries = size_t(1) << 18;
  BytesMap cache;                  // raw word bytes -> span of cache_ids
  std::vector<int32_t> cache_ids;
  std::string normalized;          // the word with spaces as U+2581 and malformed bytes as U+FFFD
  std::vector<Symbol> symbols;
  std::vector<SymbolPair> heap;
  std::vector<std::pair<std::string_view, std::pair<std::string_view, std::string_view>>> rev_merge;
  std::vector<int32_t> word_ids;
};

}  // namespace bpe_detail

class BpeEncoder {
 public:
  explicit BpeEncoder(BpeModelSpec spec);

  // Appends the ids of utf8_text to out. Malformed UTF-8 is encoded as sentencepiece does (each bad
  // byte as U+FFFD). Thread-safe: concurrent calls use separate workspaces.
  void encode(std::string_view utf8_text, std::vector<int32_t>& out) const;

  // Several encode calls on one workspace, borrowed once: for callers with many short texts (FIM
  // re-encodes ~7 words of ~12 bytes per context), where the pool's lock per call is a real part of
  // the cost. Gives exactly what encode gives. One thread at a time; the workspace goes back to the
  // pool when the session ends.
  class Session {
   public:
    explicit Session(const BpeEncoder& enc);
    ~Session();
    Session(const Session&) = delete;
    Session& operator=(const Session&) = delete;
    void encode(std::string_view utf8_text, std::vector<int32_t>& out) { enc_.encode_with(utf8_text, *ws_, out); }
   private:
    const BpeEncoder& enc_;
    std::unique_ptr<bpe_detail::Workspace> ws_;
  };

  int vocab_size() const { return static_cast<int>(m_->types.size()); }
  int32_t byte_id(uint8_t b) const { return m_->byte_ids[b]; }
  // Whether texts are cut into segments (false, for models with UNUSED pieces: whole texts, still exact).
  bool splits_words() const { return m_->split_words; }
  // Whether words of up to kMaxIdsWordBytes bytes are merged by piece ids (bpe_by_ids), else bpe().
  bool merges_by_ids() const { return m_->pair_merges; }
  // Whether ASCII characters a, b may be cut apart (no piece holds them side by side).
  bool is_boundary(unsigned char a, unsigned char b) const { return a < 128 && b < 128 && !m_->joins[a][b]; }

 private:
  struct Model {
    std::vector<float> scores;
    std::vector<int> types;
    bpe_detail::BytesMap mergeable;    // NORMAL / USER_DEFINED / UNUSED pieces -> id
    bpe_detail::BytesMap all_pieces;   // every piece -> id (sentencepiece's PieceToId)
    int32_t byte_ids[256];
    int32_t unk_id = -1;
    bool has_unused = false;
    bool split_words = true;
    // bpe_by_ids: merges looked up by pairs of piece ids rather than by the joined bytes. Usable
    // when no UNUSED pieces need resegmenting and every character of every mergeable piece is a
    // mergeable piece itself (so a symbol that is no piece never merges).
    bool pair_merges = false;
    int32_t char_id[128];              // mergeable id of each ASCII character (a space: of U+2581), or -1
    int32_t replacement_id = -1;       // mergeable id of U+FFFD, or -1
    bpe_detail::PairMap pairs;
    bool joins[128][128] = {};         // ASCII a then b occur inside some mergeable piece
    mutable std::mutex mu;             // guards `idle`
    mutable std::vector<std::unique_ptr<bpe_detail::Workspace>> idle;
  };

  // An idle workspace from the pool (or a new one), and back.
  std::unique_ptr<bpe_detail::Workspace> borrow() const {
    std::unique_ptr<bpe_detail::Workspace> ws;
    {
      std::lock_guard<std::mutex> lock(m_->mu);
      if (!m_->idle.empty()) { ws = std::move(m_->idle.back()); m_->idle.pop_back(); }
    }
    return ws ? std::move(ws) : std::make_unique<bpe_detail::Workspace>();
  }
  void give_back(std::unique_ptr<bpe_detail::Workspace> ws) const {
    std::lock_guard<std::mutex> lock(m_->mu);
    m_->idle.push_back(std::move(ws));
  }

  void encode_with(std::string_view text, bpe_detail::Workspace& ws, std::vector<int32_t>& out) const;
  void encode_word(std::string_view word, bpe_detail::Workspace& ws, std::vector<int32_t>& out) const;
  void bpe(std::string_view word, bpe_detail::Workspace& ws, std::vector<int32_t>& out) const;
  static constexpr size_t kMaxIdsWordBytes = 64;  // bpe_by_ids's arrays; its merge loop is quadratic
  void bpe_by_ids(std::string_view word, bpe_detail::Workspace& ws, std::vector<int32_t>& out) const;
  void index_pairs(const std::vector<std::string>& pieces);
  void emit(std::string_view piece, bpe_detail::Workspace& ws, std::vector<int32_t>& out) const;

  // Marks each pair of adjacent ASCII characters of a piece (U+2581 counts as a space) as joinable.
  static void note_joins(Model& m, const std::string& piece) {
    int prev = -1;  // the previous character when ASCII (or a space), else -1
    for (size_t i = 0; i < piece.size();) {
      const auto c = static_cast<unsigned char>(piece[i]);
      int cur = c < 128 ? c : -1;
      size_t len = 1;
      if (piece.compare(i, 3, "\xE2\x96\x81") == 0) { cur = ' '; len = 3; }
      else if (c >= 128) { while (i + len < piece.size() && (static_cast<unsigned char>(piece[i + len]) & 0xC0) == 0x80) ++len; }
      if (prev >= 0 && cur >= 0) m.joins[prev][cur] = true;
      prev = cur;
      i += len;
    }
  }

  static int32_t lookup(const bpe_detail::BytesMap& map, std::string_view key) {
    const auto* f = map.find(key, bpe_detail::hash_bytes(key.data(), key.size()));
    return f ? static_cast<int32_t>(f->value_off) : -1;
  }

  std::unique_ptr<Model> m_;
};

// ------------------------------------------------------------------------------------------------

inline BpeEncoder::BpeEncoder(BpeModelSpec spec) : m_(std::make_unique<Model>()) {
  const size_t n = spec.pieces.size();
  if (spec.scores.size() != n || spec.types.size() != n)
    throw std::invalid_argument("BpeEncoder: pieces, scores and types differ in length");
  Model& m = *m_;
  m.scores = std::move(spec.scores);
  m.types = std::move(spec.types);
  std::fill(std::begin(m.byte_ids), std::end(m.byte_ids), -1);
  for (size_t i = 0; i < n; ++i) {
    const std::string& p = spec.pieces[i];
    const int t = m.types[i];
    if (t < kPieceNormal || t > kPieceByte) throw std::invalid_argument("BpeEncoder: piece type out of range");
    if (t == kPieceUserDefined)
      throw std::invalid_argument("BpeEncoder: user-defined symbols are not supported (piece '" + p + "')");
    const uint64_t h = bpe_detail::hash_bytes(p.data(), p.size());
    if (!m.all_pieces.insert(p, h, {static_cast<uint32_t>(i), 0}))
      throw std::invalid_argument("BpeEncoder: piece '" + p + "' is defined twice");
    if (t == kPieceNormal || t == kPieceUnused) m.mergeable.insert(p, h, {static_cast<uint32_t>(i), 0});
    if (t == kPieceUnused) m.has_unused = true;
    if (t == kPieceUnknown) m.unk_id = static_cast<int32_t>(i);
    if (t == kPieceByte) {
      unsigned b = 0;
      if (p.size() != 6 || std::sscanf(p.c_str(), "<0x%2X>", &b) != 1 || b > 255)
        throw std::invalid_argument("BpeEncoder: byte piece '" + p + "' is not <0xHH>");
      m.byte_ids[b] = static_cast<int32_t>(i);
    }
    if (t == kPieceNormal || t == kPieceUnused) note_joins(m, p);
  }
  if (m.unk_id < 0) throw std::invalid_argument("BpeEncoder: the model has no unknown piece");
  for (int b = 0; b < 256; ++b)
    if (m.byte_ids[b] < 0) throw std::invalid_argument("BpeEncoder: the model lacks byte-fallback pieces");
  // With UNUSED pieces sentencepiece's resegmentation depends on the whole text: encode whole texts.
  if (m.has_unused) m.split_words = false;
  else index_pairs(spec.pieces);
}

// Fills pairs, char_id and replacement_id, and sets pair_merges when every character of every
// mergeable piece is itself one (else bpe_by_ids would miss merges and is not used).
inline void BpeEncoder::index_pairs(const std::vector<std::string>& pieces) {
  Model& m = *m_;
  std::vector<bpe_detail::PairMap::Entry> entries;
  std::vector<size_t> cuts;
  for (size_t i = 0; i < m.types.size(); ++i) {
    if (m.types[i] != kPieceNormal) continue;
    const std::string_view p(pieces[i]);
    if (p.empty()) continue;
    cuts.clear();
    for (size_t k = 0; k < p.size();) {
      const int len = bpe_detail::utf8_char_len(reinterpret_cast<const unsigned char*>(p.data()) + k, p.size() - k);
      if (len == 0 || lookup(m.mergeable, p.substr(k, len)) < 0) return;  // pair_merges stays false
      k += len;
      cuts.push_back(k);
    }
    cuts.pop_back();
    for (size_t k : cuts) {
      const int32_t left = lookup(m.mergeable, p.substr(0, k)), right = lookup(m.mergeable, p.substr(k));
      if (left >= 0 && right >= 0)
        entries.push_back({bpe_detail::PairMap::key(left, right), static_cast<int32_t>(i), m.scores[i]});
    }
  }
  m.pairs.build(entries);
  for (int c = 0; c < 128; ++c) {
    const char ch = static_cast<char>(c);
    m.char_id[c] = c == ' ' ? lookup(m.mergeable, "\xE2\x96\x81") : lookup(m.mergeable, std::string_view(&ch, 1));
  }
  m.replacement_id = lookup(m.mergeable, "\xEF\xBF\xBD");
  m.pair_merges = true;
}

inline BpeEncoder::Session::Session(const BpeEncoder& enc) : enc_(enc), ws_(enc.borrow()) {}
inline BpeEncoder::Session::~Session() { enc_.give_back(std::move(ws_)); }

inline void BpeEncoder::encode(std::string_view text, std::vector<int32_t>& out) const {
  Session session(*this);
  session.encode(text, out);
}

inline void BpeEncoder::encode_with(std::string_view text, bpe_detail::Workspace& ws,
                                    std::vector<int32_t>& out) const {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  const bool split = m_->split_words;
  size_t start = 0;
  const auto& joins = m_->joins;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char c = p[i];
    if (c < 128) {
      if (split && i > start && p[i - 1] < 128 && !joins[p[i - 1]][c]) {
        encode_word(text.substr(start, i - start), ws, out);
        start = i;
      }
    } else if (c == 0xE2 && i + 2 < n && p[i + 1] == 0x96 && p[i + 2] == 0x81) {
      // A literal U+2581: its own bytes, and a boundary no merge crosses.
      if (i > start) encode_word(text.substr(start, i - start), ws, out);
      out.insert(out.end(), {m_->byte_ids[0xE2], m_->byte_ids[0x96], m_->byte_ids[0x81]});
      i += 2;
      start = i + 1;
    }
  }
  if (n > start) encode_word(text.substr(start), ws, out);
}

inline void BpeEncoder::encode_word(std::string_view word, bpe_detail::Workspace& ws,
                                    std::vector<int32_t>& out) const {
  using bpe_detail::Workspace;
  const bool cacheable = word.size() <= Workspace::kMaxCachedWordBytes;
  uint64_t h = 0;
  if (cacheable) {
    h = bpe_detail::hash_bytes(word.data(), word.size());
    if (const auto* f = ws.cache.find(word, h)) {
      const int32_t* ids = ws.cache_ids.data() + f->value_off;
      out.insert(out.end(), ids, ids + f->value_len);
      return;
    }
  }
  ws.word_ids.clear();
  if (m_->pair_merges && word.size() <= kMaxIdsWordBytes) bpe_by_ids(word, ws, ws.word_ids);
  else bpe(word, ws, ws.word_ids);
  out.insert(out.end(), ws.word_ids.begin(), ws.word_ids.end());
  if (!cacheable) return;
  if (ws.cache.size() >= Workspace::kMaxCacheEntries) { ws.cache.clear(); ws.cache_ids.clear(); }  // bound memory
  const auto off = static_cast<uint32_t>(ws.cache_ids.size());
  ws.cache_ids.insert(ws.cache_ids.end(), ws.word_ids.begin(), ws.word_ids.end());
  ws.cache.insert(word, h, {off, static_cast<uint32_t>(ws.word_ids.size())});
}

// sentencepiece's BPE on one word (bpe_model.cc): characters are symbols; repeatedly merge the adjacent
// pair whose concatenation is the best-scoring piece (leftmost on ties) until no pair is a piece.
inline void BpeEncoder::bpe(std::string_view word, bpe_detail::Workspace& ws, std::vector<int32_t>& out) const {
  using namespace bpe_detail;
  std::string& norm = ws.normalized;
  std::vector<Symbol>& sym = ws.symbols;
  norm.clear();
  sym.clear();
  const auto* p = reinterpret_cast<const unsigned char*>(word.data());
  for (size_t i = 0; i < word.size();) {
    const auto start = static_cast<uint32_t>(norm.size());
    int len = utf8_char_len(p + i, word.size() - i);
    if (p[i] == ' ') {
      norm.append("\xE2\x96\x81");
    } else if (len == 0) {
      norm.append("\xEF\xBF\xBD");  // sentencepiece: a malformed byte becomes U+FFFD
      len = 1;
    } else {
      norm.append(word.data() + i, len);
    }
    i += len;
    const auto idx = static_cast<int32_t>(sym.size());
    sym.push_back({idx - 1, idx + 1, start, static_cast<uint32_t>(norm.size()) - start});
  }
  if (sym.empty()) return;
  sym.back().next = -1;

  std::vector<SymbolPair>& heap = ws.heap;
  heap.clear();
  ws.rev_merge.clear();
  auto piece_of = [&](int32_t s, uint32_t len) { return std::string_view(norm.data() + sym[s].start, len); };
  auto maybe_add = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const std::string_view piece = piece_of(left, sym[left].len + sym[right].len);
    const int32_t id = lookup(m_->mergeable, piece);
    if (id < 0) return;
    heap.push_back({m_->scores[id], left, right, static_cast<uint32_t>(piece.size())});
    std::push_heap(heap.begin(), heap.end(), pair_less);
    if (m_->types[id] == kPieceUnused)  // remember the split, for resegmentation (last one wins)
      ws.rev_merge.push_back({piece, {piece_of(left, sym[left].len), piece_of(right, sym[right].len)}});
  };
  for (size_t i = 1; i < sym.size(); ++i) maybe_add(static_cast<int32_t>(i - 1), static_cast<int32_t>(i));

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), pair_less);
    const SymbolPair top = heap.back();
    heap.pop_back();
    Symbol& l = sym[top.left];
    Symbol& r = sym[top.right];
    if (l.len == 0 || r.len == 0 || l.len + r.len != top.size) continue;  // stale
    l.len += r.len;
    l.next = r.next;
    if (r.next >= 0) sym[r.next].prev = top.left;
    r.len = 0;
    maybe_add(l.prev, top.left);
    maybe_add(top.left, l.next);
  }
  for (int32_t s = 0; s != -1; s = sym[s].next) emit(piece_of(s, sym[s].len), ws, out);
}

// The same merges as bpe() for a word of at most kMaxIdsWordBytes bytes, on piece ids: a pair of
// adjacent symbols merges when PairMap holds their ids, so no bytes are joined or hashed in the loop.
// The symbols sit in small arrays, left to right; the best pair (highest score, leftmost on ties, as
// sentencepiece's heap orders them) is found by a scan, which for so few symbols beats a heap.
inline void BpeEncoder::bpe_by_ids(std::string_view word, bpe_detail::Workspace& ws, std::vector<int32_t>& out) const {
  using namespace bpe_detail;
  constexpr size_t kMax = kMaxIdsWordBytes;
  int32_t id[kMax];        // the symbol's mergeable piece, or -1 (a character that is none)
  uint8_t start[kMax + 1]; // its first byte in the word (start[n] == the word's size)
  int32_t merged[kMax];    // the piece of symbols i and i + 1 together, or -1
  float score[kMax];       // that piece's score
  const auto* p = reinterpret_cast<const unsigned char*>(word.data());
  size_t n = 0;
  for (size_t i = 0; i < word.size(); ++n) {
    start[n] = static_cast<uint8_t>(i);
    if (p[i] < 0x80) {
      id[n] = m_->char_id[p[i]];
      ++i;
      continue;
    }
    const int len = utf8_char_len(p + i, word.size() - i);
    id[n] = len == 0 ? m_->replacement_id : lookup(m_->mergeable, word.substr(i, len));
    i += len == 0 ? 1 : len;
  }
  start[n] = static_cast<uint8_t>(word.size());
  auto pair = [&](size_t i) {  // fills merged[i] / score[i] for symbols i and i + 1
    merged[i] = -1;
    if (id[i] < 0 || id[i + 1] < 0) return;
    if (const PairMap::Entry* e = m_->pairs.find(PairMap::key(id[i], id[i + 1]))) {
      merged[i] = e->id;
      score[i] = e->score;
    }
  };
  for (size_t i = 0; i + 1 < n; ++i) pair(i);
  while (n > 1) {
    size_t best = n;
    for (size_t i = 0; i + 1 < n; ++i)
      if (merged[i] >= 0 && (best == n || score[i] > score[best])) best = i;
    if (best == n) break;
    id[best] = merged[best];  // symbols best and best + 1 become one; the rest move left
    for (size_t i = best + 1; i + 1 < n; ++i) {
      id[i] = id[i + 1];
      start[i] = start[i + 1];
      merged[i] = merged[i + 1];
      score[i] = score[i + 1];
    }
    start[n - 1] = start[n];
    --n;
    if (best > 0) pair(best - 1);
    if (best + 1 < n) pair(best);
  }
  for (size_t i = 0; i < n; ++i) {
    if (id[i] >= 0) {
      out.push_back(id[i]);
      continue;
    }
    // A character that is no mergeable piece: what bpe() emits for it (a space is U+2581, a malformed
    // byte U+FFFD; a piece of another type, or byte fallback).
    const std::string_view ch = word.substr(start[i], start[i + 1] - start[i]);
    if (ch == " ") emit("\xE2\x96\x81", ws, out);
    else if (utf8_char_len(p + start[i], word.size() - start[i]) == 0) emit("\xEF\xBF\xBD", ws, out);
    else emit(ch, ws, out);
  }
}

// One final symbol: its id, its resegmentation when it is an UNUSED piece, or its bytes when it is no
// piece at all (sentencepiece's byte fallback for unknown pieces).
inline void BpeEncoder::emit(std::string_view piece, bpe_detail::Workspace& ws, std::vector<int32_t>& out) const {
  const int32_t id = lookup(m_->all_pieces, piece);
  if (id >= 0 && m_->types[id] == kPieceUnused) {
    for (auto it = ws.rev_merge.rbegin(); it != ws.rev_merge.rend(); ++it) {
      if (it->first == piece) {
        emit(it->second.first, ws, out);
        emit(it->second.second, ws, out);
        return;
      }
    }
  }
  if (id >= 0 && id != m_->unk_id) {
    out.push_back(id);
    return;
  }
  for (unsigned char b : piece) out.push_back(m_->byte_ids[b]);
}

}  // namespace megafim
