// Autograd and autocast of varrank_lora, registered in C++ at the Autograd key (one kernel for
// every backend) and at the AutocastCPU / AutocastCUDA keys.
//
// Why C++ and not torch.library.register_autograd: the Python formula ran one Python autograd
// Function per layer per forward and per backward, about 100 us of host time per adapted layer
// and training step on these CPUs, more than all of PEFT LoRA's Python around its two Linear
// modules. On a GPU, training steps of small models are bound by that host time. Here the
// autograd node is C++, so the engine calls the backward without entering Python. The autocast
// rule was a Python kernel too, entered by every adapted layer's forward in a bf16 region, the
// setting GPU training runs in.
//
// The formula: the backward is the op varrank_lora_backward (dx through base and adapter, dA, dE,
// dB; none for the frozen weight and bias). xa, the saved x_lora A_actᵀ, is an output only so
// the backward can reuse it: non-differentiable, and its gradient is never materialized. Under
// torch.compile, AOTAutograd traces through this kernel with fake tensors, so both ops appear in
// the graph as themselves (their fake kernels are in tsqlora_ext/ops.py).
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace tsq::lora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& x_lora, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& E,
    const at::Tensor& B, const at::Tensor& active, double scaling) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tsqlora_ext::varrank_lora", "")
                             .typed<decltype(call_forward)>();
  return op.call(x, x_lora, weight, bias, A, E, B, active, scaling);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const std::optional<at::Tensor>& x_lora,
    const at::Tensor& weight, const at::Tensor& A, const at::Tensor& E, const at::Tensor& B,
    const at::Tensor& active, double scaling, const at::Tensor& xa, bool need_dx,
    bool need_dx_lora) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tsqlora_ext::varrank_lora_backward", "")
                             .typed<decltype(call_backward)>();
  return op.call(grad_y, x, x_lora, weight, A, E, B, active, scaling, xa, need_dx, need_dx_lora);
}

class VarRankLoRA : public torch::autograd::Function<VarRankLoRA> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const std::optional<at::Tensor>& x_lora, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& A,
                               const at::Tensor& E, const at::Tensor& B, const at::Tensor& active,
                               double scaling) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, xa] = call_forward(x, x_lora, weight, bias, A, E, B, active, scaling);
    // An undefined tensor stands for "x_lora is x itself".
    ctx->save_for_backward({x, x_lora.value_or(at::Tensor()), weight, A, E, B, active, xa});
    ctx->saved_data["scaling"] = scaling;
    ctx->mark_non_differentiable({xa});
    // Otherwise autograd fills a zero [..., r] tensor for xa's unused gradient on every call.
    ctx->set_materialize_grads(false);
    return {y, xa};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The backward op has no derivative of its own: a graph built through it (create_graph=True,
    // a gradient penalty) would give wrong second derivatives without a word.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "varrank_lora: double backward (create_graph=True) is not supported");
    // One gradient slot per forward argument: x, x_lora, weight, bias, A, E, B, active, scaling.
    variable_list out(9);
    const at::Tensor& grad_y = grads[0];
    if (!grad_y.defined()) return out;  // y did not reach the loss
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x_lora = saved[1];
    const std::optional<at::Tensor> x_lora_opt =
        x_lora.defined() ? std::optional<at::Tensor>(x_lora) : std::nullopt;
    const bool need_dx = ctx->needs_input_grad(0);
    const bool need_dx_lora = x_lora.defined() && ctx->needs_input_grad(1);
    auto [dx, dx_lora, dA, dE, dB] = call_backward(
        grad_y.contiguous(), saved[0], x_lora_opt, saved[2], saved[3], saved[4], saved[5], saved[6],
        ctx->saved_data["scaling"].toDouble(), saved[7], need_dx, need_dx_lora);
    if (need_dx) out[0] = dx;
    if (need_dx_lora) out[1] = dx_lora;
    out[4] = dA, out[5] = dE, out[6] = dB;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> varrank_lora_autograd(
    const at::Tensor& x, const std::optional<at::Tensor>& x_lora, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& E,
    const at::Tensor& B, const at::Tensor& active, double scaling) {
  // Checked here, before apply runs forward with grad mode off: under no_grad (an evaluation
  // pass of a model whose every parameter requires grad) no gradient can reach them.
  TORCH_CHECK_VALUE(!at::GradMode::is_enabled() ||
                        (!weight.requires_grad() && !(bias.has_value() && bias->requires_grad())),
                    "varrank_lora: weight and bias are the frozen base layer and get no "
                    "gradient; call requires_grad_(False) on them");
  auto outs = VarRankLoRA::apply(x, x_lora, weight, bias, A, E, B, active, scaling);
  return {outs[0], outs[1]};
}

// Custom ops get no autocast treatment of their own: inside torch.autocast the base layers hand
// varrank_lora bf16 activations while the adapter parameters stay float32, and the kernels need
// one dtype. This rule does what autocast does for a matmul: every floating input on the
// region's device except float64 is cast to the region's dtype (bf16 or fp16 as the region
// says), then the op runs below autocast. The casts are ordinary differentiable ops, so float32
// parameters still get float32 gradients. An input already in that dtype (the activations,
// mostly) is passed as it is, not through a no-op .to() that would still be one more op per call.
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> varrank_lora_autocast(
    const at::Tensor& x, const std::optional<at::Tensor>& x_lora, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& E,
    const at::Tensor& B, const at::Tensor& active, double scaling) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  auto cast = [dtype](const at::Tensor& t) {
    const bool eligible = t.is_floating_point() && t.scalar_type() != dtype &&
                          t.scalar_type() != at::kDouble && t.device().type() == kDevice;
    return eligible ? t.to(dtype) : t;
  };
  auto cast_opt = [&cast](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    return t.has_value() ? std::optional<at::Tensor>(cast(*t)) : std::nullopt;
  };
  return call_forward(cast(x), cast_opt(x_lora), cast(weight), cast_opt(bias), cast(A), cast(E),
                      cast(B), active, scaling);
}

}  // namespace
}  // namespace tsq::lora

TORCH_LIBRARY_IMPL(tsqlora_ext, Autograd, m) {
  m.impl("varrank_lora", &tsq::lora::varrank_lora_autograd);
}

TORCH_LIBRARY_IMPL(tsqlora_ext, AutocastCPU, m) {
  m.impl("varrank_lora", &tsq::lora::varrank_lora_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(tsqlora_ext, AutocastCUDA, m) {
  m.impl("varrank_lora", &tsq::lora::varrank_lora_autocast<c10::DeviceType::CUDA>);
}
