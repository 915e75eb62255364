// Every operator schema of the tsqlora_ext library, in one place.
//
// Backends register implementations in their own files with TORCH_LIBRARY_IMPL(tsqlora_ext,
// CPU|CUDA, m); fake (meta) kernels and autograd formulas are registered from Python
// (tsqlora_ext/ops.py) through torch.library, so the ops work under torch.compile and opcheck.
#include <torch/library.h>

TORCH_LIBRARY(tsqlora_ext, m) {
  // ---- sensitivity and rank reallocation (csrc/sensitivity/, csrc/realloc/) ------------------
  // Fused importance update over all adapted layers: updates ipt_avg / unc_avg (the EMAs of
  // |p * grad| and of its deviation) and the scores of active components in place; counters
  // [updates applied, steps skipped for non-finite gradients]. No outputs, no host sync.
  m.def(
      "sensitivity_update(Tensor[] lora_A, Tensor[] lora_E, Tensor[] lora_B, Tensor[] grad_A, "
      "Tensor[] grad_E, Tensor[] grad_B, Tensor(a!)[] ipt_avg, Tensor(b!)[] unc_avg, "
      "Tensor active_mask, Tensor(c!) scores, Tensor(d!) counters, float beta1, float beta2) -> ()");
  // sum |weight ⊙ (grad_outᵀ x)| as a 0-d tensor, reduced tile by tile.
  m.def("layer_sensitivity(Tensor weight, Tensor x, Tensor grad_out) -> Tensor");
  // Keep-mask [n] of the best min(budget, sum r_max) components under per-layer bounds.
  m.def("topk_realloc(Tensor scores, int[] sizes, int[] r_min, int[] r_max, int budget) -> Tensor");
}
