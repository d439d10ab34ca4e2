// Python bindings of the streaming indexed-dataset writer (csrc/indexed_writer.h) and of the
// strict JSONL line parser (csrc/json_lines.h). megafim.data.indexed.IndexedDatasetBuilder and
// tools/merge_datasets.py write through IndexedWriter; the parser is exposed so that tests can
// check it against Python's json module (the preprocessing pipeline itself lives in
// csrc/preprocess_pipeline.cpp and calls both from its own threads).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "indexed_writer.h"
#include "json_lines.h"

namespace py = pybind11;
using megafim::IndexedWriter;
using megafim::JsonLineParser;
using megafim::LineError;

namespace {

void add_sequence(IndexedWriter& w, py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens) {
  if (tokens.ndim() != 1) throw std::invalid_argument("a sequence must be a 1-D array of token ids");
  const int32_t* data = tokens.data();
  const size_t n = static_cast<size_t>(tokens.size());
  py::gil_scoped_release nogil;
  w.add_sequence(data, n);
}

// (status name, values or None, error byte offset) for one line; the UTF-8 check comes first, as
// in the pipeline.
py::tuple parse_json_line(py::bytes line, const std::vector<std::string>& keys) {
  const std::string s = line;
  if (!megafim::utf8_valid(s)) return py::make_tuple(megafim::line_error_name(LineError::kInvalidUtf8), py::none(), 0);
  JsonLineParser parser;
  std::vector<std::string> values;
  const LineError err = parser.parse(s, keys, values);
  if (err != LineError::kNone)
    return py::make_tuple(megafim::line_error_name(err), py::none(), parser.error_offset());
  py::list out;
  for (const auto& v : values) out.append(py::bytes(v));
  return py::make_tuple("ok", out, 0);
}

}  // namespace

PYBIND11_MODULE(indexed_builder, m) {
  m.doc() = "Streaming writer of Megatron-LM .bin/.idx datasets, and the strict JSONL line parser.";
  m.attr("DTYPE_UINT16") = megafim::kDtypeUint16;
  m.attr("DTYPE_INT32") = megafim::kDtypeInt32;

  py::class_<IndexedWriter>(m, "IndexedWriter",
                            "Writes <prefix>.bin/.idx under temporary names; commit() renames them into place.")
      .def(py::init<const std::string&, uint8_t>(), py::arg("prefix"), py::arg("dtype_code"))
      .def("add_sequence", &add_sequence, py::arg("tokens"), "Append one sequence (1-D int array).")
      .def("end_document", &IndexedWriter::end_document, "Close the document made of the sequences since the last end.")
      .def("append_dataset", &IndexedWriter::append_dataset, py::arg("prefix"), py::arg("sequence_count"),
           py::arg("document_count"), py::call_guard<py::gil_scoped_release>(),
           "Append a validated dataset: copy its .bin, stream its lengths and document ends.")
      .def("commit", &IndexedWriter::commit, py::call_guard<py::gil_scoped_release>(),
           "Write the .idx, fsync, and rename both files into place.")
      .def("abort", &IndexedWriter::abort, "Remove every temporary file.")
      .def_property_readonly("num_sequences", &IndexedWriter::num_sequences)
      .def_property_readonly("num_documents", &IndexedWriter::num_documents)
      .def_property_readonly("num_tokens", &IndexedWriter::num_tokens)
      .def_property_readonly("dtype_code", &IndexedWriter::dtype_code)
      .def_property_readonly("prefix", &IndexedWriter::prefix);

  m.def("parse_json_line", &parse_json_line, py::arg("line"), py::arg("keys"),
        "Parse one JSONL line as the pipeline does: (status, [value bytes per key] or None, error offset).");
  m.def("utf8_valid_prefix", [](py::bytes b) {
    const std::string s = b;
    return megafim::utf8_valid_prefix(reinterpret_cast<const unsigned char*>(s.data()), s.size());
  }, py::arg("data"), "Length of the longest valid UTF-8 prefix of data.");
}
