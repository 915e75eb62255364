// Every operator schema of the tsqlora_ext library, in one place.
//
// Backends register implementations in their own files with TORCH_LIBRARY_IMPL(tsqlora_ext,
// CPU|CUDA, m); fake (meta) kernels and autograd formulas are registered from Python
// (tsqlora_ext/ops.py) through torch.library, so the ops work under torch.compile and opcheck.
#include <torch/library.h>

TORCH_LIBRARY(tsqlora_ext, m) {
}
