// The Python form of a ByteBpeSpec (csrc/byte_bpe.h), shared by the modules that build a ByteBpe:
// (vocab: list[bytes], merges: int32 array of (left, right, merged) rows, steps: list[int],
// ignore_merges: bool, reserved: list[bytes]), as megafim.data.tokenizer_hf.HFTokenizer.byte_bpe_spec
// returns it.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "byte_bpe.h"

namespace megafim {

inline ByteBpeSpec byte_bpe_spec_from_python(const pybind11::tuple& t) {
  namespace py = pybind11;
  if (t.size() != 5)
    throw std::invalid_argument("byte-level BPE spec: (vocab, merges, steps, ignore_merges, reserved) expected");
  ByteBpeSpec spec;
  for (const py::handle& b : t[0].cast<py::list>()) spec.vocab.push_back(b.cast<std::string>());
  auto merges = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(t[1]);
  if (!merges || merges.ndim() != 2 || merges.shape(1) != 3)
    throw std::invalid_argument("byte-level BPE spec: merges must be an (n, 3) int32 array");
  spec.merges.assign(merges.data(), merges.data() + merges.size());
  spec.steps = t[2].cast<std::vector<int>>();
  spec.ignore_merges = t[3].cast<bool>();
  for (const py::handle& b : t[4].cast<py::list>()) spec.reserved.push_back(b.cast<std::string>());
  return spec;
}

}  // namespace megafim
