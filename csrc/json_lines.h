// Strict UTF-8 validation and a small strict JSON parser for one JSONL line, used by the
// preprocessing pipeline (csrc/indexed_builder.cpp).
//
// The parser checks the whole line against RFC 8259 (objects, arrays, strings with every escape
// including \uXXXX surrogate pairs, numbers, true/false/null, nesting up to kMaxDepth) and
// extracts the string values of the wanted top-level keys, decoded to UTF-8. It allocates only
// for the values it returns. What it rejects, and why, is reported as a LineError so that the
// caller can count skipped lines by reason. Python's json module is the reference it is tested
// against (tests/data/test_preprocess_json.py), except where Python is lax: we reject lone
// surrogates (they cannot be encoded as UTF-8) and NaN/Infinity (not JSON).

#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace megafim {

enum class LineError : int {
  kNone = 0,
  kMalformedJson = 1,  // not a JSON object, or trailing garbage
  kMissingKey = 2,     // a wanted key is absent
  kNotAString = 3,     // a wanted key holds something other than a string
  kInvalidUtf8 = 4,    // raw bytes that are not UTF-8, or a lone surrogate escape
  kEmptyDocument = 5,  // the text is empty
};
constexpr int kNumLineErrors = 6;

inline const char* line_error_name(LineError e) {
  switch (e) {
    case LineError::kNone: return "ok";
    case LineError::kMalformedJson: return "malformed_json";
    case LineError::kMissingKey: return "missing_key";
    case LineError::kNotAString: return "not_a_string";
    case LineError::kInvalidUtf8: return "invalid_utf8";
    case LineError::kEmptyDocument: return "empty_document";
  }
  return "unknown";
}

// Length of the longest valid UTF-8 prefix of [p, p+n) (== n when all of it is valid).
// Rejects overlong forms, UTF-16 surrogates (U+D800..U+DFFF) and code points above U+10FFFF,
// per the Unicode standard's table 3-7 of well-formed byte sequences.
inline size_t utf8_valid_prefix(const unsigned char* p, size_t n) {
  size_t i = 0;
  while (i < n) {
    // ASCII fast path, 8 bytes at a time: most code is ASCII.
    while (i + 8 <= n) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      if (w & 0x8080808080808080ULL) break;
      i += 8;
    }
    if (i >= n) break;
    const unsigned char c = p[i];
    if (c < 0x80) { ++i; continue; }
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c == 0xE0) { len = 3; lo = 0xA0; }
    else if (c >= 0xE1 && c <= 0xEC) len = 3;
    else if (c == 0xED) { len = 3; hi = 0x9F; }  // excludes encoded surrogates
    else if (c >= 0xEE && c <= 0xEF) len = 3;
    else if (c == 0xF0) { len = 4; lo = 0x90; }
    else if (c >= 0xF1 && c <= 0xF3) len = 4;
    else if (c == 0xF4) { len = 4; hi = 0x8F; }  // <= U+10FFFF
    else return i;
    if (i + len > n || p[i + 1] < lo || p[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k)
      if ((p[i + k] & 0xC0) != 0x80) return i;
    i += len;
  }
  return n;
}

inline bool utf8_valid(std::string_view s) {
  return utf8_valid_prefix(reinterpret_cast<const unsigned char*>(s.data()), s.size()) == s.size();
}

// Parses one line as a JSON object and fills values[k] with the decoded string at keys[k].
class JsonLineParser {
 public:
  static constexpr int kMaxDepth = 256;

  // keys: the wanted top-level keys. Returns kNone and fills `values` (one per key) on success.
  LineError parse(std::string_view line, const std::vector<std::string>& keys,
                  std::vector<std::string>& values) {
    begin_ = p_ = line.data();
    end_ = p_ + line.size();
    keys_ = &keys;
    values_ = &values;
    values.assign(keys.size(), std::string());
    found_.assign(keys.size(), 0);
    error_ = LineError::kNone;
    skip_ws();
    if (p_ >= end_ || *p_ != '{') return fail(LineError::kMalformedJson), LineError::kMalformedJson;
    if (!parse_object(0, /*top=*/true)) return error_;
    skip_ws();
    if (p_ != end_) return fail(LineError::kMalformedJson), LineError::kMalformedJson;
    for (size_t k = 0; k < keys.size(); ++k)
      if (!found_[k]) return LineError::kMissingKey;
    for (size_t k = 0; k < keys.size(); ++k)
      if (found_[k] == 2) return LineError::kNotAString;
    return LineError::kNone;
  }

  // After a parse that got past the JSON syntax: 0 if keys[k] was absent, 1 a string, 2 another type.
  int found(size_t k) const { return found_[k]; }

  // Byte offset in the line where the last parse stopped (where a malformed line went wrong).
  size_t error_offset() const { return static_cast<size_t>(p_ - begin_); }

 private:
  const char* begin_ = nullptr;
  const char* p_ = nullptr;
  const char* end_ = nullptr;
  const std::vector<std::string>* keys_ = nullptr;
  std::vector<std::string>* values_ = nullptr;
  std::vector<char> found_;  // 0 absent, 1 string, 2 other type (last occurrence wins, as in Python)
  LineError error_ = LineError::kNone;
  std::string key_scratch_;

  bool fail(LineError e) {
    if (error_ == LineError::kNone) error_ = e;
    return false;
  }
  void skip_ws() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }
  bool expect(char c) {
    skip_ws();
    if (p_ < end_ && *p_ == c) { ++p_; return true; }
    return fail(LineError::kMalformedJson);
  }

  int wanted_index(const std::string& key) const {
    for (size_t k = 0; k < keys_->size(); ++k)
      if ((*keys_)[k] == key) return static_cast<int>(k);
    return -1;
  }

  bool parse_object(int depth, bool top) {
    if (depth >= kMaxDepth) return fail(LineError::kMalformedJson);
    ++p_;  // '{'
    skip_ws();
    if (p_ < end_ && *p_ == '}') { ++p_; return true; }
    for (;;) {
      skip_ws();
      if (p_ >= end_ || *p_ != '"') return fail(LineError::kMalformedJson);
      key_scratch_.clear();
      if (!parse_string(&key_scratch_)) return false;
      if (!expect(':')) return false;
      skip_ws();
      const int want = top ? wanted_index(key_scratch_) : -1;
      if (want >= 0 && p_ < end_ && *p_ == '"') {
        std::string& out = (*values_)[want];
        out.clear();
        if (!parse_string(&out)) return false;
        found_[want] = 1;
      } else {
        if (!parse_value(depth + 1)) return false;
        if (want >= 0) found_[want] = 2;
      }
      skip_ws();
      if (p_ < end_ && *p_ == ',') { ++p_; continue; }
      if (p_ < end_ && *p_ == '}') { ++p_; return true; }
      return fail(LineError::kMalformedJson);
    }
  }

  bool parse_array(int depth) {
    if (depth >= kMaxDepth) return fail(LineError::kMalformedJson);
    ++p_;  // '['
    skip_ws();
    if (p_ < end_ && *p_ == ']') { ++p_; return true; }
    for (;;) {
      if (!parse_value(depth + 1)) return false;
      skip_ws();
      if (p_ < end_ && *p_ == ',') { ++p_; continue; }
      if (p_ < end_ && *p_ == ']') { ++p_; return true; }
      return fail(LineError::kMalformedJson);
    }
  }

  bool parse_value(int depth) {
    skip_ws();
    if (p_ >= end_) return fail(LineError::kMalformedJson);
    switch (*p_) {
      case '{': return parse_object(depth, false);
      case '[': return parse_array(depth);
      case '"': return parse_string(nullptr);
      case 't': return literal("true");
      case 'f': return literal("false");
      case 'n': return literal("null");
      default: return parse_number();
    }
  }

  bool literal(const char* word) {
    const size_t n = std::strlen(word);
    if (static_cast<size_t>(end_ - p_) < n || std::memcmp(p_, word, n) != 0)
      return fail(LineError::kMalformedJson);
    p_ += n;
    return true;
  }

  static bool is_digit(char c) { return c >= '0' && c <= '9'; }

  // -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
  bool parse_number() {
    if (p_ < end_ && *p_ == '-') ++p_;
    if (p_ >= end_ || !is_digit(*p_)) return fail(LineError::kMalformedJson);
    if (*p_ == '0') ++p_;
    else while (p_ < end_ && is_digit(*p_)) ++p_;
    if (p_ < end_ && *p_ == '.') {
      ++p_;
      if (p_ >= end_ || !is_digit(*p_)) return fail(LineError::kMalformedJson);
      while (p_ < end_ && is_digit(*p_)) ++p_;
    }
    if (p_ < end_ && (*p_ == 'e' || *p_ == 'E')) {
      ++p_;
      if (p_ < end_ && (*p_ == '+' || *p_ == '-')) ++p_;
      if (p_ >= end_ || !is_digit(*p_)) return fail(LineError::kMalformedJson);
      while (p_ < end_ && is_digit(*p_)) ++p_;
    }
    return true;
  }

  static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }

  bool read_hex4(uint32_t* cp) {
    if (end_ - p_ < 4) return fail(LineError::kMalformedJson);
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      const int h = hex_value(p_[k]);
      if (h < 0) return fail(LineError::kMalformedJson);
      v = (v << 4) | static_cast<uint32_t>(h);
    }
    p_ += 4;
    *cp = v;
    return true;
  }

  static void append_utf8(std::string* out, uint32_t cp) {
    if (cp < 0x80) {
      out->push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  // After "\u": one code point, combining a high and a low surrogate escape into one.
  bool parse_unicode_escape(std::string* out) {
    uint32_t cp;
    if (!read_hex4(&cp)) return false;
    if (cp >= 0xDC00 && cp <= 0xDFFF) return fail(LineError::kInvalidUtf8);  // lone low surrogate
    if (cp >= 0xD800 && cp <= 0xDBFF) {
      if (end_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u') return fail(LineError::kInvalidUtf8);
      p_ += 2;
      uint32_t lo;
      if (!read_hex4(&lo)) return false;
      if (lo < 0xDC00 || lo > 0xDFFF) return fail(LineError::kInvalidUtf8);
      cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
    }
    if (out) append_utf8(out, cp);
    return true;
  }

  // At '"'. Decodes into *out when out is not null. The line was checked to be UTF-8 before.
  bool parse_string(std::string* out) {
    ++p_;
    for (;;) {
      // Copy the run of plain characters in one go.
      const char* run = p_;
      while (p_ < end_ && *p_ != '"' && *p_ != '\\' && static_cast<unsigned char>(*p_) >= 0x20) ++p_;
      if (out && p_ > run) out->append(run, p_ - run);
      if (p_ >= end_) return fail(LineError::kMalformedJson);
      const char c = *p_++;
      if (c == '"') return true;
      if (c != '\\') return fail(LineError::kMalformedJson);  // raw control character
      if (p_ >= end_) return fail(LineError::kMalformedJson);
      const char e = *p_++;
      char decoded;
      switch (e) {
        case '"': decoded = '"'; break;
        case '\\': decoded = '\\'; break;
        case '/': decoded = '/'; break;
        case 'b': decoded = '\b'; break;
        case 'f': decoded = '\f'; break;
        case 'n': decoded = '\n'; break;
        case 'r': decoded = '\r'; break;
        case 't': decoded = '\t'; break;
        case 'u':
          if (!parse_unicode_escape(out)) return false;
          continue;
        default: return fail(LineError::kMalformedJson);
      }
      if (out) out->push_back(decoded);
    }
  }
};

}  // namespace megafim
