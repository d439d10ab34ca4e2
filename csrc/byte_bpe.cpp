// Python module megafim._native.byte_bpe: the byte-level BPE encoder of csrc/byte_bpe.h on its own,
// for HFTokenizer's batch encoders (preprocessing) and for tests against the `tokenizers` library
// (FIM uses the header directly, csrc/fim.cpp).
#include <algorithm>

#include "byte_bpe_py.h"

namespace py = pybind11;

PYBIND11_MODULE(byte_bpe, m) {
  using megafim::ByteBpe;
  m.doc() = "A byte-level BPE encoder for ASCII text (csrc/byte_bpe.h).";
  py::class_<ByteBpe>(m, "ByteBpe")
      .def(py::init([](const py::tuple& spec) { return new ByteBpe(megafim::byte_bpe_spec_from_python(spec)); }),
           py::arg("spec"))
      .def(
          "encode",
          [](const ByteBpe& self, const std::string& text,
             const std::vector<std::pair<uint32_t, int32_t>>& known) -> py::object {
            std::vector<megafim::KnownToken> k;
            for (auto [start, id] : known) {
              if (start > text.size()) throw std::invalid_argument("known token start past the text's end");
              k.push_back({start, id});
            }
            std::vector<int32_t> ids;
            bool ok;
            {
              py::gil_scoped_release nogil;
              ok = self.encode(text, ids, ByteBpe::workspace(), known.empty() ? nullptr : &k);
            }
            if (!ok) return py::none();
            return py::cast(ids);
          },
          py::arg("text"), py::arg("known") = std::vector<std::pair<uint32_t, int32_t>>{},
          "-> list[int], or None when the text is not ASCII or holds a reserved text. `known`: (start, id) "
          "of tokens whose bytes the text holds there, in order (FIM's original tokens; see byte_bpe.h)")
      .def(
          "encode_flat",
          [](const ByteBpe& self, const py::list& texts) {
            // Copied out under the GIL, encoded without it (the preprocessing workers run in parallel).
            std::vector<std::string> in;
            in.reserve(texts.size());
            for (const py::handle& t : texts) in.push_back(t.cast<std::string>());
            std::vector<int32_t> ids;
            py::array_t<int64_t> lengths(in.size());
            py::array_t<bool> declined(in.size());
            {
              py::gil_scoped_release nogil;
              int64_t* len = lengths.mutable_data();
              bool* no = declined.mutable_data();
              ByteBpe::Workspace& ws = ByteBpe::workspace();
              for (size_t i = 0; i < in.size(); ++i) {
                const size_t before = ids.size();
                no[i] = !self.encode(in[i], ids, ws);
                len[i] = static_cast<int64_t>(ids.size() - before);
              }
            }
            py::array_t<int32_t> flat(ids.size());
            std::copy(ids.begin(), ids.end(), flat.mutable_data());
            return py::make_tuple(std::move(flat), std::move(lengths), std::move(declined));
          },
          py::arg("texts"),
          "-> (int32 ids of the texts taken, concatenated; int64 ids per text; bool per text: declined, "
          "with no ids)");
}
