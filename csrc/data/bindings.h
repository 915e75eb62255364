// pybind11 bindings of the data pipeline (reader, gate, selection, loader) into tsqlora_ext._C.
#pragma once

#include <torch/extension.h>

namespace tsq::data {
void bind_data(pybind11::module_& m);
}
