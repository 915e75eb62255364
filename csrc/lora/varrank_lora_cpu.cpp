// Variable-rank LoRA linear, CPU backend: y = x Wᵀ + b + s·((x_lora A_actᵀ) ⊙ E_act) B_actᵀ and its
// backward (the algorithm and its memory layout are in varrank_lora.h).
//
// The GEMMs go to MKL/OpenBLAS through ATen (they are multi-threaded there). The two fused kernels
// here touch only [out, r] / [out, r_max] values and are split over output rows with
// at::parallel_for; scale factors s·E[act[k]] are formed once in the accumulation type (float for
// bf16/fp16), so low-precision inputs round once per element, not twice.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "lora/varrank_lora.h"

namespace tsq::lora {
namespace {

// Rows of [out, *] per parallel task: enough work per task to amortise the scheduling.
constexpr int64_t kRowGrain = 64;

// The ids must index B's columns without a bounds check in the loops below, and must be strictly
// increasing: unique (a duplicated id would scatter two gradients into one slot), and sorted so
// that r == r_max means exactly 0..r_max-1 (varrank_lora.h then uses A as it is). r values, so
// this is cheap.
void check_active_ids(const at::Tensor& active, int64_t r_max) {
  const int64_t* act = active.data_ptr<int64_t>();
  for (int64_t k = 0; k < active.numel(); ++k) {
    TORCH_CHECK(act[k] >= 0 && act[k] < r_max, "varrank_lora: active[", k, "] = ", act[k],
                " is outside [0, r_max=", r_max, ")");
    TORCH_CHECK(k == 0 || act[k] > act[k - 1], "varrank_lora: active must be strictly increasing "
                "(sorted component ids, no repeats), but active[", k, "] = ", act[k],
                " follows ", act[k - 1]);
  }
}

template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> scaled_E(const scalar_t* E, const int64_t* act, int64_t r,
                                                double s) {
  std::vector<at::opmath_type<scalar_t>> se(r);
  for (int64_t k = 0; k < r; ++k) se[k] = static_cast<at::opmath_type<scalar_t>>(s * double(E[act[k]]));
  return se;
}

at::Tensor gather_rows_cpu(const at::Tensor& A, const at::Tensor& act) {
  return A.index_select(0, act);
}

at::Tensor gather_scale_B_cpu(const at::Tensor& B, const at::Tensor& E, const at::Tensor& act,
                              double s) {
  const int64_t out = B.size(0), r_max = B.size(1), r = act.numel();
  at::Tensor BseT = at::empty({r, out}, B.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, B.scalar_type(), "gather_scale_B", [&] {
    const scalar_t* b = B.data_ptr<scalar_t>();        // [out, r_max]
    const int64_t* a = act.data_ptr<int64_t>();        // [r]
    scalar_t* o = BseT.data_ptr<scalar_t>();           // [r, out]
    const auto se = scaled_E(E.data_ptr<scalar_t>(), a, r, s);
    at::parallel_for(0, out, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        for (int64_t k = 0; k < r; ++k)
          o[k * out + row] = static_cast<scalar_t>(se[k] * b[row * r_max + a[k]]);
    });
  });
  return BseT;
}

std::tuple<at::Tensor, at::Tensor> grad_B_E_cpu(const at::Tensor& Pt, const at::Tensor& B,
                                                const at::Tensor& E, const at::Tensor& act,
                                                double s) {
  const int64_t out = B.size(0), r_max = B.size(1), r = act.numel();
  at::Tensor dB = grad_buffer(B, r == r_max);
  at::Tensor dE = grad_buffer(E, r == r_max);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, B.scalar_type(), "grad_B_E", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor Pc = Pt.contiguous();
    const scalar_t* p = Pc.data_ptr<scalar_t>();       // [r, out]
    const scalar_t* b = B.data_ptr<scalar_t>();        // [out, r_max]
    const int64_t* a = act.data_ptr<int64_t>();        // [r]
    scalar_t* db = dB.data_ptr<scalar_t>();            // [out, r_max]
    scalar_t* de = dE.data_ptr<scalar_t>();            // [r_max]
    const auto se = scaled_E(E.data_ptr<scalar_t>(), a, r, s);
    at::parallel_for(0, out, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        for (int64_t k = 0; k < r; ++k)
          db[row * r_max + a[k]] = static_cast<scalar_t>(se[k] * acc_t(p[k * out + row]));
    });
    // dE[act[k]] = s·Σ_o B[o, act[k]]·Pt[k, o]: one task per component, accumulated in acc_t.
    at::parallel_for(0, r, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        acc_t sum = 0;
        for (int64_t row = 0; row < out; ++row)
          sum += acc_t(b[row * r_max + a[k]]) * acc_t(p[k * out + row]);
        de[a[k]] = static_cast<scalar_t>(acc_t(s) * sum);
      }
    });
  });
  return {dB, dE};
}

constexpr Kernels kCpuKernels{gather_rows_cpu, gather_scale_B_cpu, grad_B_E_cpu};

std::tuple<at::Tensor, at::Tensor> varrank_lora_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& x_lora, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_E,
    const at::Tensor& lora_B, const at::Tensor& active, double scaling) {
  check_inputs("varrank_lora", x, x_lora, weight, lora_A, lora_E, lora_B, active);
  check_active_ids(active.contiguous(), lora_A.size(0));
  return forward(kCpuKernels, x, x_lora, weight, bias, lora_A, lora_E, lora_B, active, scaling);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> varrank_lora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& x_lora,
    const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_E,
    const at::Tensor& lora_B, const at::Tensor& active, double scaling, const at::Tensor& xa,
    bool need_dx, bool need_dx_lora) {
  check_inputs("varrank_lora_backward", x, x_lora, weight, lora_A, lora_E, lora_B, active);
  check_active_ids(active.contiguous(), lora_A.size(0));
  return backward(kCpuKernels, grad_y, x, x_lora, weight, lora_A, lora_E, lora_B, active, scaling,
                  xa, need_dx, need_dx_lora);
}

}  // namespace
}  // namespace tsq::lora

TORCH_LIBRARY_IMPL(tsqlora_ext, CPU, m) {
  m.impl("varrank_lora", &tsq::lora::varrank_lora_cpu);
  m.impl("varrank_lora_backward", &tsq::lora::varrank_lora_backward_cpu);
}
