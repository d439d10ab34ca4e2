// Streaming writer of one Megatron-LM indexed dataset (<prefix>.bin + <prefix>.idx); the byte
// layout is documented in docs/data_format.md and next to each write below.
//
// Memory stays bounded whatever the dataset size: tokens go straight to the .bin, and the
// per-sequence lengths and per-document ends are streamed to two temporary side files; the .idx is
// written by streaming those files at the end (lengths, then pointers recomputed from the lengths,
// then document indices). Every file is written under a temporary name (<final>.tmp-<pid>-<n>) and
// renamed only in commit(): an interrupted run leaves no .bin/.idx pair that looks valid, and an
// earlier valid pair at the same prefix survives untouched until the new one is complete.

#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace megafim {

// Megatron's DType codes (megatron/core/datasets/indexed_dataset.py: DType).
constexpr uint8_t kDtypeInt32 = 4;
constexpr uint8_t kDtypeUint16 = 8;
constexpr char kIndexMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr uint64_t kIndexVersion = 1;
constexpr size_t kIndexHeaderBytes = 9 + 8 + 1 + 8 + 8;  // magic, version, dtype, 2 counts

inline size_t dtype_itemsize(uint8_t code) {
  if (code == kDtypeUint16) return 2;
  if (code == kDtypeInt32) return 4;
  throw std::invalid_argument("token dtype code must be 8 (uint16) or 4 (int32), got " +
                              std::to_string(code));
}

inline std::runtime_error io_error(const std::string& what, const std::string& path) {
  return std::runtime_error(what + " " + path + ": " + std::strerror(errno));
}

// A FILE* with a large buffer that throws on any write error (a full disk must not go unnoticed).
class OutFile {
 public:
  OutFile() = default;
  explicit OutFile(const std::string& path) : path_(path) {
    f_ = std::fopen(path.c_str(), "wb");
    if (!f_) throw io_error("cannot create", path);
    buf_.reset(new char[kBufBytes]);
    std::setvbuf(f_, buf_.get(), _IOFBF, kBufBytes);
  }
  OutFile(const OutFile&) = delete;
  OutFile& operator=(const OutFile&) = delete;
  ~OutFile() { if (f_) std::fclose(f_); }

  void write(const void* data, size_t n) {
    if (n && std::fwrite(data, 1, n, f_) != n) throw io_error("cannot write", path_);
  }
  template <typename T> void write_le(T v) { write(&v, sizeof(T)); }  // x86/ARM: little-endian
  // Flushes, fsyncs (the rename in commit() must not expose a file whose bytes are not on disk
  // yet) and closes.
  void close_synced() {
    if (!f_) return;
    if (std::fflush(f_) != 0 || ::fsync(fileno(f_)) != 0) throw io_error("cannot flush", path_);
    FILE* f = f_;
    f_ = nullptr;
    if (std::fclose(f) != 0) throw io_error("cannot close", path_);
  }
  void close_quietly() { if (f_) { std::fclose(f_); f_ = nullptr; } }
  const std::string& path() const { return path_; }

 private:
  static constexpr size_t kBufBytes = 1 << 20;
  std::string path_;
  FILE* f_ = nullptr;
  std::unique_ptr<char[]> buf_;
};

// Reads a side file back in chunks of T.
template <typename T>
class ChunkReader {
 public:
  ChunkReader(const std::string& path, uint64_t offset = 0) : path_(path) {
    f_ = std::fopen(path.c_str(), "rb");
    if (!f_ || std::fseek(f_, static_cast<long>(offset), SEEK_SET) != 0) throw io_error("cannot read", path);
    buf_.resize(kChunk);
  }
  ~ChunkReader() { if (f_) std::fclose(f_); }
  // Reads up to `want` items; returns how many were read (0 at the end).
  size_t next(uint64_t want) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(want, kChunk));
    const size_t got = std::fread(buf_.data(), sizeof(T), n, f_);
    if (got < n && std::ferror(f_)) throw io_error("cannot read", path_);
    return got;
  }
  const T* data() const { return buf_.data(); }

 private:
  static constexpr size_t kChunk = 1 << 18;
  std::string path_;
  FILE* f_ = nullptr;
  std::vector<T> buf_;
};

class IndexedWriter {
 public:
  // prefix: the final <prefix>.bin / <prefix>.idx. dtype_code: kDtypeUint16 or kDtypeInt32.
  IndexedWriter(const std::string& prefix, uint8_t dtype_code)
      : prefix_(prefix), dtype_code_(dtype_code), itemsize_(dtype_itemsize(dtype_code)) {
    // pid plus a per-process counter: two writers of one process never share temporary names.
    static std::atomic<uint64_t> counter{0};
    const std::string tag = ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
    bin_tmp_ = prefix + ".bin" + tag;
    idx_tmp_ = prefix + ".idx" + tag;
    lengths_tmp_ = prefix + ".lengths" + tag;
    docs_tmp_ = prefix + ".docs" + tag;
    bin_.reset(new OutFile(bin_tmp_));
    lengths_.reset(new OutFile(lengths_tmp_));
    docs_.reset(new OutFile(docs_tmp_));
  }
  IndexedWriter(const IndexedWriter&) = delete;
  IndexedWriter& operator=(const IndexedWriter&) = delete;
  ~IndexedWriter() { abort(); }

  // One sequence of tokens (checked to fit the dtype) appended to the .bin.
  void add_sequence(const int32_t* tokens, size_t n) {
    check_open();
    if (n > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
      throw std::invalid_argument("a sequence of " + std::to_string(n) + " tokens does not fit the .idx's int32 lengths");
    if (dtype_code_ == kDtypeUint16) {
      scratch16_.resize(n);
      for (size_t i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] > 0xFFFF)
          throw std::invalid_argument("token id " + std::to_string(tokens[i]) + " does not fit uint16 in " + prefix_ + ".bin");
        scratch16_[i] = static_cast<uint16_t>(tokens[i]);
      }
      bin_->write(scratch16_.data(), n * 2);  // .bin: the tokens, little-endian uint16
    } else {
      for (size_t i = 0; i < n; ++i)
        if (tokens[i] < 0)
          throw std::invalid_argument("token id " + std::to_string(tokens[i]) + " is negative");
      bin_->write(tokens, n * 4);  // .bin: the tokens, little-endian int32
    }
    lengths_->write_le<int32_t>(static_cast<int32_t>(n));
    ++num_sequences_;
    num_tokens_ += n;
  }

  // Closes the current document: its sequences are those added since the previous end.
  void end_document() {
    check_open();
    docs_->write_le<int64_t>(static_cast<int64_t>(num_sequences_));
    ++num_documents_;
  }

  // Appends a whole existing dataset (merge): its .bin bytes are copied, its lengths and document
  // ends (shifted by the sequences already written) streamed from its .idx. The caller has
  // validated it (megafim.data.indexed.IndexedDataset) and passes its counts.
  void append_dataset(const std::string& other_prefix, uint64_t seq_count, uint64_t doc_count) {
    check_open();
    const std::string idx = other_prefix + ".idx";
    uint64_t tokens = 0;
    {
      ChunkReader<int32_t> lengths(idx, kIndexHeaderBytes);
      for (uint64_t left = seq_count; left > 0;) {
        const size_t n = lengths.next(left);
        if (n == 0) throw std::runtime_error("unexpected end of " + idx);
        for (size_t i = 0; i < n; ++i) tokens += static_cast<uint64_t>(lengths.data()[i]);
        lengths_->write(lengths.data(), n * 4);
        left -= n;
      }
    }
    {
      // Document indices start at the array's first entry (always 0), which we skip.
      ChunkReader<int64_t> docs(idx, kIndexHeaderBytes + seq_count * 12 + 8);
      std::vector<int64_t> shifted;
      for (uint64_t left = doc_count > 0 ? doc_count - 1 : 0; left > 0;) {
        const size_t n = docs.next(left);
        if (n == 0) throw std::runtime_error("unexpected end of " + idx);
        shifted.assign(docs.data(), docs.data() + n);
        for (auto& d : shifted) d += static_cast<int64_t>(num_sequences_);
        docs_->write(shifted.data(), n * 8);
        left -= n;
      }
      num_documents_ += doc_count > 0 ? doc_count - 1 : 0;
    }
    copy_bin(other_prefix + ".bin", tokens * itemsize_);
    num_sequences_ += seq_count;
    num_tokens_ += tokens;
  }

  // Writes the .idx, syncs both files and renames them into place (.idx last).
  void commit() {
    check_open();
    bin_->close_synced();
    lengths_->close_synced();
    docs_->close_synced();
    write_index();
    // Drop the old .idx first: between the two renames no old .idx can pair with the new .bin.
    const std::string bin = prefix_ + ".bin", idx = prefix_ + ".idx";
    if (::unlink(idx.c_str()) != 0 && errno != ENOENT) throw io_error("cannot replace", idx);
    if (std::rename(bin_tmp_.c_str(), bin.c_str()) != 0) throw io_error("cannot rename to", bin);
    if (std::rename(idx_tmp_.c_str(), idx.c_str()) != 0) throw io_error("cannot rename to", idx);
    std::remove(lengths_tmp_.c_str());
    std::remove(docs_tmp_.c_str());
    committed_ = true;
  }

  // Removes every temporary file (safe to call twice, and after commit()).
  void abort() {
    if (committed_ || aborted_) return;
    aborted_ = true;
    for (auto* f : {bin_.get(), lengths_.get(), docs_.get()}) if (f) f->close_quietly();
    for (const auto* p : {&bin_tmp_, &idx_tmp_, &lengths_tmp_, &docs_tmp_}) std::remove(p->c_str());
  }

  uint64_t num_sequences() const { return num_sequences_; }
  uint64_t num_documents() const { return num_documents_; }
  uint64_t num_tokens() const { return num_tokens_; }
  uint8_t dtype_code() const { return dtype_code_; }
  const std::string& prefix() const { return prefix_; }

 private:
  std::string prefix_, bin_tmp_, idx_tmp_, lengths_tmp_, docs_tmp_;
  uint8_t dtype_code_;
  size_t itemsize_;
  std::unique_ptr<OutFile> bin_, lengths_, docs_;
  std::vector<uint16_t> scratch16_;
  uint64_t num_sequences_ = 0, num_documents_ = 0, num_tokens_ = 0;
  bool committed_ = false, aborted_ = false;

  void check_open() const {
    if (committed_ || aborted_) throw std::logic_error("the writer for " + prefix_ + " is already closed");
  }

  void copy_bin(const std::string& path, uint64_t expect_bytes) {
    FILE* in = std::fopen(path.c_str(), "rb");
    if (!in) throw io_error("cannot read", path);
    std::vector<char> buf(1 << 20);
    uint64_t copied = 0;
    size_t n;
    while ((n = std::fread(buf.data(), 1, buf.size(), in)) > 0) {
      bin_->write(buf.data(), n);
      copied += n;
    }
    const bool bad = std::ferror(in);
    std::fclose(in);
    if (bad) throw io_error("cannot read", path);
    if (copied != expect_bytes)
      throw std::runtime_error(path + " holds " + std::to_string(copied) + " bytes but its .idx says " +
                               std::to_string(expect_bytes));
  }

  void write_index() {
    OutFile idx(idx_tmp_);
    idx.write(kIndexMagic, sizeof(kIndexMagic));   // 9 bytes: b"MMIDIDX\x00\x00"
    idx.write_le<uint64_t>(kIndexVersion);         // <Q: version 1
    idx.write_le<uint8_t>(dtype_code_);            // <B: dtype code of the .bin tokens
    idx.write_le<uint64_t>(num_sequences_);        // <Q: sequence count
    idx.write_le<uint64_t>(num_documents_ + 1);    // <Q: document count (= entries of the last array)
    {
      ChunkReader<int32_t> lengths(lengths_tmp_);  // int32[sequence count]: tokens per sequence
      while (size_t n = lengths.next(num_sequences_)) idx.write(lengths.data(), n * 4);
    }
    {
      ChunkReader<int32_t> lengths(lengths_tmp_);  // int64[sequence count]: byte offset in the .bin
      std::vector<int64_t> pointers;
      int64_t at = 0;
      while (size_t n = lengths.next(num_sequences_)) {
        pointers.resize(n);
        for (size_t i = 0; i < n; ++i) {
          pointers[i] = at;
          at += static_cast<int64_t>(lengths.data()[i]) * static_cast<int64_t>(itemsize_);
        }
        idx.write(pointers.data(), n * 8);
      }
    }
    idx.write_le<int64_t>(0);  // int64[document count]: 0, then the sequence index ending each document
    {
      ChunkReader<int64_t> docs(docs_tmp_);
      while (size_t n = docs.next(num_documents_)) idx.write(docs.data(), n * 8);
    }
    idx.close_synced();
  }
};

}  // namespace megafim
