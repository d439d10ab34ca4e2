// Repository-level documents for the preprocessing pipeline (tools/preprocess_data.py --group-by-key):
// the files (JSONL records) of one repository become one document, StarCoder2-style,
//
//   <repo_name> NAME <file_sep> PATH "\n" CONTENT <file_sep> PATH "\n" CONTENT ... [<eod>]
//
// with the files sorted by path (byte order; equal paths keep input order). <repo_name> and
// <file_sep> are inserted as ids, never produced by encoding text, like the FIM sentinels.
//
// Streaming in bounded memory: the writer thread feeds records here in input order; records of
// each repository collect in an "open" group, and open groups are written in the order they were
// opened. At most `max_bytes` of text (paths + contents) is held: when a record would go over it, the
// oldest open groups are written out first. So input sorted (or merely clustered) by repository gives
// one document per repository whatever the corpus size; a repository whose records come after it was
// written out starts a new document, and one bigger than `max_bytes` is split into documents of at
// most `max_bytes` (a single larger file makes a document of its own). Each document starts with
// <repo_name> NAME again; splits are counted and reported by name (summary()).

#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <list>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace megafim {

// One file of a repository: its key values and its encoded pieces.
struct GroupRecord {
  std::string group, path;
  std::vector<int32_t> name_ids;  // encode(group)
  std::vector<int32_t> ids;       // encode(path + "\n" + content)
  size_t text_bytes = 0;          // path + content bytes: what max_bytes bounds
};

class RepoGrouper {
 public:
  // emit(tokens): one finished document. Called on the writer thread, in output order.
  using Emit = std::function<void(const std::vector<int32_t>&)>;

  RepoGrouper(int32_t repo_name_id, int32_t file_sep_id, bool append_eod, int32_t eod, size_t max_bytes,
              size_t max_examples, Emit emit)
      : repo_name_(repo_name_id), file_sep_(file_sep_id), append_eod_(append_eod), eod_(eod),
        max_bytes_(max_bytes), max_examples_(max_examples), emit_(std::move(emit)) {}

  void add(GroupRecord&& r) {
    auto it = index_.find(r.group);
    const bool known = it != index_.end();
    if (known && !it->second->records.empty() && it->second->bytes + r.text_bytes > max_bytes_) {
      note_split(*it->second);  // this repository alone is over the bound: write what it has so far
      write(*it->second);
      open_.splice(open_.end(), open_, it->second);  // its next part is opened now
    }
    while (held_ + r.text_bytes > max_bytes_ && held_ > 0) {  // make room: write the oldest groups
      auto oldest = open_.begin();
      if (oldest->records.empty()) {  // the emptied receiver of this record: keep it, look further
        open_.splice(open_.end(), open_, oldest);
        continue;
      }
      const bool receiver = known && oldest == it->second;
      if (receiver) note_split(*oldest);  // its records come interleaved with others': continued later
      write(*oldest);
      if (receiver) {
        open_.splice(open_.end(), open_, oldest);
      } else {
        index_.erase(oldest->name);
        open_.erase(oldest);
      }
    }
    if (!known) {
      open_.push_back(Open{r.group, {}, 0, 0});
      it = index_.emplace(r.group, std::prev(open_.end())).first;
    }
    Open& g = *it->second;
    g.bytes += r.text_bytes;
    held_ += r.text_bytes;
    peak_bytes_ = std::max(peak_bytes_, held_);
    g.records.push_back(std::move(r));
  }

  // The end of the input: every open group is written, oldest first.
  void finish() {
    for (auto& g : open_)
      if (!g.records.empty()) write(g);
    open_.clear();
    index_.clear();
  }

  uint64_t split_groups() const { return split_groups_; }
  // (name, documents written so far) of the first split repositories.
  const std::vector<std::pair<std::string, uint64_t>>& split_examples() const { return split_examples_; }
  size_t peak_bytes() const { return peak_bytes_; }

 private:
  struct Open {
    std::string name;
    std::vector<GroupRecord> records;
    size_t bytes = 0;
    uint64_t parts = 0;  // documents of this repository already written by a split
  };

  int32_t repo_name_, file_sep_;
  bool append_eod_;
  int32_t eod_;
  size_t max_bytes_, max_examples_;
  Emit emit_;
  std::list<Open> open_;  // in the order they were opened
  std::unordered_map<std::string, std::list<Open>::iterator> index_;
  size_t held_ = 0, peak_bytes_ = 0;
  uint64_t split_groups_ = 0;
  std::vector<std::pair<std::string, uint64_t>> split_examples_;
  std::vector<int32_t> doc_;  // reused

  void note_split(Open& g) {
    if (g.parts++ == 0) ++split_groups_;
    for (auto& e : split_examples_)
      if (e.first == g.name) { e.second = g.parts + 1; return; }
    if (split_examples_.size() < max_examples_) split_examples_.emplace_back(g.name, g.parts + 1);
  }

  // Writes the group's records as one document and empties it.
  void write(Open& g) {
    std::stable_sort(g.records.begin(), g.records.end(),
                     [](const GroupRecord& a, const GroupRecord& b) { return a.path < b.path; });
    doc_.clear();
    doc_.push_back(repo_name_);
    const auto& name = g.records.front().name_ids;
    doc_.insert(doc_.end(), name.begin(), name.end());
    for (const auto& r : g.records) {
      doc_.push_back(file_sep_);
      doc_.insert(doc_.end(), r.ids.begin(), r.ids.end());
    }
    if (append_eod_) doc_.push_back(eod_);
    emit_(doc_);
    held_ -= g.bytes;
    g.bytes = 0;
    g.records.clear();
  }
};

}  // namespace megafim
