// Every operator schema of the tsqlora_ext library, in one place.
//
// Backends register implementations in their own files with TORCH_LIBRARY_IMPL(tsqlora_ext,
// CPU|CUDA, m), and varrank_lora's autograd and autocast rule sit at the Autograd and Autocast
// keys (csrc/lora/varrank_lora_autograd.cpp); fake (meta) kernels are registered from Python
// (tsqlora_ext/ops.py) through torch.library, so the ops work under torch.compile and opcheck.
#include <torch/library.h>

TORCH_LIBRARY(tsqlora_ext, m) {
  // ---- variable-rank LoRA linear (csrc/lora/) ------------------------------------------------
  // y = x Wᵀ + b + scaling·((x_lora A_actᵀ) ⊙ E_act) B_actᵀ with act = active (strictly
  // increasing int64 ids, its length is the rank, possibly 0). x_lora = None means x itself.
  // Returns (y, xa) with xa = x_lora A_actᵀ [..., r], kept for the backward.
  m.def(
      "varrank_lora(Tensor x, Tensor? x_lora, Tensor weight, Tensor? bias, Tensor lora_A, "
      "Tensor lora_E, Tensor lora_B, Tensor active, float scaling) -> (Tensor y, Tensor xa)");
  // Returns (dx, dx_lora, dA, dE, dB). dA/dE/dB have the full r_max shapes, zero outside the
  // active set; dx (dx_lora) is empty when need_dx (need_dx_lora) is false or x_lora is None.
  m.def(
      "varrank_lora_backward(Tensor grad_y, Tensor x, Tensor? x_lora, Tensor weight, "
      "Tensor lora_A, Tensor lora_E, Tensor lora_B, Tensor active, float scaling, Tensor xa, "
      "bool need_dx, bool need_dx_lora) -> (Tensor dx, Tensor dx_lora, Tensor dA, Tensor dE, "
      "Tensor dB)");

  // ---- sensitivity and rank reallocation (csrc/sensitivity/, csrc/realloc/) ------------------
  // Fused importance update over all adapted layers: updates ipt_avg / unc_avg (the EMAs of
  // |p * grad| and of its deviation) and the scores of active components in place; counters
  // [updates applied, steps skipped for non-finite gradients]. No outputs, no host sync.
  // check_finite=False: the caller already knows the gradients are finite (e.g. from the global
  // norm it clips with), so the op skips its own read of them.
  m.def(
      "sensitivity_update(Tensor[] lora_A, Tensor[] lora_E, Tensor[] lora_B, Tensor[] grad_A, "
      "Tensor[] grad_E, Tensor[] grad_B, Tensor(a!)[] ipt_avg, Tensor(b!)[] unc_avg, "
      "Tensor active_mask, Tensor(c!) scores, Tensor(d!) counters, float beta1, float beta2, "
      "bool check_finite=True) -> ()");
  // sum |weight ⊙ (grad_outᵀ x)| as a 0-d tensor, reduced tile by tile.
  m.def("layer_sensitivity(Tensor weight, Tensor x, Tensor grad_out) -> Tensor");
  // Keep-mask [n] of the best min(budget, sum r_max) components under per-layer bounds.
  // bounds: a CPU int64 [3, L] table (rows: sizes, r_min, r_max), read on the host. A tensor, not
  // three int[] lists: converting 3 x L Python ints cost ~1 ms per call at L = 4,167, more than
  // the selection itself.
  m.def("topk_realloc(Tensor scores, Tensor bounds, int budget) -> Tensor");
}
