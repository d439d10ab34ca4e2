// Python bindings of megafim::BpeEncoder (csrc/bpe.h): module megafim._native.bpe_tokenizer.
//
//   enc = Encoder(pieces: list[bytes], scores: list[float], types: list[int])
//   enc.encode(text: str) -> list[int]
//   enc.encode_bytes(data: bytes) -> list[int]
//   enc.encode_batch(texts: list[str], num_threads: int = 0) -> list[np.ndarray[int32]]
//
// encode_batch releases the GIL and encodes on a pool of std::threads (0: one per core).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "bpe.h"

namespace py = pybind11;

namespace {

// The UTF-8 bytes of a str, without copying (CPython caches them in the object, which the caller
// keeps alive). Lone surrogates have no UTF-8 form: Python's UnicodeEncodeError propagates.
std::string_view utf8_view(const py::handle& obj) {
  if (!PyUnicode_Check(obj.ptr())) throw py::type_error("expected str, got " + std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(obj.ptr(), &size);
  if (data == nullptr) throw py::error_already_set();
  return {data, static_cast<size_t>(size)};
}

megafim::BpeEncoder make_encoder(const std::vector<py::bytes>& pieces, std::vector<float> scores,
                                 std::vector<int> types) {
  megafim::BpeModelSpec spec;
  spec.pieces.reserve(pieces.size());
  for (const py::bytes& p : pieces) spec.pieces.emplace_back(std::string(p));
  spec.scores = std::move(scores);
  spec.types = std::move(types);
  try {
    return megafim::BpeEncoder(std::move(spec));
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

py::list encode_view(const megafim::BpeEncoder& enc, std::string_view view) {
  std::vector<int32_t> ids;
  ids.reserve(view.size() / 3 + 4);
  {
    py::gil_scoped_release release;
    enc.encode(view, ids);
  }
  py::list out(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) PyList_SET_ITEM(out.ptr(), i, PyLong_FromLong(ids[i]));
  return out;
}

py::list encode_one(const megafim::BpeEncoder& enc, const py::handle& text) {
  return encode_view(enc, utf8_view(text));
}

// Raw bytes, as C++ callers pass them: malformed UTF-8 is encoded the way sentencepiece does.
py::list encode_bytes(const megafim::BpeEncoder& enc, const py::bytes& data) {
  char* buf = nullptr;
  Py_ssize_t size = 0;
  if (PyBytes_AsStringAndSize(data.ptr(), &buf, &size) != 0) throw py::error_already_set();
  return encode_view(enc, std::string_view(buf, static_cast<size_t>(size)));
}

// Encodes views[i] into results[i] on `threads` threads; texts are handed out one at a time.
void encode_parallel(const megafim::BpeEncoder& enc, const std::vector<std::string_view>& views,
                     std::vector<std::vector<int32_t>>& results, size_t threads) {
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  auto work = [&] {
    try {
      for (size_t i = next++; i < views.size() && !failed; i = next++) {
        results[i].reserve(views[i].size() / 3 + 4);
        enc.encode(views[i], results[i]);
      }
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  for (size_t t = 1; t < threads; ++t) pool.emplace_back(work);
  work();  // the calling thread works too
  for (std::thread& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

py::list encode_batch(const megafim::BpeEncoder& enc, const py::sequence& texts, int num_threads) {
  if (num_threads < 0) throw py::value_error("num_threads must be >= 0 (0: one per core)");
  const size_t n = py::len(texts);
  std::vector<py::object> keep;  // own the str objects while their bytes are read without the GIL
  std::vector<std::string_view> views;
  keep.reserve(n);
  views.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    keep.push_back(texts[i]);
    views.push_back(utf8_view(keep.back()));
  }
  size_t threads = num_threads > 0 ? static_cast<size_t>(num_threads)
                                   : std::max<size_t>(1, std::thread::hardware_concurrency());
  threads = std::max<size_t>(1, std::min(threads, n));
  std::vector<std::vector<int32_t>> results(n);
  {
    py::gil_scoped_release release;
    encode_parallel(enc, views, results, threads);
  }
  py::list out(n);
  for (size_t i = 0; i < n; ++i) {
    py::array_t<int32_t> arr(static_cast<py::ssize_t>(results[i].size()));
    if (!results[i].empty()) std::memcpy(arr.mutable_data(), results[i].data(), results[i].size() * sizeof(int32_t));
    out[i] = std::move(arr);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(bpe_tokenizer, m) {
  m.doc() = "megafim's C++ BPE encoder (csrc/bpe.h): sentencepiece's ids, word-cached and multi-threaded";
  py::class_<megafim::BpeEncoder>(m, "Encoder")
      .def(py::init(&make_encoder), py::arg("pieces"), py::arg("scores"), py::arg("types"),
           "Build from a model's pieces (UTF-8 bytes), scores and sentencepiece piece types.")
      .def("encode", &encode_one, py::arg("text"), "ids of one str")
      .def("encode_bytes", &encode_bytes, py::arg("data"), "ids of raw bytes (malformed UTF-8 as sentencepiece)")
      .def("encode_batch", &encode_batch, py::arg("texts"), py::arg("num_threads") = 0,
           "int32 id arrays of many str, on num_threads threads without the GIL (0: one per core)")
      .def_property_readonly("vocab_size", &megafim::BpeEncoder::vocab_size)
      .def_property_readonly("splits_words", &megafim::BpeEncoder::splits_words,
                             "whether the per-word fast path (and its cache) is used for this model")
      .def_property_readonly("merges_by_ids", &megafim::BpeEncoder::merges_by_ids,
                             "whether short words are merged by pairs of piece ids (else by joined bytes)");
}
