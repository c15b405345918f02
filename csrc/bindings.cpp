// torch.ops.fcdm.dwconv_ln_modulate_cuda{,_backward}: argument checks, output and workspace allocation, the stream,
// and the reductions of the kernels' partial sums. The kernels themselves live in dwconv_ln_modulate.cu.
//
// The schema is registered with TORCH_LIBRARY_FRAGMENT so this module can share the `fcdm` namespace with ops that
// other parts of the package define from Python; the fake (meta) kernels and autograd are registered from Python
// (fcdm_kernels/cuda/ops.py).
//
// The device guard is the generic c10::DeviceGuard (dispatching to the CUDA guard that libc10_cuda registers) rather
// than c10::cuda::CUDAGuard, whose header pulls in the caching allocator's global: this way the only CUDA-torch symbols
// the module needs are functions, so CI (CPU-only torch) can load it with lazy binding to check the registrations.
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "dwconv_ln_modulate.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace {

constexpr const char* kOp = "fcdm.dwconv_ln_modulate_cuda";

// Checks one tensor against the activations x: CUDA, same device and dtype, exact shape, contiguous.
void check_like_x(const char* name, const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.defined(), kOp, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(t.is_cuda(), kOp, ": ", name, " must be a CUDA tensor, got a tensor on ", t.device());
  TORCH_CHECK_VALUE(t.device() == x.device(), kOp, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), kOp, ": ", name, " has dtype ", t.scalar_type(),
                    " but x has dtype ", x.scalar_type(), "; every argument must have the activation dtype");
  TORCH_CHECK_VALUE(t.sizes() == shape, kOp, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), kOp, ": ", name, " must be contiguous (strides ", t.strides(), ")");
}

void check_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& shift,
                const at::Tensor& scale, const at::Tensor* grad_h) {
  TORCH_CHECK_VALUE(x.defined() && x.dim() == 4, kOp, ": x must be a 4-D channels-last (B, H, W, C) tensor, got ",
                    x.defined() ? x.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(x.is_cuda(), kOp, ": x must be a CUDA tensor, got a tensor on ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, kOp,
                    ": x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(weight.defined() && weight.dim() == 3, kOp, ": weight must have shape (C, 7, 7), got ",
                    weight.defined() ? weight.sizes() : at::IntArrayRef{});
  const int64_t C = weight.size(0);
  TORCH_CHECK_VALUE(x.size(3) == C, kOp, ": x must have C=", C, " channels in its last dimension (NHWC), got shape ",
                    x.sizes(), x.size(1) == C ? " (it looks like NCHW; pass x.permute(0, 2, 3, 1).contiguous())" : "");
  TORCH_CHECK_VALUE(x.is_contiguous(), kOp, ": x must be a contiguous NHWC tensor, got strides ", x.strides(),
                    " for shape ", x.sizes(), " (an NCHW tensor viewed with permute() is not contiguous)");
  TORCH_CHECK_VALUE(x.numel() < (int64_t{1} << 31), kOp, ": x has ", x.numel(), " elements; at most 2^31 - 1");
  const int64_t B = x.size(0);
  check_like_x("weight", weight, x, {C, 7, 7});
  check_like_x("bias", bias, x, {C});
  check_like_x("shift", shift, x, {B, C});
  check_like_x("scale", scale, x, {B, C});
  if (grad_h != nullptr) check_like_x("grad_h", *grad_h, x, x.sizes());
}

fcdm::ElemType elem_type(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf: return fcdm::ElemType::kFloat16;
    case at::kBFloat16: return fcdm::ElemType::kBFloat16;
    default: return fcdm::ElemType::kFloat32;
  }
}

// 16-byte vector loads along C need C to be a multiple of the vector width and every base 16-byte aligned.
bool vectorizable(const std::vector<const at::Tensor*>& tensors, int64_t C) {
  const int64_t vec = 16 / tensors.front()->element_size();
  if (C % vec != 0) return false;
  for (const at::Tensor* t : tensors)
    if (reinterpret_cast<std::uintptr_t>(t->data_ptr()) % 16 != 0) return false;
  return true;
}

at::Tensor dwconv_ln_modulate_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                   const at::Tensor& shift, const at::Tensor& scale, double eps) {
  check_args(x, weight, bias, shift, scale, nullptr);
  at::Tensor h = at::empty_like(x);
  if (x.numel() == 0) return h;
  const c10::DeviceGuard guard(x.device());
  const int B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const auto type = elem_type(x);
  const fcdm::DwconvPlan plan = fcdm::dwconv_plan(B, H, W, C, type, x.get_device());
  at::Tensor weight_t = at::empty({49 * plan.padded_channels}, x.options().dtype(at::kFloat));
  const bool vec = vectorizable({&x, &shift, &scale, &h}, C);
  fcdm::dwconv_ln_modulate_forward(type, x.data_ptr(), weight.data_ptr(), bias.data_ptr(), shift.data_ptr(),
                                   scale.data_ptr(), h.data_ptr(), weight_t.data_ptr<float>(), B, H, W, C,
                                   static_cast<float>(eps), vec, plan,
                                   c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
  return h;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_ln_modulate_cuda_backward(
    const at::Tensor& grad_h, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& shift, const at::Tensor& scale, double eps) {
  check_args(x, weight, bias, shift, scale, &grad_h);
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0)
    return {dx, at::zeros_like(weight), at::zeros_like(bias), at::zeros_like(shift), at::zeros_like(scale)};
  const c10::DeviceGuard guard(x.device());
  const int B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const auto type = elem_type(x);
  const fcdm::DwconvPlan plan = fcdm::dwconv_plan(B, H, W, C, type, x.get_device());
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor weight_t = at::empty({49 * plan.padded_channels}, f32);
  at::Tensor dh0 = at::empty({B, H, W, C}, f32);
  at::Tensor weight_partial = at::empty({plan.weight_splits, C, 50}, f32);
  at::Tensor modulation_partial = at::empty({2, B, plan.tiles_per_image, C}, f32);
  const bool vec = vectorizable({&x, &grad_h, &scale, &dx}, C);
  fcdm::dwconv_ln_modulate_backward(type, grad_h.data_ptr(), x.data_ptr(), weight.data_ptr(), bias.data_ptr(),
                                    scale.data_ptr(), dx.data_ptr(), dh0.data_ptr<float>(),
                                    weight_t.data_ptr<float>(), weight_partial.data_ptr<float>(),
                                    modulation_partial.data_ptr<float>(), B, H, W, C, static_cast<float>(eps), vec,
                                    plan, c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
  // Deterministic reductions of the per-block partial sums (fixed order, no atomics).
  const at::Tensor weight_sums = weight_partial.sum(0);          // (C, 50)
  const at::Tensor modulation_sums = modulation_partial.sum(2);  // (2, B, C)
  const auto dtype = x.scalar_type();
  at::Tensor dweight = weight_sums.narrow(1, 0, 49).reshape({C, 7, 7}).to(dtype).contiguous();
  at::Tensor dbias = weight_sums.select(1, 49).to(dtype).contiguous();
  at::Tensor dshift = modulation_sums.select(0, 0).to(dtype).contiguous();
  at::Tensor dscale = modulation_sums.select(0, 1).to(dtype).contiguous();
  return {dx, dweight, dbias, dshift, dscale};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fcdm, m) {
  m.def("dwconv_ln_modulate_cuda(Tensor x, Tensor weight, Tensor bias, Tensor shift, Tensor scale, float eps) "
        "-> Tensor");
  m.def("dwconv_ln_modulate_cuda_backward(Tensor grad_h, Tensor x, Tensor weight, Tensor bias, Tensor shift, "
        "Tensor scale, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fcdm, CUDA, m) {
  m.impl("dwconv_ln_modulate_cuda", &dwconv_ln_modulate_cuda);
  m.impl("dwconv_ln_modulate_cuda_backward", &dwconv_ln_modulate_cuda_backward);
}

// The Python module only has to exist: importing it runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "fcdm CUDA kernels; the ops are torch.ops.fcdm.dwconv_ln_modulate_cuda{,_backward}";
}
