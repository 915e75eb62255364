// Input validation shared by the CPU and CUDA backends of the sensitivity ops, so both reject the
// same bad input with the same message.
//
// sensitivity_update takes, for L adapted layers l = 0..L-1 with r_l components:
//   lora_A[l], grad_A[l]: [r_l, in_l]      lora_E[l], grad_E[l]: [r_l]
//   lora_B[l], grad_B[l]: [out_l, r_l]     ipt_avg[l], unc_avg[l]: float32 [r_l*in_l + r_l + out_l*r_l]
// (the EMA state of one layer is one flat buffer holding A's, then E's, then B's elements, in
// their row-major order), plus active_mask: bool [sum r_l], scores: float32 [sum r_l] and
// counters: int64 [2] = {updates applied, steps skipped for non-finite gradients}.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace tsq::sensitivity {

// The EMA weights in float32 as the reference (and PEFT's update_ipt) apply them: beta and
// 1 - beta each rounded from double. 1.f - float(beta) differs by an ulp, which beta2 = 0 turns
// into a nonzero Ubar (|I - Ibar| cancels) where the reference has 0.
struct EmaWeights {
  float b1, c1, b2, c2;  // beta1, 1 - beta1, beta2, 1 - beta2
};
inline EmaWeights ema_weights(double beta1, double beta2) {
  return {static_cast<float>(beta1), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
          static_cast<float>(1.0 - beta2)};
}

// The active mask's bytes, read as "nonzero = active": a bool tensor viewed from uint8 can hold 2,
// where code reading it as C++ bool may test one bit (a NaN in an active component's gradient
// then went unseen by the finite check while the update applied it).
inline const uint8_t* mask_bytes(const at::Tensor& active_mask) {
  return reinterpret_cast<const uint8_t*>(active_mask.const_data_ptr<bool>());
}

// Per-layer sizes, gathered while checking; comp_offset[l] = sum_{m<l} r_m.
struct LayerShapes {
  std::vector<int64_t> in, out, r, comp_offset;
  int64_t n_components = 0;
};

inline void check_same(const at::Tensor& t, const at::Tensor& like, const char* what, size_t l) {
  TORCH_CHECK(t.sizes() == like.sizes(), "sensitivity_update: ", what, "[", l, "] has shape ",
              t.sizes(), ", expected ", like.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "sensitivity_update: ", what, "[", l,
              "] has dtype ", t.scalar_type(), ", expected ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "sensitivity_update: ", what, "[", l, "] is on ",
              t.device(), ", expected ", like.device());
  TORCH_CHECK(t.is_contiguous(), "sensitivity_update: ", what, "[", l, "] must be contiguous");
}

inline LayerShapes check_update_inputs(
    at::TensorList A, at::TensorList E, at::TensorList B, at::TensorList gA, at::TensorList gE,
    at::TensorList gB, at::TensorList ipt, at::TensorList unc, const at::Tensor& active_mask,
    const at::Tensor& scores, const at::Tensor& counters, double beta1, double beta2) {
  const size_t L = A.size();
  TORCH_CHECK(L >= 1, "sensitivity_update: lora_A must hold at least one layer");
  TORCH_CHECK(E.size() == L && B.size() == L && gA.size() == L && gE.size() == L &&
                  gB.size() == L && ipt.size() == L && unc.size() == L,
              "sensitivity_update: every tensor list must hold one entry per layer (", L,
              " in lora_A); got lora_E ", E.size(), ", lora_B ", B.size(), ", grad_A ", gA.size(),
              ", grad_E ", gE.size(), ", grad_B ", gB.size(), ", ipt_avg ", ipt.size(),
              ", unc_avg ", unc.size());
  TORCH_CHECK(0.0 <= beta1 && beta1 < 1.0 && 0.0 <= beta2 && beta2 < 1.0,
              "sensitivity_update: beta1 and beta2 must lie in [0, 1), got ", beta1, ", ", beta2);
  const auto dtype = A[0].scalar_type();
  const auto device = A[0].device();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              "sensitivity_update: lora_A must be float32, float64, bfloat16 or float16, got ",
              dtype);
  LayerShapes s;
  for (size_t l = 0; l < L; ++l) {
    TORCH_CHECK(A[l].dim() == 2, "sensitivity_update: lora_A[", l, "] must be [r, in], got ",
                A[l].sizes());
    const int64_t r = A[l].size(0), in = A[l].size(1);
    TORCH_CHECK(r >= 1 && in >= 1, "sensitivity_update: lora_A[", l, "] is empty: ", A[l].sizes());
    TORCH_CHECK(A[l].scalar_type() == dtype && A[l].device() == device,
                "sensitivity_update: lora_A[", l, "] is ", A[l].scalar_type(), " on ",
                A[l].device(), ", but lora_A[0] is ", dtype, " on ", device,
                " (all layers must share dtype and device)");
    TORCH_CHECK(A[l].is_contiguous(), "sensitivity_update: lora_A[", l, "] must be contiguous");
    TORCH_CHECK(E[l].dim() == 1 && E[l].size(0) == r, "sensitivity_update: lora_E[", l,
                "] must be [r=", r, "], got ", E[l].sizes());
    TORCH_CHECK(B[l].dim() == 2 && B[l].size(1) == r && B[l].size(0) >= 1,
                "sensitivity_update: lora_B[", l, "] must be [out, r=", r, "], got ", B[l].sizes());
    for (const auto& [t, what] : {std::pair{E[l], "lora_E"}, std::pair{B[l], "lora_B"}}) {
      TORCH_CHECK(t.scalar_type() == dtype && t.device() == device && t.is_contiguous(),
                  "sensitivity_update: ", what, "[", l, "] must be a contiguous ", dtype,
                  " tensor on ", device, ", got ", t.is_contiguous() ? "" : "non-contiguous ",
                  t.scalar_type(), " on ", t.device());
    }
    check_same(gA[l], A[l], "grad_A", l);
    check_same(gE[l], E[l], "grad_E", l);
    check_same(gB[l], B[l], "grad_B", l);
    const int64_t out = B[l].size(0);
    const int64_t numel = r * in + r + out * r;
    for (const auto& [t, what] : {std::pair{ipt[l], "ipt_avg"}, std::pair{unc[l], "unc_avg"}}) {
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.device() == device && t.is_contiguous() &&
                      t.numel() == numel,
                  "sensitivity_update: ", what, "[", l, "] must be a contiguous float32 tensor of ",
                  numel, " elements (A, E, B of layer ", l, ") on ", device, ", got ",
                  t.is_contiguous() ? "" : "non-contiguous ", t.scalar_type(), " ", t.sizes(),
                  " on ", t.device());
    }
    s.in.push_back(in);
    s.out.push_back(out);
    s.r.push_back(r);
    s.comp_offset.push_back(s.n_components);
    s.n_components += r;
  }
  TORCH_CHECK(active_mask.scalar_type() == at::kBool && active_mask.device() == device &&
                  active_mask.is_contiguous() && active_mask.numel() == s.n_components,
              "sensitivity_update: active_mask must be a contiguous bool tensor of ",
              s.n_components, " elements (sum of ranks) on ", device, ", got ",
              active_mask.is_contiguous() ? "" : "non-contiguous ", active_mask.scalar_type(), " ",
              active_mask.sizes(), " on ", active_mask.device());
  TORCH_CHECK(scores.scalar_type() == at::kFloat && scores.device() == device &&
                  scores.is_contiguous() && scores.numel() == s.n_components,
              "sensitivity_update: scores must be a contiguous float32 tensor of ", s.n_components,
              " elements on ", device, ", got ", scores.is_contiguous() ? "" : "non-contiguous ",
              scores.scalar_type(), " ", scores.sizes(), " on ", scores.device());
  TORCH_CHECK(counters.scalar_type() == at::kLong && counters.device() == device &&
                  counters.is_contiguous() && counters.numel() == 2,
              "sensitivity_update: counters must be a contiguous int64 tensor of 2 elements on ",
              device, ", got ", counters.is_contiguous() ? "" : "non-contiguous ",
              counters.scalar_type(), " ", counters.sizes(), " on ", counters.device());
  return s;
}

// layer_sensitivity(weight [out, in], x [..., in], grad_out [..., out]) -> 0-d tensor.
// Returns x and grad_out flattened to 2-D in the compute dtype (float64 if any input is float64,
// else float32) together with the weight in that dtype. The backends exclude autocast's dispatch
// keys first: inside an autocast region their at::mm would otherwise come back in bf16/fp16.
struct LayerSensInputs {
  at::Tensor w, x, d;
};

inline LayerSensInputs check_layer_sensitivity_inputs(const at::Tensor& weight,
                                                      const at::Tensor& x,
                                                      const at::Tensor& grad_out) {
  TORCH_CHECK(weight.dim() == 2 && weight.numel() > 0,
              "layer_sensitivity: weight must be a non-empty [out, in] matrix, got ", weight.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "layer_sensitivity: x must be [..., in=",
              weight.size(1), "], got ", x.sizes());
  TORCH_CHECK(grad_out.dim() >= 1 && grad_out.size(-1) == weight.size(0),
              "layer_sensitivity: grad_out must be [..., out=", weight.size(0), "], got ",
              grad_out.sizes());
  // Equal leading dimensions, not only equal row counts: x [2, 6, in] against grad_out
  // [3, 4, out] pairs rows of different tokens, which is a caller's mistake, not a layout.
  TORCH_CHECK(x.sizes().slice(0, x.dim() - 1) == grad_out.sizes().slice(0, grad_out.dim() - 1),
              "layer_sensitivity: x ", x.sizes(), " and grad_out ", grad_out.sizes(),
              " must have the same leading dimensions (one output gradient per input row)");
  for (const auto& [t, what] :
       {std::pair{weight, "weight"}, std::pair{x, "x"}, std::pair{grad_out, "grad_out"}}) {
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "layer_sensitivity: ", what,
                " must be floating point, got ", t.scalar_type());
    TORCH_CHECK(t.device() == weight.device(), "layer_sensitivity: ", what, " is on ", t.device(),
                ", weight on ", weight.device());
  }
  const bool dbl = weight.scalar_type() == at::kDouble || x.scalar_type() == at::kDouble ||
                   grad_out.scalar_type() == at::kDouble;
  const auto ct = dbl ? at::kDouble : at::kFloat;
  return {weight.to(ct).contiguous(), x.reshape({-1, x.size(-1)}).to(ct).contiguous(),
          grad_out.reshape({-1, grad_out.size(-1)}).to(ct).contiguous()};
}

}  // namespace tsq::sensitivity
