// Variable-rank LoRA linear: the host-side algorithm shared by the CPU and the CUDA backend.
//
// Forward (SVD form, DESIGN.md), for x: [N, in] (leading dims flattened), the active ids
// act: [r] (strictly increasing, 0 <= act[k] < r_max; r may be 0) and s = scaling:
//
//     xa = x_lora A_actᵀ                 [N, r]        saved for backward
//     y  = b + xa · BseT,  BseT[k,o] = s·E[act[k]]·B[o,act[k]]  [r, out]
//     y += x Wᵀ                                        the base GEMM, accumulating (beta = 1)
//
// Backward, with g = dy: [N, out]:
//
//     geT = BseT · dyᵀ                   [r, N]   (= (s·(dy B_act) ⊙ E_act)ᵀ)
//     dA[act[k], :] = (geT x_lora)[k, :]
//     Pt  = xaᵀ dy                       [r, out]
//     dB[:, act[k]] = s·E[act[k]]·Pt[k, :]
//     dE[act[k]]    = s·Σ_o B[o, act[k]]·Pt[k, o]
//     dx  = (geTᵀ A_act when x_lora is x itself) + dy W,  dx_lora = geTᵀ A_act otherwise
//
// The thin products are laid out rank-major ([r, N], [r, out]): measured with MKL on these
// machines, xaᵀ·dy runs 3-5x faster than dyᵀ·xa at 512x384 (the [out, r] output with r = 8 is a
// degenerate GEMM shape for it), and no slower at 4096x2048x5632.
//
// dA, dE, dB have the full [r_max, ...] shapes with exact zeros outside the active set, so an
// optimizer sees parameters that never change shape; they are contiguous whatever the
// parameters' strides (as the fake kernel in ops.py says). W and b are frozen: no gradient.
//
// Why the base GEMM is not fused with the adapter's x·A_actᵀ (which would read x once): fusing
// needs one weight [W; A_act] of shape [out + r, in], i.e. a copy of all of W every call (W is the
// large operand: 2048x5632 is 46 MB in fp32) or storage that ties the frozen weight to the
// adapter's Parameters. The unfused second read of x costs N·in loads against the base GEMM's
// N·in·out FLOPs: a few percent at most. So both GEMMs go to the vendor BLAS (MKL/OpenBLAS on CPU,
// cuBLAS on CUDA) through ATen.
//
// Order: the adapter's rank-r product is written into y (and dx) first, and the large base GEMM
// then accumulates onto it (addmm_, beta = 1). The other order (base GEMM, then y += xa·BseT)
// makes the rank-r GEMM read and write all of y: on an H200 at 8192x4096 bf16 that pass took
// 46 us of a 344 us base GEMM, while a compute-bound GEMM reads its C operand in the epilogue
// nearly for free. No extra [N, out] or [N, in] temporaries are written either way.
//
// All active (r == r_max): the ids are strictly increasing, so act is 0..r_max-1 and A, dA are
// used as they are (no gather of A's rows, no zero-filled dA scattered into); this is the common
// case early in training and for every layer that ends at its r_max.
//
// The small fused steps (the gather of A's active rows, gather + scale of B's active columns, and
// the scatter of dB / reduction of dE) are per-backend kernels, passed in as a `Kernels` struct
// so this file holds the algorithm once. Rank r is a runtime shape (active.numel()), never a
// compile-time constant.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/accumulate.h>

#include <tuple>

namespace tsq::lora {

// The backend's fused element-wise kernels. All tensors contiguous, on one device, one dtype
// (active: int64).
struct Kernels {
  // A_act = A[act]: [r_max, in] -> [r, in].
  at::Tensor (*gather_rows)(const at::Tensor& A, const at::Tensor& act);
  // BseT[k, o] = s·E[act[k]]·B[o, act[k]]. B: [out, r_max], E: [r_max], act: [r] -> [r, out].
  at::Tensor (*gather_scale_B)(const at::Tensor& B, const at::Tensor& E, const at::Tensor& act,
                               double s);
  // From Pt = xaᵀ dy [r, out]: dB [out, r_max] and dE [r_max], zero outside the active set.
  // (With r == r_max every element is written, so they need no zero fill.)
  std::tuple<at::Tensor, at::Tensor> (*grad_B_E)(const at::Tensor& P, const at::Tensor& B,
                                                 const at::Tensor& E, const at::Tensor& act,
                                                 double s);
};

inline void check_inputs(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& x_lora,
                         const at::Tensor& weight, const at::Tensor& A, const at::Tensor& E,
                         const at::Tensor& B, const at::Tensor& active) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension, got a scalar");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [out, in], got ", weight.sizes());
  const int64_t in = weight.size(1), out = weight.size(0);
  TORCH_CHECK(x.size(-1) == in, op, ": x's last dim ", x.size(-1), " != weight's in_features ", in);
  TORCH_CHECK(A.dim() == 2 && A.size(1) == in, op, ": lora_A must be [r_max, in=", in, "], got ",
              A.sizes());
  const int64_t r_max = A.size(0);
  TORCH_CHECK(E.dim() == 1 && E.size(0) == r_max, op, ": lora_E must be [r_max=", r_max, "], got ",
              E.sizes());
  TORCH_CHECK(B.dim() == 2 && B.size(0) == out && B.size(1) == r_max, op, ": lora_B must be [out=",
              out, ", r_max=", r_max, "], got ", B.sizes());
  TORCH_CHECK(active.dim() == 1 && active.scalar_type() == at::kLong, op,
              ": active must be a 1-D int64 tensor of component ids, got ", active.scalar_type(),
              " ", active.sizes());
  TORCH_CHECK(active.numel() <= r_max, op, ": active has ", active.numel(),
              " ids but r_max is ", r_max);
  const auto dt = x.scalar_type();
  TORCH_CHECK(at::isFloatingType(dt), op, ": x must be floating point, got ", dt);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"weight", &weight},
                                {"lora_A", &A}, {"lora_E", &E}, {"lora_B", &B}}) {
    TORCH_CHECK(t->scalar_type() == dt, op, ": ", name, " has dtype ", t->scalar_type(),
                " but x has ", dt, " (cast the layer or the input)");
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ",
                x.device());
  }
  TORCH_CHECK(active.device() == x.device(), op, ": active is on ", active.device(),
              " but x is on ", x.device());
  if (x_lora.has_value()) {
    TORCH_CHECK(x_lora->sizes() == x.sizes(), op, ": x_lora must have x's shape ", x.sizes(),
                ", got ", x_lora->sizes());
    TORCH_CHECK(x_lora->scalar_type() == dt && x_lora->device() == x.device(), op,
                ": x_lora must match x's dtype and device");
  }
}

// The number of rows N of x: [..., in] seen as [N, in]. (reshape({-1, in}) cannot infer N when a
// last dimension is 0.)
inline int64_t rows_of(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
}

// The shape [..., n] for an input of shape [..., in].
inline std::vector<int64_t> with_last(const at::Tensor& x, int64_t n) {
  auto s = x.sizes().vec();
  s.back() = n;
  return s;
}

// A gradient buffer shaped like t (contiguous): zero-filled, unless every component is active and
// the backend's kernel writes every element anyway.
inline at::Tensor grad_buffer(const at::Tensor& t, bool all_active) {
  return all_active ? at::empty(t.sizes(), t.options()) : at::zeros(t.sizes(), t.options());
}

// A's rows of the active components, [r, in]: A itself when every component is active.
inline at::Tensor active_rows(const Kernels& k, const at::Tensor& A, const at::Tensor& act) {
  return act.numel() == A.size(0) ? A : k.gather_rows(A.contiguous(), act);
}

inline std::tuple<at::Tensor, at::Tensor> forward(const Kernels& k, const at::Tensor& x,
                                                  const std::optional<at::Tensor>& x_lora,
                                                  const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  const at::Tensor& A, const at::Tensor& E,
                                                  const at::Tensor& B, const at::Tensor& active,
                                                  double scaling) {
  const int64_t in = weight.size(1), out = weight.size(0), r = active.numel();
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, "varrank_lora: bias must be [out=", out,
                "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "varrank_lora: bias must match x's dtype and device");
  }
  const at::Tensor x2 = x.reshape({rows_of(x), in});
  if (r == 0) {
    // Rank 0 is the base layer, bit for bit: no adapter term is added at all.
    at::Tensor y = bias.has_value() ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
    return {y.view(with_last(x, out)), x2.new_empty(with_last(x, 0))};
  }
  const at::Tensor act = active.contiguous();
  const at::Tensor xl2 = x_lora.has_value() ? x_lora->reshape({rows_of(x), in}) : x2;
  const at::Tensor xa = at::mm(xl2, active_rows(k, A, act).t());       // [N, r]
  const at::Tensor BseT = k.gather_scale_B(B.contiguous(), E.contiguous(), act, scaling);
  at::Tensor y = bias.has_value() ? at::addmm(*bias, xa, BseT) : at::mm(xa, BseT);
  y.addmm_(x2, weight.t());
  return {y.view(with_last(x, out)), xa.view(with_last(x, r))};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const Kernels& k, const at::Tensor& grad_y, const at::Tensor& x,
    const std::optional<at::Tensor>& x_lora, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& E, const at::Tensor& B, const at::Tensor& active, double scaling,
    const at::Tensor& xa, bool need_dx, bool need_dx_lora) {
  // The op computes in its inputs' dtype. Its autograd may run inside an autocast region, which
  // would otherwise cast the GEMMs below to bf16/fp16 (the forward's autocast rule is in
  // varrank_lora_autograd.cpp).
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t in = weight.size(1), out = weight.size(0), r = active.numel();
  TORCH_CHECK(grad_y.sizes() == with_last(x, out), "varrank_lora_backward: grad_y must be ",
              with_last(x, out), ", got ", grad_y.sizes());
  TORCH_CHECK(xa.sizes() == with_last(x, r), "varrank_lora_backward: xa must be ",
              with_last(x, r), ", got ", xa.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && xa.scalar_type() == x.scalar_type(),
              "varrank_lora_backward: grad_y and xa must have x's dtype ", x.scalar_type());
  TORCH_CHECK(grad_y.device() == x.device() && xa.device() == x.device(),
              "varrank_lora_backward: grad_y and xa must be on x's device ", x.device());
  const at::Tensor dy = grad_y.reshape({rows_of(x), out});
  // dx_lora only exists when the adapter had its own input; an empty tensor means "no gradient"
  // (the autograd node in varrank_lora_autograd.cpp maps it to None).
  const bool separate = x_lora.has_value();
  // (Two distinct empty tensors: outputs of an op must never alias each other.)
  at::Tensor dx = x.new_empty({0});
  at::Tensor dx_lora = x.new_empty({0});
  if (r == 0) {
    // No active component: the adapter contributed nothing, so its gradients are exact zeros.
    if (need_dx) dx = at::mm(dy, weight).view(x.sizes());
    if (separate && need_dx_lora) dx_lora = at::zeros(x_lora->sizes(), x_lora->options());
    return {dx, dx_lora, at::zeros(A.sizes(), A.options()), at::zeros(E.sizes(), E.options()),
            at::zeros(B.sizes(), B.options())};
  }
  const at::Tensor act = active.contiguous();
  const at::Tensor Bc = B.contiguous(), Ec = E.contiguous();
  const at::Tensor xl2 = (separate ? *x_lora : x).reshape({rows_of(x), in});
  const at::Tensor A_act = active_rows(k, A, act);                          // [r, in]
  const at::Tensor geT = at::mm(k.gather_scale_B(Bc, Ec, act, scaling), dy.t());  // [r, N]

  at::Tensor dA = at::mm(geT, xl2);                                         // [r, in]
  if (r < A.size(0)) dA = at::zeros(A.sizes(), A.options()).index_copy_(0, act, dA);
  auto [dB, dE] = k.grad_B_E(at::mm(xa.reshape({rows_of(x), r}).t(), dy), Bc, Ec, act, scaling);
  if (separate) {
    if (need_dx) dx = at::mm(dy, weight).view(x.sizes());
    if (need_dx_lora) dx_lora = at::mm(geT.t(), A_act).view(x.sizes());
  } else if (need_dx) {
    dx = at::mm(geT.t(), A_act);  // the adapter's part first, then the base GEMM onto it
    dx.addmm_(dy, weight);
    dx = dx.view(x.sizes());
  }
  return {dx, dx_lora, dA, dE, dB};
}

}  // namespace tsq::lora
