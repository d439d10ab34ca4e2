// Python module megafim._native.byte_bpe: the byte-level BPE encoder of csrc/byte_bpe.h on its own,
// for tests against the `tokenizers` library (FIM uses the header directly, csrc/fim.cpp).
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
          [](const ByteBpe& self, const std::string& text) -> py::object {
            std::vector<int32_t> ids;
            bool ok;
            {
              py::gil_scoped_release nogil;
              ok = self.encode(text, ids);
            }
            if (!ok) return py::none();
            return py::cast(ids);
          },
          py::arg("text"), "-> list[int], or None when the text is not ASCII or holds a reserved text");
}
