// Variable-rank LoRA linear, CUDA backend: y = x Wᵀ + b + s·((x_lora A_actᵀ) ⊙ E_act) B_actᵀ and its
// backward. The algorithm (shared with the CPU backend) and the memory layout are in
// varrank_lora.h: the GEMMs run on cuBLAS through ATen on the current stream; this file holds the
// three small kernels around them.
//
//   gather_rows    : A_act[k, j] = A[act[k], j]                  [r, in]    (r < r_max only)
//   gather_scale_B : BseT[k, o] = s·E[act[k]]·B[o, act[k]]       [r, out]   (forward and backward)
//   grad_B_E       : dB[o, act[k]] = s·E[act[k]]·Pt[k, o]          [out, r_max], zeros elsewhere
//                    dE[act[k]] = s·Σ_o B[o, act[k]]·Pt[k, o]      [r_max],      zeros elsewhere
//
// Each touches O(out·r) or O(in·r) values, against O(N·out·r) FLOPs in the GEMMs, so they are
// written for clarity: one thread per element (grid-stride) for the two gathers, one block per
// component for grad_B_E. (gather_rows replaces A.index_select: ATen's small-index kernel took
// 11 us for a 16x4096 gather on an H200.) Arithmetic is in at::opmath_type (float for bf16/fp16,
// double for float64), rounded once on store; s arrives as a double, so float64 keeps all of
// alpha / r_init.
// Active ids are checked on the device (CUDA_KERNEL_ASSERT: in range and strictly increasing),
// never copied to the host (VarRankLoRALinear.set_active keeps them sorted and unique).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "lora/varrank_lora.h"

namespace tsq::lora {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
}

// act[k] in [0, r_max) and above act[k - 1]: the ids varrank_lora.h relies on.
__device__ __forceinline__ int64_t checked_id(const int64_t* act, int64_t k, int64_t r_max) {
  const int64_t id = act[k];
  CUDA_KERNEL_ASSERT(id >= 0 && id < r_max && (k == 0 || id > act[k - 1]));
  return id;
}

template <typename scalar_t>
__global__ void gather_rows_kernel(const scalar_t* __restrict__ A,         // [r_max, in]
                                   const int64_t* __restrict__ act,        // [r]
                                   scalar_t* __restrict__ A_act,           // [r, in]
                                   int64_t in, int64_t r_max, int64_t r) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < in * r;
       i += int64_t(gridDim.x) * blockDim.x) {
    A_act[i] = A[checked_id(act, i / in, r_max) * in + i % in];
  }
}

template <typename scalar_t>
__global__ void gather_scale_B_kernel(const scalar_t* __restrict__ B,      // [out, r_max]
                                      const scalar_t* __restrict__ E,      // [r_max]
                                      const int64_t* __restrict__ act,     // [r]
                                      scalar_t* __restrict__ BseT,         // [r, out]
                                      int64_t out, int64_t r_max, int64_t r, double s) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < out * r;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = i % out, id = checked_id(act, i / out, r_max);
    BseT[i] = static_cast<scalar_t>(acc_t(s) * acc_t(E[id]) * acc_t(B[o * r_max + id]));
  }
}

// One block per active component k; its threads stride over the out rows, writing
// dB[o, id] = s·E[id]·Pt[k, o] and summing B[o, id]·Pt[k, o] for dE[id] from the same read of Pt
// (one launch instead of a scatter and a reduction that each read Pt). 512 threads: with only r
// blocks, the rows each thread walks in sequence are what bounds the time.
constexpr int kGradThreads = 512;

template <typename scalar_t>
__global__ void __launch_bounds__(kGradThreads) grad_B_E_kernel(
    const scalar_t* __restrict__ Pt,          // [r, out]
    const scalar_t* __restrict__ B,           // [out, r_max]
    const scalar_t* __restrict__ E,           // [r_max]
    const int64_t* __restrict__ act,          // [r]
    scalar_t* __restrict__ dB,                // [out, r_max], zero outside the active columns
    scalar_t* __restrict__ dE,                // [r_max], zero outside the active ids
    int64_t out, int64_t r_max, double s) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t partial[kGradThreads];
  const int64_t k = blockIdx.x, id = checked_id(act, k, r_max);
  const acc_t se = acc_t(s) * acc_t(E[id]);
  acc_t sum = 0;
  for (int64_t o = threadIdx.x; o < out; o += blockDim.x) {
    const acc_t p = acc_t(Pt[k * out + o]);
    dB[o * r_max + id] = static_cast<scalar_t>(se * p);
    sum += acc_t(B[o * r_max + id]) * p;
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) dE[id] = static_cast<scalar_t>(acc_t(s) * partial[0]);
}

void check_kernel_args(const char* what, const at::Tensor& B, const at::Tensor& E,
                       const at::Tensor& act) {
  TORCH_CHECK(B.is_cuda() && E.is_cuda() && act.is_cuda(), what, ": tensors must be on CUDA");
  TORCH_CHECK(B.is_contiguous() && E.is_contiguous() && act.is_contiguous(), what,
              ": lora_B, lora_E and active must be contiguous");
  TORCH_CHECK(B.dim() == 2 && E.dim() == 1 && E.size(0) == B.size(1), what,
              ": lora_B must be [out, r_max] and lora_E [r_max]");
  TORCH_CHECK(E.scalar_type() == B.scalar_type() && act.scalar_type() == at::kLong, what,
              ": dtype mismatch (lora_E must match lora_B; active must be int64)");
}

at::Tensor gather_rows_cuda(const at::Tensor& A, const at::Tensor& act) {
  TORCH_CHECK(A.is_cuda() && act.is_cuda() && A.is_contiguous() && act.is_contiguous() &&
                  A.dim() == 2 && act.scalar_type() == at::kLong,
              "gather_rows: lora_A must be a contiguous [r_max, in] CUDA tensor and active int64");
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t r_max = A.size(0), in = A.size(1), r = act.numel();
  at::Tensor A_act = at::empty({r, in}, A.options());
  if (A_act.numel() == 0) return A_act;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, A.scalar_type(), "gather_rows", [&] {
    gather_rows_kernel<scalar_t><<<blocks_for(in * r), kThreads, 0, stream>>>(
        A.data_ptr<scalar_t>(), act.data_ptr<int64_t>(), A_act.data_ptr<scalar_t>(), in, r_max, r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return A_act;
}

at::Tensor gather_scale_B_cuda(const at::Tensor& B, const at::Tensor& E, const at::Tensor& act,
                               double s) {
  check_kernel_args("gather_scale_B", B, E, act);
  const c10::cuda::CUDAGuard guard(B.device());
  const int64_t out = B.size(0), r_max = B.size(1), r = act.numel();
  at::Tensor BseT = at::empty({r, out}, B.options());
  if (BseT.numel() == 0) return BseT;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, B.scalar_type(), "gather_scale_B", [&] {
    gather_scale_B_kernel<scalar_t><<<blocks_for(out * r), kThreads, 0, stream>>>(
        B.data_ptr<scalar_t>(), E.data_ptr<scalar_t>(), act.data_ptr<int64_t>(),
        BseT.data_ptr<scalar_t>(), out, r_max, r, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return BseT;
}

std::tuple<at::Tensor, at::Tensor> grad_B_E_cuda(const at::Tensor& Pt_in, const at::Tensor& B,
                                                 const at::Tensor& E, const at::Tensor& act,
                                                 double s) {
  check_kernel_args("grad_B_E", B, E, act);
  const int64_t out = B.size(0), r_max = B.size(1), r = act.numel();
  TORCH_CHECK(Pt_in.is_cuda() && Pt_in.scalar_type() == B.scalar_type() && Pt_in.dim() == 2 &&
                  Pt_in.size(0) == r && Pt_in.size(1) == out,
              "grad_B_E: Pt = xaᵀ dy must be an [r, out] tensor of lora_B's dtype");
  const at::Tensor Pt = Pt_in.contiguous();
  const c10::cuda::CUDAGuard guard(B.device());
  at::Tensor dB = grad_buffer(B, r == r_max);
  at::Tensor dE = grad_buffer(E, r == r_max);
  if (Pt.numel() == 0) return {dB, dE.zero_()};  // out == 0: dE is an empty sum
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, B.scalar_type(), "grad_B_E", [&] {
    grad_B_E_kernel<scalar_t><<<static_cast<unsigned>(r), kGradThreads, 0, stream>>>(
        Pt.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(), E.data_ptr<scalar_t>(),
        act.data_ptr<int64_t>(), dB.data_ptr<scalar_t>(), dE.data_ptr<scalar_t>(), out, r_max, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dB, dE};
}

constexpr Kernels kCudaKernels{gather_rows_cuda, gather_scale_B_cuda, grad_B_E_cuda};

std::tuple<at::Tensor, at::Tensor> varrank_lora_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& x_lora, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_E,
    const at::Tensor& lora_B, const at::Tensor& active, double scaling) {
  check_inputs("varrank_lora", x, x_lora, weight, lora_A, lora_E, lora_B, active);
  const c10::cuda::CUDAGuard guard(x.device());
  return forward(kCudaKernels, x, x_lora, weight, bias, lora_A, lora_E, lora_B, active, scaling);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> varrank_lora_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& x_lora,
    const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_E,
    const at::Tensor& lora_B, const at::Tensor& active, double scaling, const at::Tensor& xa,
    bool need_dx, bool need_dx_lora) {
  check_inputs("varrank_lora_backward", x, x_lora, weight, lora_A, lora_E, lora_B, active);
  const c10::cuda::CUDAGuard guard(x.device());
  return backward(kCudaKernels, grad_y, x, x_lora, weight, lora_A, lora_E, lora_B, active, scaling,
                  xa, need_dx, need_dx_lora);
}

}  // namespace
}  // namespace tsq::lora

TORCH_LIBRARY_IMPL(tsqlora_ext, CUDA, m) {
  m.impl("varrank_lora", &tsq::lora::varrank_lora_cuda);
  m.impl("varrank_lora_backward", &tsq::lora::varrank_lora_backward_cuda);
}
