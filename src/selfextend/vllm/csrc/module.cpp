// The Python module of the SelfExtend kernels over vLLM's CPU paged KV cache: decode (decode.cpp) and
// prefill (prefill.cpp). Both release the GIL while they run.

#include "common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &selfextend_decode, "SelfExtend decode attention over vLLM's CPU paged KV cache",
        py::arg("query_plain"), py::arg("query_grouped"), py::arg("key_cache"), py::arg("value_cache"),
        py::arg("block_table"), py::arg("seq_lens"), py::arg("group_size"), py::arg("window"), py::arg("scale"),
        py::arg("cos_t"), py::arg("sin_t"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def("prefill", &selfextend_prefill,
        "SelfExtend attention of n >= 1 queries per request (vLLM's flat token layout) over vLLM's CPU paged "
        "KV cache",
        py::arg("query"), py::arg("key_cache"), py::arg("value_cache"), py::arg("query_start_loc"),
        py::arg("seq_lens"), py::arg("block_table"), py::arg("group_size"), py::arg("window"), py::arg("scale"),
        py::arg("cos_t"), py::arg("sin_t"), py::arg("out"), py::call_guard<py::gil_scoped_release>());
}
