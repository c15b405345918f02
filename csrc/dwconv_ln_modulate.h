// Host interface of the dwconv_ln_modulate CUDA kernels (csrc/dwconv_ln_modulate.cu).
//
// The kernels see raw pointers and plain ints only, so the .cu file needs no ATen headers (fast to compile); the
// bindings (csrc/bindings.cpp) validate tensors, allocate outputs and workspaces, and pick the stream.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace fcdm {

enum class ElemType { kFloat32, kFloat16, kBFloat16 };

// Launch geometry shared by the forward and the backward, so workspaces can be sized by the caller.
struct DwconvPlan {
  int tile_rows;        // TH: output rows per tile of the fused (conv + LayerNorm) kernels; tiles are TH x 8 pixels
  int chunk_channels;   // CK: channels staged in shared memory at a time by the fused kernels (multiple of 8)
  int tiles_w;          // ceil(W / 8)
  int tiles_per_image;  // tiles_w * ceil(H / TH)
  int padded_channels;  // row stride of the transposed fp32 weights (49, Cpad), C rounded up to 8
  int weight_splits;    // S: partial sums of the weight gradient, each over a share of the 8x8 tiles
  size_t fused_smem_forward;   // dynamic shared memory of the fused forward kernel, bytes
  size_t fused_smem_backward;  // ... and of the fused backward (dh0) kernel
};

DwconvPlan dwconv_plan(int B, int H, int W, int C, ElemType type, int device);

// h = LayerNorm_C(dwconv7x7(x) + bias) * (1 + scale) + shift. weight_t: fp32 workspace of 49 * Cpad floats.
void dwconv_ln_modulate_forward(ElemType type, const void* x, const void* weight, const void* bias,
                                const void* shift, const void* scale, void* h, float* weight_t,
                                int B, int H, int W, int C, float eps, bool vectorized, const DwconvPlan& plan,
                                cudaStream_t stream);

// Writes dx, and the fp32 partial sums that the caller reduces (no global atomics):
//   weight_partial (S, C, 50): [..., :49] sums of dh0 * shifted x (dweight), [..., 49] sums of dh0 (dbias);
//   modulation_partial (2, B, tiles_per_image, C): sums of dh (dshift) and of dh * n (dscale).
// dh0: fp32 workspace (B, H, W, C); weight_t: fp32 workspace of 49 * Cpad floats.
void dwconv_ln_modulate_backward(ElemType type, const void* grad_h, const void* x, const void* weight,
                                 const void* bias, const void* scale, void* dx, float* dh0, float* weight_t,
                                 float* weight_partial, float* modulation_partial, int B, int H, int W, int C,
                                 float eps, bool vectorized, const DwconvPlan& plan, cudaStream_t stream);

}  // namespace fcdm
