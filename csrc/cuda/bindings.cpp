// pybind11 binding of the optional CUDA gather: polygrad_fast._buffer_cuda.gather_rows(src_ptr, idx_ptr, dst_ptr,
// n_rows, row_bytes, stream=0) with raw device pointers (e.g. torch tensors' data_ptr()). Untested: no GPU here.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "window_gather.h"

namespace py = pybind11;

PYBIND11_MODULE(_buffer_cuda, m) {
  m.doc() = "Optional CUDA row gather for polygrad_fast's trajectory buffer (raw device pointers)";
  m.def(
      "gather_rows",
      [](uintptr_t src, uintptr_t idx, uintptr_t dst, int64_t n_rows, int64_t row_bytes, uintptr_t stream) {
        int err;
        {
          py::gil_scoped_release release;
          err = pgf_cuda::gather_rows(reinterpret_cast<const void*>(src), reinterpret_cast<const int64_t*>(idx),
                                      reinterpret_cast<void*>(dst), n_rows, row_bytes,
                                      reinterpret_cast<cudaStream_t>(stream));
        }
        if (err != 0) throw std::runtime_error(std::string("gather_rows: ") + cudaGetErrorString(
                                                   static_cast<cudaError_t>(err)));
      },
      py::arg("src_ptr"), py::arg("idx_ptr"), py::arg("dst_ptr"), py::arg("n_rows"), py::arg("row_bytes"),
      py::arg("stream") = 0);
}
