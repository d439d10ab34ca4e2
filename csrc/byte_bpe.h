// A byte-level BPE encoder for ASCII text: the ids of the `tokenizers` library's Llama 3 / Qwen2 /
// GPT-2 / StarCoder2 style tokenizer.json, without calling into Python (docs/tokenizer.md).
//
//   megafim::ByteBpe enc(spec);            // spec: model vocabulary bytes, merges, pre-tokenizer steps
//   std::vector<int32_t> ids;
//   if (!enc.encode(text, ids)) { ... }    // false (nothing appended): not ASCII, or holds an added token
//
// Only ASCII text is taken: there the pre-tokenizer regexes' classes are fixed (\p{L} = [A-Za-z],
// \p{N} = [0-9], \s = [\t\n\v\f\r ]) and hand-written matchers below follow each regex's alternatives
// in order, with the same greedy and backtracking outcome. Any other text is the caller's to encode
// with the library (FIM: csrc/fim.cpp's fallback). Merges follow the library's BPE (model.rs/word.rs):
// repeatedly the adjacent pair of lowest rank, leftmost first, and with `ignore_merges` a pre-token
// that is itself a vocabulary entry is that entry. Pre-tokens of up to 64 bytes are looked up first in
// a word -> ids cache of the calling thread. Safe to call from many threads at once.
//
// A caller that cut the text out of tokens it already has (FIM) may pass them as `known`: with
// ignore_merges, a pre-token that spans exactly one of them is that token, with no lookup (its bytes
// are a vocabulary entry, and the entry is what ignore_merges gives).
#pragma once

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "bpe.h"

namespace megafim {

// The pre-tokenizer steps, applied in order to every piece the previous step made (a Sequence).
enum ByteBpeStep : int {
  kStepGpt2Regex = 0,     // ByteLevel(use_regex=true), or Split with GPT-2's regex
  kStepLlama3Regex = 1,   // Split with Llama 3's regex (digits in runs of up to 3)
  kStepQwen2Regex = 2,    // Split with Qwen2's regex (the same, one digit at a time)
  kStepDigitsEach = 3,    // Digits(individual_digits=true)
  kStepDigitsRuns = 4,    // Digits(individual_digits=false)
};

// Whole tokens of a text, in order: token `id` holds the text's bytes [start, start + its length).
struct KnownToken {
  uint32_t start;
  int32_t id;
};

struct ByteBpeSpec {
  std::vector<std::string> vocab;            // bytes of each model vocabulary id ("" where none)
  std::vector<int32_t> merges;               // (left, right, merged) ids, flat, in rank order
  std::vector<int> steps;                    // ByteBpeStep
  bool ignore_merges = false;
  std::vector<std::string> reserved;         // texts holding any of these are not taken (added tokens)
};

class ByteBpe {
 public:
  explicit ByteBpe(const ByteBpeSpec& spec) : steps_(spec.steps), ignore_merges_(spec.ignore_merges),
                                              reserved_(spec.reserved), instance_(next_instance()) {
    for (int s : steps_)
      if (s < kStepGpt2Regex || s > kStepDigitsRuns) throw std::invalid_argument("unknown pre-tokenizer step");
    if (spec.merges.size() % 3) throw std::invalid_argument("merges: (left, right, merged) triples expected");
    for (size_t i = 0; i < 128; ++i) byte_id_[i] = -1;
    vocab_len_.resize(spec.vocab.size());
    for (size_t id = 0; id < spec.vocab.size(); ++id) {
      const std::string& b = spec.vocab[id];
      vocab_len_[id] = static_cast<uint32_t>(b.size());
      if (b.empty()) continue;
      // Distinct tokens have distinct bytes (the byte-level alphabet is one-to-one).
      words_.insert(b, bpe_detail::hash_bytes(b.data(), b.size()), {static_cast<uint32_t>(id), 0});
      if (b.size() == 1 && static_cast<unsigned char>(b[0]) < 128) byte_id_[static_cast<unsigned char>(b[0])] = id;
    }
    for (size_t i = 0; i < 128; ++i)
      if (byte_id_[i] < 0) throw std::invalid_argument("the vocabulary lacks the byte " + std::to_string(i));
    // Later duplicates of a pair overwrite earlier ones, as the library's map does. The rank is the
    // entry's score (exact in a float below 2^24 merges).
    std::vector<bpe_detail::PairMap::Entry> entries;
    for (size_t r = 0; r < spec.merges.size() / 3; ++r)
      entries.push_back({bpe_detail::PairMap::key(spec.merges[3 * r], spec.merges[3 * r + 1]), spec.merges[3 * r + 2],
                         static_cast<float>(r)});
    std::stable_sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) { return a.key < b.key; });
    std::vector<bpe_detail::PairMap::Entry> last;  // the last of each key
    for (size_t i = 0; i < entries.size(); ++i)
      if (i + 1 == entries.size() || entries[i + 1].key != entries[i].key) last.push_back(entries[i]);
    if (entries.size() >= (size_t(1) << 24)) throw std::invalid_argument("more than 2^24 merges");
    merges_.build(last);
  }

  // Scratch space and the word cache of one thread (for one encoder at a time: owner is the
  // encoder's instance number, never reused).
  struct Workspace {
    static constexpr size_t kMaxWordBytes = 64, kMaxEntries = size_t(1) << 16;
    uint64_t owner = 0;
    bpe_detail::BytesMap words;  // pre-token bytes -> span of ids
    std::vector<int32_t> ids, sym, merged;  // merged[i]: what sym[i], sym[i + 1] merge into, or -1
    std::vector<float> rank;                 // rank[i]: that merge's rank
    std::vector<std::pair<size_t, size_t>> a, b;
  };
  // The calling thread's workspace. A caller that encodes many texts in a row fetches it once (a
  // thread_local in a shared library costs a call per access).
  static Workspace& workspace() {
    thread_local Workspace ws;
    return ws;
  }

  // Appends the ids of `text` and returns true; returns false, appending nothing, when the text is
  // not ASCII or holds a reserved text.
  bool encode(std::string_view text, std::vector<int32_t>& out) const { return encode(text, out, workspace()); }

  // `known`: tokens the caller vouches for (KnownToken; their bytes must be the text's there), or null.
  bool encode(std::string_view text, std::vector<int32_t>& out, Workspace& ws,
              const std::vector<KnownToken>* known = nullptr) const {
    for (unsigned char c : text)
      if (c >= 128) return false;
    for (const std::string& r : reserved_)
      if (text.find(r) != std::string_view::npos) return false;
    if (ws.owner != instance_ || ws.words.size() >= Workspace::kMaxEntries) {  // bound memory
      ws.words.clear();
      ws.ids.clear();
      ws.owner = instance_;
    }
    ws.a.assign(1, {0, text.size()});
    for (int step : steps_) {
      ws.b.clear();
      for (auto [s, e] : ws.a) split(step, text, s, e, ws.b);
      std::swap(ws.a, ws.b);
    }
    if (!known || !ignore_merges_) {
      for (auto [s, e] : ws.a) word(text.substr(s, e - s), out, ws);
      return true;
    }
    size_t k = 0;  // the first known token that does not start before the pre-token
    for (auto [s, e] : ws.a) {
      while (k < known->size() && (*known)[k].start < s) ++k;
      if (k < known->size() && (*known)[k].start == s && is_entry((*known)[k].id, e - s))
        out.push_back((*known)[k].id);
      else
        word(text.substr(s, e - s), out, ws);
    }
    return true;
  }

  // For a caller's check, once, that its token table agrees with the model's: the model vocabulary's
  // size in ids, the byte length of an id's entry (0: none), whether the entry of `id` is `bytes`.
  size_t vocab_size() const { return vocab_len_.size(); }
  size_t entry_size(int32_t id) const {
    return id >= 0 && static_cast<size_t>(id) < vocab_len_.size() ? vocab_len_[id] : 0;
  }
  bool entry_is(int32_t id, std::string_view bytes) const {
    if (!is_entry(id, bytes.size())) return false;
    const auto* f = words_.find(bytes, bpe_detail::hash_bytes(bytes.data(), bytes.size()));
    return f && f->value_off == static_cast<uint32_t>(id);
  }

 private:
  std::vector<int> steps_;
  bool ignore_merges_;
  std::vector<std::string> reserved_;
  uint64_t instance_;
  int32_t byte_id_[128];
  std::vector<uint32_t> vocab_len_;  // bytes of each model vocabulary id (0: none)
  bpe_detail::BytesMap words_;  // vocabulary bytes -> id (in value_off)
  bpe_detail::PairMap merges_;  // (left, right) -> merged id, score = rank

  // Whether `id` is a vocabulary entry of `len` bytes (known tokens are trusted only then).
  bool is_entry(int32_t id, size_t len) const {
    return id >= 0 && static_cast<size_t>(id) < vocab_len_.size() && vocab_len_[id] == len && len > 0;
  }

  static uint64_t next_instance() {
    static std::atomic<uint64_t> n{0};
    return ++n;
  }

  // ASCII classes of the regexes: letter, number, whitespace (\s), other.
  enum Cls : uint8_t { kL, kN, kS, kO };
  static Cls cls(char c) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return kL;
    if (c >= '0' && c <= '9') return kN;
    if (c == ' ' || (c >= '\t' && c <= '\r')) return kS;
    return kO;
  }
  static bool is_newline(char c) { return c == '\r' || c == '\n'; }
  static size_t run(std::string_view t, size_t i, size_t e, Cls k, size_t most = SIZE_MAX) {
    const size_t start = i;
    while (i < e && i - start < most && cls(t[i]) == k) ++i;
    return i;
  }
  static char lower(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c; }

  // `'s|'t|'re|'ve|'m|'ll|'d` at i (case-folded when `fold`): the match's end, or i.
  static size_t contraction(std::string_view t, size_t i, size_t e, bool fold) {
    if (t[i] != '\'' || i + 1 >= e) return i;
    auto f = [&](char c) { return fold ? lower(c) : c; };
    const char a = f(t[i + 1]);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
    if (i + 2 < e) {
      const char b = f(t[i + 2]);
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    }
    return i;
  }

  // `\s+(?!\S)|\s+` at a whitespace byte i: the run, less its last byte when a non-space follows.
  static size_t spaces(std::string_view t, size_t i, size_t e) {
    const size_t j = run(t, i, e, kS);
    return j < e && j - 1 > i ? j - 1 : j;
  }

  // GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  static size_t match_gpt2(std::string_view t, size_t i, size_t e) {
    if (size_t c = contraction(t, i, e, false); c > i) return c;
    if (t[i] == ' ' && i + 1 < e && cls(t[i + 1]) != kS) return run(t, i + 1, e, cls(t[i + 1]));
    if (cls(t[i]) != kS) return run(t, i, e, cls(t[i]));
    return spaces(t, i, e);
  }

  // Llama 3 (digits = 3) and Qwen2 (digits = 1):
  // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,digits}| ?[^\s\p{L}\p{N}]+[\r\n]*|
  // \s*[\r\n]+|\s+(?!\S)|\s+
  static size_t match_llama3(std::string_view t, size_t i, size_t e, size_t digits) {
    if (size_t c = contraction(t, i, e, true); c > i) return c;
    const Cls k = cls(t[i]);
    if (k != kL && k != kN && !is_newline(t[i]) && i + 1 < e && cls(t[i + 1]) == kL) return run(t, i + 1, e, kL);
    if (k == kL) return run(t, i, e, kL);
    if (k == kN) return run(t, i, e, kN, digits);
    const size_t o = t[i] == ' ' && i + 1 < e && cls(t[i + 1]) == kO ? i + 1 : i;
    if (cls(t[o]) == kO) {
      size_t j = run(t, o, e, kO);
      while (j < e && is_newline(t[j])) ++j;
      return j;
    }
    const size_t j = run(t, i, e, kS);  // \s*[\r\n]+ ends after the run's last newline
    for (size_t q = j; q > i; --q)
      if (is_newline(t[q - 1])) return q;
    return spaces(t, i, e);
  }

  // Splits t[s, e) into pieces (Isolated: every match and every gap between matches is a piece).
  static void split(int step, std::string_view t, size_t s, size_t e, std::vector<std::pair<size_t, size_t>>& out) {
    if (step == kStepDigitsEach || step == kStepDigitsRuns) {
      for (size_t i = s; i < e;) {
        const bool digit = cls(t[i]) == kN;
        size_t j = i + 1;
        if (!digit || step == kStepDigitsRuns)
          while (j < e && (cls(t[j]) == kN) == digit) ++j;
        out.emplace_back(i, j);
        i = j;
      }
      return;
    }
    // Every byte starts some alternative of these regexes, so there are no gaps.
    for (size_t i = s; i < e;) {
      const size_t j = step == kStepGpt2Regex ? match_gpt2(t, i, e)
                       : match_llama3(t, i, e, step == kStepLlama3Regex ? 3 : 1);
      out.emplace_back(i, j);
      i = j;
    }
  }

  // One pre-token: the whole of it when ignore_merges and it is in the vocabulary, else its bytes
  // merged pair by pair, lowest rank first, leftmost first among equal ranks.
  void word(std::string_view w, std::vector<int32_t>& out, Workspace& ws) const {
    if (w.empty()) return;
    if (w.size() == 1) {  // a byte is its own token: nothing to merge, and the vocabulary entry is it
      out.push_back(byte_id_[static_cast<unsigned char>(w[0])]);
      return;
    }
    const uint64_t h = bpe_detail::hash_bytes(w.data(), w.size());
    if (ignore_merges_)
      if (const auto* f = words_.find(w, h)) {
        out.push_back(static_cast<int32_t>(f->value_off));
        return;
      }
    const bool cacheable = w.size() <= Workspace::kMaxWordBytes;
    if (cacheable)
      if (const auto* f = ws.words.find(w, h)) {
        out.insert(out.end(), ws.ids.begin() + f->value_off, ws.ids.begin() + f->value_off + f->value_len);
        return;
      }
    // Each adjacent pair's merge is looked up once and again only when a merge changes the pair:
    // the merge table is large and, in a data loader sharing its core, mostly out of cache.
    std::vector<int32_t>& sym = ws.sym;
    std::vector<int32_t>& merged = ws.merged;
    std::vector<float>& rank = ws.rank;
    sym.clear();
    for (char c : w) sym.push_back(byte_id_[static_cast<unsigned char>(c)]);
    merged.resize(sym.size() - 1);
    rank.resize(sym.size() - 1);
    auto look = [&](size_t i) {
      const auto* m = merges_.find(bpe_detail::PairMap::key(sym[i], sym[i + 1]));
      merged[i] = m ? m->id : -1;
      rank[i] = m ? m->score : 0.0f;
    };
    for (size_t i = 0; i + 1 < sym.size(); ++i) look(i);
    while (sym.size() > 1) {
      size_t best = SIZE_MAX;
      for (size_t i = 0; i + 1 < sym.size(); ++i)  // the lowest rank, leftmost among equal ones
        if (merged[i] >= 0 && (best == SIZE_MAX || rank[i] < rank[best])) best = i;
      if (best == SIZE_MAX) break;
      sym[best] = merged[best];
      sym.erase(sym.begin() + best + 1);
      merged.erase(merged.begin() + best);
      rank.erase(rank.begin() + best);
      if (best + 1 < sym.size()) look(best);
      if (best > 0) look(best - 1);
    }
    out.insert(out.end(), sym.begin(), sym.end());
    if (!cacheable) return;
    ws.words.insert(w, h, {static_cast<uint32_t>(ws.ids.size()), static_cast<uint32_t>(sym.size())});
    ws.ids.insert(ws.ids.end(), sym.begin(), sym.end());
  }
};

}  // namespace megafim
