// The Python extension module tsqlora_ext._C.
//
// Importing it runs the static TORCH_LIBRARY registrations of every op (registration.cpp and the
// per-backend files), so `torch.ops.tsqlora_ext.*` exist once the package is imported. This file
// is the one pybind11 bindings file: build_info() and the stateful C++ classes.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "data/bindings.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = TSQ_VERSION;
  info["torch"] = TSQ_TORCH_VERSION;
#ifdef TSQ_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  py::list archs;
  std::string list = TSQ_CUDA_ARCHS;
  size_t start = 0;
  while (start < list.size()) {
    size_t end = list.find_first_of(";, ", start);
    if (end == std::string::npos) end = list.size();
    if (end > start) archs.append(list.substr(start, end - start));
    start = end + 1;
  }
  info["cuda_archs"] = archs;
  info["cpu_threads"] = at::get_num_threads();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tsqlora_ext native core: variable-rank LoRA, sensitivity, reallocation, data selection";
  m.def("build_info", &build_info, "What this extension was compiled with.");
  tsq::data::bind_data(m);
}
