// The preprocessing pipeline behind tools/preprocess_data.py: input files -> .bin/.idx datasets,
// entirely in C++ threads with the GIL released.
//
//   reader thread   reads the inputs in blocks of whole lines (JSONL) or whole files (source mode)
//                   and numbers them into jobs;
//   N workers       split lines, check UTF-8, parse JSON (csrc/json_lines.h), encode the texts with
//                   megafim::BpeEncoder (csrc/bpe.h), or hand each job's texts in one call to a
//                   Python batch encoder (a Hugging Face tokenizer: its Rust encoder runs
//                   without the GIL, so workers hold the GIL only to pass texts and ids);
//   calling thread  takes finished jobs back in input order and streams them into one
//                   IndexedWriter per JSON key (csrc/indexed_writer.h).
//
// Memory is bounded whatever the corpus size: at most `max_inflight` jobs (each about one block of
// input plus its tokens) exist at once, the writers keep no per-document arrays, and the skipped-
// line report keeps counts plus the first few locations per reason. The largest single line (or
// source file) is the only thing that can make one job bigger than a block.
// With a group key (--group-by-key), the writer hands the records to a RepoGrouper
// (csrc/repo_grouper.h), which holds at most `max_group_bytes` of repository text on top of that.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "bpe.h"
#include "indexed_writer.h"
#include "json_lines.h"
#include "repo_grouper.h"

namespace py = pybind11;

namespace megafim {
namespace {

// Bad input under strict mode: the message starts with file:line.
struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Every document was skipped (or the inputs hold none): nothing is committed, since an empty dataset
// is never what was meant. The caller reads summary() for the reasons.
struct NoDocuments : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct PipelineConfig {
  std::vector<std::string> inputs;           // files, in the order their documents are written
  bool jsonl = true;                         // JSON lines; false: each file is one document
  std::vector<std::string> keys;             // JSON keys (source mode: one name for the output)
  std::vector<std::string> output_prefixes;  // one per key
  uint8_t dtype_code = kDtypeUint16;
  bool append_eod = false;
  int32_t eod = -1;
  int workers = 1;
  bool strict = false;
  size_t block_bytes = 1 << 20;
  size_t max_examples = 5;                   // locations kept per skip reason
  // Repository-level documents (csrc/repo_grouper.h): records with the same group_key value become
  // one document; empty group_key: one document per record.
  std::string group_key, path_key;
  int32_t repo_name_id = -1, file_sep_id = -1;
  size_t max_group_bytes = size_t(256) << 20;
  bool grouping() const { return !group_key.empty(); }
};

struct Skip {
  LineError reason;
  uint32_t file;
  uint64_t line;
};

struct FileDoc {
  uint32_t file;
  size_t offset, size;
};

struct Job {
  uint64_t seq = 0;
  uint32_t file = 0;        // JSONL: the file of every line in `data`
  uint64_t first_line = 1;  // JSONL: the number of the first line in `data`
  std::string data;
  std::vector<FileDoc> docs;  // source mode: the files packed into `data`
  // results, filled by a worker
  std::vector<std::vector<int32_t>> tokens, lengths;  // per key: concatenated tokens, per document
  std::vector<Skip> skips;
  uint64_t blank_lines = 0;
  std::vector<GroupRecord> records;  // grouping: the job's good records, in input order
  std::string fatal;                 // grouping: the first record without a group / path value
};

// Per-worker scratch, reused from line to line.
struct Scratch {
  JsonLineParser parser;
  std::vector<std::string> values;
  std::vector<std::vector<int32_t>> ids;
  std::vector<std::vector<std::string>> pending;  // batch encoder: the job's texts, per key
  std::vector<std::string> pending_names;         // batch encoder, grouping: each record's group value
  std::vector<std::string> parse_keys;            // grouping: text key, group key, path key
  std::string segment;                            // grouping: path + "\n" + content
};

class Pipeline {
 public:
  Pipeline(PipelineConfig cfg, BpeModelSpec spec)
      : Pipeline(std::move(cfg), std::make_unique<BpeEncoder>(std::move(spec)), py::object()) {}
  // batch_encode(list[str]) -> (int32 ids of every text concatenated, int64 count per text).
  Pipeline(PipelineConfig cfg, py::object batch_encode) : Pipeline(std::move(cfg), nullptr, std::move(batch_encode)) {}

  Pipeline(PipelineConfig cfg, std::unique_ptr<BpeEncoder> encoder, py::object batch_encode)
      : cfg_(std::move(cfg)), encoder_(std::move(encoder)), batch_encode_(std::move(batch_encode)) {
    if (cfg_.keys.empty() || cfg_.keys.size() != cfg_.output_prefixes.size())
      throw std::invalid_argument("one output prefix per JSON key is needed");
    if (!cfg_.jsonl && cfg_.keys.size() != 1) throw std::invalid_argument("source-file inputs take one key");
    if (cfg_.workers < 1) throw std::invalid_argument("workers must be >= 1");
    if (cfg_.block_bytes < 1) throw std::invalid_argument("block_bytes must be >= 1");
    dtype_itemsize(cfg_.dtype_code);
    if (cfg_.grouping()) {
      if (!cfg_.jsonl || cfg_.keys.size() != 1 || cfg_.path_key.empty())
        throw std::invalid_argument("grouping takes JSONL inputs, one text key and a path key");
      if (cfg_.repo_name_id < 0 || cfg_.file_sep_id < 0)
        throw std::invalid_argument("grouping needs the <repo_name> and <file_sep> ids");
      if (cfg_.max_group_bytes < 1) throw std::invalid_argument("max_group_bytes must be >= 1");
    }
    max_inflight_ = 2 * static_cast<uint64_t>(cfg_.workers) + 2;
  }

  // Runs to the end; returns false when cancelled. Throws InputError (strict), NoDocuments or I/O errors; in
  // every failing case the temporary files are gone and earlier outputs are untouched.
  bool run() {
    if (started_.exchange(true)) throw std::logic_error("a Pipeline runs once; make a new one");
    std::vector<std::unique_ptr<IndexedWriter>> writers;
    try {
      for (const auto& prefix : cfg_.output_prefixes)
        writers.emplace_back(new IndexedWriter(prefix, cfg_.dtype_code));
    } catch (...) {
      for (auto& w : writers) w->abort();
      throw;
    }
    std::vector<std::thread> threads;  // the reader, then the workers
    std::exception_ptr failure;
    try {
      if (cfg_.grouping()) make_grouper(*writers[0]);
      threads.emplace_back(&Pipeline::read_inputs, this);
      for (int i = 0; i < cfg_.workers; ++i) threads.emplace_back(&Pipeline::work, this);
      write_jobs(writers);
      if (grouper_ && !cancelled_ && thread_error_.empty()) grouper_->finish();
    } catch (...) {  // also a thread that could not start: stop the others before unwinding
      failure = std::current_exception();
      cancel();
    }
    for (auto& t : threads) t.join();
    if (!failure && !thread_error_.empty()) failure = std::make_exception_ptr(std::runtime_error(thread_error_));
    if (failure || cancelled_) {
      for (auto& w : writers) w->abort();
      if (failure) std::rethrow_exception(failure);
      return false;
    }
    if (documents_.load() == 0) {
      for (auto& w : writers) w->abort();
      throw NoDocuments("no documents to write");
    }
    for (auto& w : writers) w->commit();
    for (auto& w : writers) sequences_.push_back(w->num_sequences());
    return true;
  }

  void cancel() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_ = true;
    }
    cv_.notify_all();
  }

  // (documents, tokens over every key, input bytes, skipped lines) written so far.
  py::tuple progress() const {
    return py::make_tuple(documents_.load(), tokens_.load(), input_bytes_.load(), skipped_.load());
  }

  py::dict summary() const {
    py::dict d, counts, examples;
    for (int r = 1; r < kNumLineErrors; ++r) {
      if (!skip_counts_[r]) continue;
      const char* name = line_error_name(static_cast<LineError>(r));
      counts[name] = skip_counts_[r];
      py::list where;
      for (const auto& s : skip_examples_[r]) where.append(py::make_tuple(cfg_.inputs[s.file], s.line));
      examples[name] = where;
    }
    d["documents"] = documents_.load();
    d["tokens"] = tokens_.load();
    d["input_bytes"] = input_bytes_.load();
    d["blank_lines"] = blank_lines_;
    d["skipped"] = counts;
    d["skipped_examples"] = examples;
    d["sequences_per_output"] = sequences_;
    d["peak_jobs_in_memory"] = peak_jobs_alive_.load();
    d["max_jobs_in_flight"] = max_inflight_;
    if (grouper_) {
      d["grouped_records"] = grouped_records_;
      d["split_groups"] = grouper_->split_groups();
      d["split_examples"] = grouper_->split_examples();
      d["peak_group_bytes"] = grouper_->peak_bytes();
    }
    return d;
  }

 private:
  PipelineConfig cfg_;
  std::unique_ptr<BpeEncoder> encoder_;  // null: batch_encode_ encodes
  py::object batch_encode_;
  uint64_t max_inflight_;

  std::atomic<bool> started_{false};
  std::mutex mu_;
  std::condition_variable cv_;  // one condition for every wait: the waits are rare and short
  std::vector<std::unique_ptr<Job>> todo_;          // LIFO is fine: order is restored by seq
  std::map<uint64_t, std::unique_ptr<Job>> done_;
  uint64_t next_read_ = 0, next_write_ = 0;
  bool reader_finished_ = false, cancelled_ = false;
  std::string thread_error_;

  std::atomic<uint64_t> documents_{0}, tokens_{0}, input_bytes_{0}, skipped_{0};
  // Jobs in memory (being read, queued, encoded, or written) and the most there ever were: the
  // memory bound, checked by tests/data/test_preprocess.py.
  std::atomic<uint64_t> jobs_alive_{0}, peak_jobs_alive_{0};
  uint64_t blank_lines_ = 0;
  uint64_t skip_counts_[kNumLineErrors] = {};
  std::vector<Skip> skip_examples_[kNumLineErrors];
  std::vector<uint64_t> sequences_;
  std::unique_ptr<RepoGrouper> grouper_;  // grouping: used by the writer thread only
  uint64_t grouped_records_ = 0;

  // -- reader ----------------------------------------------------------------------------------

  std::unique_ptr<Job> new_job() {
    const uint64_t alive = ++jobs_alive_;
    uint64_t peak = peak_jobs_alive_.load();
    while (alive > peak && !peak_jobs_alive_.compare_exchange_weak(peak, alive)) {}
    return std::make_unique<Job>();
  }

  // Hands a job to the workers once fewer than max_inflight jobs are unwritten; false if cancelled.
  bool submit(std::unique_ptr<Job> job) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return cancelled_ || next_read_ - next_write_ < max_inflight_; });
    if (cancelled_) return false;
    job->seq = next_read_++;
    todo_.push_back(std::move(job));
    lock.unlock();
    cv_.notify_all();
    return true;
  }

  void read_inputs() {
    try {
      if (cfg_.jsonl) {
        for (uint32_t f = 0; f < cfg_.inputs.size(); ++f)
          if (!read_jsonl(f)) break;
      } else {
        read_sources();
      }
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(mu_);
      if (thread_error_.empty()) thread_error_ = e.what();
      cancelled_ = true;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      reader_finished_ = true;
    }
    cv_.notify_all();
  }

  // Blocks of whole lines; a line longer than a block makes its block longer.
  bool read_jsonl(uint32_t f) {
    const std::string& path = cfg_.inputs[f];
    std::unique_ptr<FILE, int (*)(FILE*)> in(std::fopen(path.c_str(), "rb"), &std::fclose);
    if (!in) throw io_error("cannot open input", path);
    std::string carry;
    uint64_t line = 1;
    bool eof = false;
    while (!eof) {
      auto job = new_job();
      job->file = f;
      job->first_line = line;
      job->data.swap(carry);
      size_t cut = std::string::npos;
      while (cut == std::string::npos && !eof) {
        const size_t old = job->data.size();
        job->data.resize(old + cfg_.block_bytes);
        const size_t got = std::fread(&job->data[old], 1, cfg_.block_bytes, in.get());
        if (got < cfg_.block_bytes && std::ferror(in.get())) throw io_error("cannot read input", path);
        job->data.resize(old + got);
        eof = got < cfg_.block_bytes;
        // Only the new bytes can hold a newline: what came before is a partial line.
        const char* base = job->data.data();
        if (const void* nl = ::memrchr(base + old, '\n', got)) cut = static_cast<const char*>(nl) - base;
      }
      if (!eof) {  // keep the unfinished last line for the next block
        carry.assign(job->data, cut + 1, std::string::npos);
        job->data.resize(cut + 1);
      }
      if (job->data.empty()) {  // the file ended on a block boundary
        --jobs_alive_;
        break;
      }
      line += static_cast<uint64_t>(std::count(job->data.begin(), job->data.end(), '\n'));
      if (!submit(std::move(job))) return false;
    }
    return true;
  }

  // Whole files, packed together into jobs of about a block.
  void read_sources() {
    auto job = new_job();
    for (uint32_t f = 0; f < cfg_.inputs.size(); ++f) {
      const std::string& path = cfg_.inputs[f];
      std::unique_ptr<FILE, int (*)(FILE*)> in(std::fopen(path.c_str(), "rb"), &std::fclose);
      if (!in) throw io_error("cannot open input", path);
      const size_t offset = job->data.size();
      char buf[1 << 16];
      size_t got;
      while ((got = std::fread(buf, 1, sizeof(buf), in.get())) > 0) job->data.append(buf, got);
      if (std::ferror(in.get())) throw io_error("cannot read input", path);
      job->docs.push_back({f, offset, job->data.size() - offset});
      if (job->data.size() >= cfg_.block_bytes) {
        if (!submit(std::move(job))) return;
        job = new_job();
      }
    }
    if (!job->docs.empty()) submit(std::move(job));
    else --jobs_alive_;
  }

  // -- workers ---------------------------------------------------------------------------------

  void work() {
    try {
      work_loop();
    } catch (const std::exception& e) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (thread_error_.empty()) thread_error_ = e.what();
        cancelled_ = true;
      }
      cv_.notify_all();
    }
  }

  void work_loop() {
    Scratch scratch;
    scratch.ids.resize(cfg_.keys.size());
    scratch.pending.resize(cfg_.keys.size());
    if (cfg_.grouping()) scratch.parse_keys = {cfg_.keys[0], cfg_.group_key, cfg_.path_key};
    for (;;) {
      std::unique_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return cancelled_ || !todo_.empty() || reader_finished_; });
        if (cancelled_ || todo_.empty()) return;
        job = std::move(todo_.back());
        todo_.pop_back();
      }
      job->tokens.resize(cfg_.keys.size());
      job->lengths.resize(cfg_.keys.size());
      for (auto& t : job->tokens) t.reserve(job->data.size() / 3);
      if (cfg_.jsonl) encode_lines(*job, scratch);
      else encode_files(*job, scratch);
      if (!encoder_) encode_pending(*job, scratch);
      {
        std::lock_guard<std::mutex> lock(mu_);
        done_[job->seq] = std::move(job);
      }
      cv_.notify_all();
    }
  }

  void encode_lines(Job& job, Scratch& s) {
    const char* p = job.data.data();
    const char* end = p + job.data.size();
    for (uint64_t line = job.first_line; p < end; ++line) {
      const char* nl = static_cast<const char*>(std::memchr(p, '\n', end - p));
      const char* stop = nl ? nl : end;
      encode_line(std::string_view(p, stop - p), line, job, s);
      p = nl ? nl + 1 : end;
    }
  }

  void encode_line(std::string_view text, uint64_t line, Job& job, Scratch& s) {
    bool blank = true;
    for (char c : text) blank = blank && (c == ' ' || c == '\t' || c == '\r');
    if (blank) { ++job.blank_lines; return; }
    if (cfg_.grouping()) return group_line(text, line, job, s);
    LineError err = utf8_valid(text) ? s.parser.parse(text, cfg_.keys, s.values) : LineError::kInvalidUtf8;
    for (size_t k = 0; err == LineError::kNone && k < cfg_.keys.size(); ++k)
      if (s.values[k].empty()) err = LineError::kEmptyDocument;
    if (err != LineError::kNone) { job.skips.push_back({err, job.file, line}); return; }
    if (!encoder_) {
      for (size_t k = 0; k < cfg_.keys.size(); ++k) s.pending[k].push_back(std::move(s.values[k]));
      return;
    }
    for (size_t k = 0; k < cfg_.keys.size(); ++k) {
      s.ids[k].clear();
      encoder_->encode(s.values[k], s.ids[k]);
    }
    append_document(job, s);
  }

  // Grouping: a record becomes a GroupRecord (encoded here, or queued for the batch encoder). A bad
  // line is skipped as usual, but a record without its group or path value belongs to no repository:
  // the job's first such record stops the run when the writer reaches it (input order).
  void group_line(std::string_view text, uint64_t line, Job& job, Scratch& s) {
    const LineError err = utf8_valid(text) ? s.parser.parse(text, s.parse_keys, s.values) : LineError::kInvalidUtf8;
    if (err == LineError::kMissingKey || err == LineError::kNotAString) {
      for (size_t k = 1; k < 3; ++k) {
        if (s.parser.found(k) == 1) continue;
        if (job.fatal.empty())
          job.fatal = cfg_.inputs[job.file] + ":" + std::to_string(line) + ": " + (k == 1 ? "--group-by-key " : "--path-key ") +
                      s.parse_keys[k] + ": the record has " + (s.parser.found(k) ? "a non-string value" : "no such key");
        return;
      }
    }
    if (err != LineError::kNone) { job.skips.push_back({err, job.file, line}); return; }
    GroupRecord r;
    r.group = std::move(s.values[1]);
    r.path = std::move(s.values[2]);
    r.text_bytes = r.path.size() + s.values[0].size();
    s.segment.assign(r.path).append(1, '\n').append(s.values[0]);
    if (encoder_) {
      encoder_->encode(r.group, r.name_ids);
      encoder_->encode(s.segment, r.ids);
    } else {
      s.pending_names.push_back(r.group);
      s.pending[0].push_back(s.segment);
    }
    job.records.push_back(std::move(r));
  }

  void encode_files(Job& job, Scratch& s) {
    for (const FileDoc& d : job.docs) {
      const std::string_view text(job.data.data() + d.offset, d.size);
      const size_t valid = utf8_valid_prefix(reinterpret_cast<const unsigned char*>(text.data()), text.size());
      if (text.empty() || valid != text.size()) {
        uint64_t line = 1;
        for (size_t i = 0; i < valid; ++i) line += text[i] == '\n';
        job.skips.push_back({text.empty() ? LineError::kEmptyDocument : LineError::kInvalidUtf8, d.file, line});
        continue;
      }
      if (!encoder_) {
        s.pending[0].emplace_back(text);
        continue;
      }
      s.ids[0].clear();
      encoder_->encode(text, s.ids[0]);
      append_document(job, s);
    }
  }

  // The batch encoder on the job's texts, one call per key (grouping: per record, its group value and
  // its path + content), in document order.
  void encode_pending(Job& job, Scratch& s) {
    if (s.pending[0].empty()) return;
    py::gil_scoped_acquire gil;
    if (cfg_.grouping()) {
      batch_encode(s.pending[0], [&](size_t d, const int32_t* ids, int64_t n) { job.records[d].ids.assign(ids, ids + n); });
      batch_encode(s.pending_names, [&](size_t d, const int32_t* ids, int64_t n) {
        job.records[d].name_ids.assign(ids, ids + n);
      });
      return;
    }
    for (size_t k = 0; k < cfg_.keys.size(); ++k) {
      batch_encode(s.pending[k], [&](size_t, const int32_t* ids, int64_t n) {
        job.tokens[k].insert(job.tokens[k].end(), ids, ids + n);
        if (cfg_.append_eod) job.tokens[k].push_back(cfg_.eod);
        job.lengths[k].push_back(static_cast<int32_t>(n + (cfg_.append_eod ? 1 : 0)));
      });
    }
  }

  // One call of the batch encoder (GIL held) on `texts`, which it empties; take(d, ids, n) gets text
  // d's ids. Python errors become C++ ones here (the worker reports them like any other failure).
  template <typename Take>
  void batch_encode(std::vector<std::string>& texts, Take take) {
    try {
      py::list list(texts.size());
      for (size_t d = 0; d < texts.size(); ++d) list[d] = py::str(texts[d]);
      py::tuple out = batch_encode_(list);
      auto flat = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(out[0]);
      auto lengths = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(out[1]);
      if (!flat || !lengths || static_cast<size_t>(lengths.size()) != texts.size())
        throw std::runtime_error("the batch encoder returned no (ids, lengths) pair for every text");
      int64_t used = 0;
      for (size_t d = 0; d < texts.size(); ++d) {
        const int64_t n = lengths.data()[d];
        if (n < 0 || used + n > flat.size()) throw std::runtime_error("the batch encoder's lengths do not add up");
        take(d, flat.data() + used, n);
        used += n;
      }
      texts.clear();
    } catch (py::error_already_set& e) {
      throw std::runtime_error(std::string("tokenizer: ") + e.what());
    }
  }

  void append_document(Job& job, Scratch& s) {
    for (size_t k = 0; k < s.ids.size() && k < cfg_.keys.size(); ++k) {
      if (cfg_.append_eod) s.ids[k].push_back(cfg_.eod);
      job.tokens[k].insert(job.tokens[k].end(), s.ids[k].begin(), s.ids[k].end());
      job.lengths[k].push_back(static_cast<int32_t>(s.ids[k].size()));
    }
  }

  // -- writer (the calling thread) ---------------------------------------------------------------

  void make_grouper(IndexedWriter& writer) {
    grouper_ = std::make_unique<RepoGrouper>(
        cfg_.repo_name_id, cfg_.file_sep_id, cfg_.append_eod, cfg_.eod, cfg_.max_group_bytes, cfg_.max_examples,
        [this, &writer](const std::vector<int32_t>& doc) {
          writer.add_sequence(doc.data(), doc.size());
          writer.end_document();
          ++documents_;
          tokens_ += doc.size();
        });
  }

  void write_jobs(std::vector<std::unique_ptr<IndexedWriter>>& writers) {
    for (;;) {
      std::unique_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] {
          return cancelled_ || done_.count(next_write_) || (reader_finished_ && next_write_ == next_read_);
        });
        if (cancelled_ || !done_.count(next_write_)) return;
        auto it = done_.find(next_write_);
        job = std::move(it->second);
        done_.erase(it);
        ++next_write_;
      }
      cv_.notify_all();
      write_job(*job, writers);
      job.reset();
      --jobs_alive_;
    }
  }

  void write_job(Job& job, std::vector<std::unique_ptr<IndexedWriter>>& writers) {
    if (!job.fatal.empty()) throw InputError(job.fatal);
    if (cfg_.strict && !job.skips.empty()) {
      const Skip& s = job.skips.front();
      throw InputError(cfg_.inputs[s.file] + ":" + std::to_string(s.line) + ": " +
                       line_error_name(s.reason) + " (--strict stops at the first bad document)");
    }
    for (const Skip& s : job.skips) {
      const int r = static_cast<int>(s.reason);
      ++skip_counts_[r];
      if (skip_examples_[r].size() < cfg_.max_examples) skip_examples_[r].push_back(s);
    }
    uint64_t tokens = 0;
    for (size_t k = 0; k < writers.size(); ++k) {
      const int32_t* t = job.tokens[k].data();
      for (int32_t n : job.lengths[k]) {
        writers[k]->add_sequence(t, static_cast<size_t>(n));
        writers[k]->end_document();
        t += n;
      }
      tokens += job.tokens[k].size();
    }
    for (auto& r : job.records) {  // grouping: the grouper counts the documents and tokens it writes
      grouper_->add(std::move(r));
      ++grouped_records_;
    }
    blank_lines_ += job.blank_lines;
    skipped_ += job.skips.size();
    documents_ += job.lengths.empty() ? 0 : job.lengths[0].size();
    tokens_ += tokens;
    input_bytes_ += job.data.size();
  }
};

BpeModelSpec make_spec(const std::vector<py::bytes>& pieces, std::vector<float> scores, std::vector<int> types) {
  BpeModelSpec spec;
  spec.pieces.reserve(pieces.size());
  for (const auto& p : pieces) spec.pieces.emplace_back(p);
  spec.scores = std::move(scores);
  spec.types = std::move(types);
  return spec;
}

}  // namespace
}  // namespace megafim

PYBIND11_MODULE(preprocess_pipeline, m) {
  using megafim::Pipeline;
  using megafim::PipelineConfig;
  m.doc() = "Input files -> tokenized Megatron .bin/.idx datasets, in C++ threads (csrc/preprocess_pipeline.cpp).";
  py::register_exception<megafim::InputError>(m, "InputError", PyExc_ValueError);
  py::register_exception<megafim::NoDocuments>(m, "NoDocuments", PyExc_ValueError);

  py::class_<PipelineConfig>(m, "PipelineConfig")
      .def(py::init<>())
      .def_readwrite("inputs", &PipelineConfig::inputs)
      .def_readwrite("jsonl", &PipelineConfig::jsonl)
      .def_readwrite("keys", &PipelineConfig::keys)
      .def_readwrite("output_prefixes", &PipelineConfig::output_prefixes)
      .def_readwrite("dtype_code", &PipelineConfig::dtype_code)
      .def_readwrite("append_eod", &PipelineConfig::append_eod)
      .def_readwrite("eod", &PipelineConfig::eod)
      .def_readwrite("workers", &PipelineConfig::workers)
      .def_readwrite("strict", &PipelineConfig::strict)
      .def_readwrite("block_bytes", &PipelineConfig::block_bytes)
      .def_readwrite("max_examples", &PipelineConfig::max_examples)
      .def_readwrite("group_key", &PipelineConfig::group_key)
      .def_readwrite("path_key", &PipelineConfig::path_key)
      .def_readwrite("repo_name_id", &PipelineConfig::repo_name_id)
      .def_readwrite("file_sep_id", &PipelineConfig::file_sep_id)
      .def_readwrite("max_group_bytes", &PipelineConfig::max_group_bytes);

  py::class_<Pipeline>(m, "Pipeline")
      .def(py::init([](PipelineConfig cfg, const std::vector<py::bytes>& pieces, std::vector<float> scores,
                       std::vector<int> types) {
             auto spec = megafim::make_spec(pieces, std::move(scores), std::move(types));
             py::gil_scoped_release nogil;
             return std::make_unique<Pipeline>(std::move(cfg), std::move(spec));
           }),
           py::arg("config"), py::arg("pieces"), py::arg("scores"), py::arg("types"))
      .def(py::init([](PipelineConfig cfg, py::function batch_encode) {
             return std::make_unique<Pipeline>(std::move(cfg), py::object(std::move(batch_encode)));
           }),
           py::arg("config"), py::arg("batch_encode"),
           "batch_encode(list[str]) -> (int32 ids of all texts concatenated, int64 ids per text)")
      .def("run", &Pipeline::run, py::call_guard<py::gil_scoped_release>(),
           "Process every input and commit the outputs; False when cancelled (outputs discarded).")
      .def("cancel", &Pipeline::cancel, "Stop soon; run() then discards the outputs and returns False.")
      .def("progress", &Pipeline::progress, "(documents, tokens, input bytes, skipped) written so far.")
      .def("summary", &Pipeline::summary, "Counts, and the first locations of each kind of skipped input.");
}
