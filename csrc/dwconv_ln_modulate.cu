// dwconv_ln_modulate on NHWC tensors: depthwise 7x7 conv (+bias, zero padding 3) -> LayerNorm over C (no affine,
// fp32 statistics) -> * (1 + scale[b, c]) + shift[b, c]; and its backward (maths: fcdm_kernels/reference.py).
//
// The one design decision: a fused block owns a TH x 8 pixel tile across *all* C channels, so LayerNorm never leaves
// the block. It streams C in chunks of CK channels through shared memory (the input tile with its 3-pixel halo, loaded
// with 16-byte vectors along C; the next chunk's loads are in flight in registers while the current one is convolved)
// and keeps the fp32 conv output h0 of the whole tile in shared memory (TH * 8 * C floats <= 64 KB, which is why TH
// shrinks as C grows). Each thread convolves 2 adjacent channels x 4 adjacent pixels per work item, so every value
// read from shared memory feeds several FMAs. All reductions run in a fixed order: results are bitwise repeatable.
//
// Backward, per call:
//   1. weights transposed to fp32 (49, Cpad) so the conv loads them coalesced;
//   2. fused kernel: recompute h0 and the statistics, then dh0 = rstd (dn - mean(dn) - n mean(dn n)) with
//      dn = dh (1 + scale) (fp32 workspace), and per-tile partial sums of dh and dh * n for dshift / dscale;
//   3. dx = depthwise conv of dh0 with the kernel flipped in both axes;
//   4. dweight / dbias partial sums, each block over a share of the 8 x 8 tiles; the caller sums the partials.
#include "dwconv_ln_modulate.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

namespace fcdm {
namespace {

constexpr int kThreads = 256;
constexpr int kTileW = 8;                  // output columns per tile
constexpr int kHaloW = kTileW + 6;         // input columns per tile
constexpr int kSeg = 4;                    // output pixels per conv work item
constexpr int kMaxTileFloats = 16384;      // fp32 h0 of one fused tile: TH * 8 * C <= 64 KB
constexpr int kFusedBlocksPerSM = 2;       // what <= ~110 KB of shared memory per block allows; caps registers at 128
constexpr int kStagedGroups = 8;           // 16-byte groups per thread of one staged halo chunk (32 registers)
constexpr size_t kMaxHaloBytes = size_t{16} * kStagedGroups * kThreads;  // 32 KB: one chunk's halo tile
constexpr int kGradChunk = 32;             // channels per block of the dx and dweight kernels
constexpr int kGradRows = 8;               // 8 x 8 pixel tiles in the dx and dweight kernels
constexpr int64_t kMaxGridX = 2147483647;  // CUDA's limit on grid.x; grid.y and grid.z stop at 65,535

// ---------------------------------------------------------------------------------------------------------------------
// Element types: fp32 math on every dtype; a "group" is the VEC elements of one 16-byte vector.

template <typename T> struct Elem;

template <> struct Elem<float> {
  using Pair = float2;
  static constexpr int VEC = 4;
  __device__ static float2 pair_to_float2(Pair v) { return v; }
  __device__ static Pair float2_to_pair(float2 v) { return v; }
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
};

template <> struct Elem<__half> {
  using Pair = __half2;
  static constexpr int VEC = 8;
  __device__ static float2 pair_to_float2(Pair v) { return __half22float2(v); }
  __device__ static Pair float2_to_pair(float2 v) { return __float22half2_rn(v); }
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
};

template <> struct Elem<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static constexpr int VEC = 8;
  __device__ static float2 pair_to_float2(Pair v) { return __bfloat1622float2(v); }
  __device__ static Pair float2_to_pair(float2 v) { return __float22bfloat162_rn(v); }
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// The 16 bytes of one group. Loading and storing it whole gives 128-bit memory instructions; accessing T elements
// through this aggregate (rather than through a uint4) keeps the type punning legal C++.
template <typename T>
struct alignas(16) Group {
  T v[Elem<T>::VEC];
};

// Loads n <= VEC elements of a group as floats (zeros past n). `vec`: 16-byte aligned and n == VEC possible.
template <typename T>
__device__ __forceinline__ void load_group(const T* __restrict__ p, int n, bool vec, float (&out)[Elem<T>::VEC]) {
  constexpr int V = Elem<T>::VEC;
  if (vec && n == V) {
    const Group<T> raw = *reinterpret_cast<const Group<T>*>(p);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = Elem<T>::to_float(raw.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = k < n ? Elem<T>::to_float(p[k]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_group(T* __restrict__ p, int n, bool vec, const float (&v)[Elem<T>::VEC]) {
  constexpr int V = Elem<T>::VEC;
  if (vec && n == V) {
    Group<T> raw;
#pragma unroll
    for (int k = 0; k < V; ++k) raw.v[k] = Elem<T>::from_float(v[k]);
    *reinterpret_cast<Group<T>*>(p) = raw;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (k < n) p[k] = Elem<T>::from_float(v[k]);
  }
}

// fp32 rows of C channels (shared-memory h0, the dh0 workspace), read/written V floats at a time (float4 when `vec`:
// then C % 4 == 0 keeps them aligned).
template <int V>
__device__ __forceinline__ void load_floats(const float* p, int n, bool vec, float (&out)[V]) {
  if (vec && n == V) {
#pragma unroll
    for (int k = 0; k < V; k += 4) {
      float4 q = *reinterpret_cast<const float4*>(p + k);
      out[k] = q.x; out[k + 1] = q.y; out[k + 2] = q.z; out[k + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = k < n ? p[k] : 0.f;
  }
}

template <int V>
__device__ __forceinline__ void store_floats(float* p, int n, bool vec, const float (&v)[V]) {
  if (vec && n == V) {
#pragma unroll
    for (int k = 0; k < V; k += 4) *reinterpret_cast<float4*>(p + k) = make_float4(v[k], v[k + 1], v[k + 2], v[k + 3]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (k < n) p[k] = v[k];
  }
}

// Stores the channel pair (c, c + 1) at p as T: one paired store when both exist and C is even (then p is aligned).
template <typename T>
__device__ __forceinline__ void store_pair(T* __restrict__ p, float2 v, bool has_second, bool even_c) {
  if (has_second && even_c) {
    *reinterpret_cast<typename Elem<T>::Pair*>(p) = Elem<T>::float2_to_pair(v);
  } else {
    p[0] = Elem<T>::from_float(v.x);
    if (has_second) p[1] = Elem<T>::from_float(v.y);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ---------------------------------------------------------------------------------------------------------------------
// Tile staging and the conv work item.

// The group of src[b, y, xx, c .. c + VEC), zero outside the image or past C (that zero is the conv's padding).
template <typename T>
__device__ __forceinline__ Group<T> fetch_group(const T* __restrict__ src, int b, int y, int xx, int c, int H, int W,
                                                int C, bool vec) {
  constexpr int V = Elem<T>::VEC;
  const bool inside = y >= 0 && y < H && xx >= 0 && xx < W && c < C;
  const T* p = src + ((static_cast<size_t>(b) * H + min(max(y, 0), H - 1)) * W + min(max(xx, 0), W - 1)) * C + c;
  Group<T> raw;
  if (inside && vec && c + V <= C) {
    raw = *reinterpret_cast<const Group<T>*>(p);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) raw.v[k] = inside && c + k < C ? p[k] : Elem<T>::from_float(0.f);
  }
  return raw;
}

// Coordinates of group i of a rows x cols x (groups * VEC channels) tile laid out [r][q][g]: row r, column q, group g.
__device__ __forceinline__ void tile_group_coords(int i, int groups, int cols, int& r, int& q, int& g) {
  g = i % groups;
  q = (i / groups) % cols;
  r = i / (groups * cols);
}

// dst[(r * cols + q) * CK + k] = src[b, y0 + r, x0 + q, c0 + k] for r < rows, q < cols, k < CK (zero-padded).
// CK is a multiple of VEC and dst is 16-byte aligned.
template <typename T>
__device__ void load_tile(T* __restrict__ dst, const T* __restrict__ src, int b, int y0, int x0, int rows, int cols,
                          int c0, int CK, int H, int W, int C, bool vec) {
  constexpr int V = Elem<T>::VEC;
  const int groups = CK / V;
  const int total = rows * cols * groups;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    int r, q, g;
    tile_group_coords(i, groups, cols, r, q, g);
    *reinterpret_cast<Group<T>*>(dst + static_cast<size_t>(r * cols + q) * CK + g * V) =
        fetch_group<T>(src, b, y0 + r, x0 + q, c0 + g * V, H, W, C, vec);
  }
}

// load_tile in two halves, so the fused kernels can have the next chunk's loads in flight while they convolve the
// current one: fetch_tile loads this thread's share into registers, commit_tile writes it to shared memory. The host
// plan keeps a chunk within kStagedGroups groups per thread.
template <typename T>
__device__ __forceinline__ void fetch_tile(Group<T> (&staged)[kStagedGroups], const T* __restrict__ src, int b, int y0,
                                           int x0, int rows, int cols, int c0, int CK, int H, int W, int C, bool vec) {
  constexpr int V = Elem<T>::VEC;
  const int groups = CK / V;
  const int total = rows * cols * groups;
#pragma unroll
  for (int j = 0; j < kStagedGroups; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i < total) {
      int r, q, g;
      tile_group_coords(i, groups, cols, r, q, g);
      staged[j] = fetch_group<T>(src, b, y0 + r, x0 + q, c0 + g * V, H, W, C, vec);
    }
  }
}

template <typename T>
__device__ __forceinline__ void commit_tile(T* __restrict__ dst, const Group<T> (&staged)[kStagedGroups], int rows,
                                            int cols, int CK) {
  constexpr int V = Elem<T>::VEC;
  const int groups = CK / V;
  const int total = rows * cols * groups;
#pragma unroll
  for (int j = 0; j < kStagedGroups; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i < total) {
      int r, q, g;
      tile_group_coords(i, groups, cols, r, q, g);
      *reinterpret_cast<Group<T>*>(dst + static_cast<size_t>(r * cols + q) * CK + g * V) = staged[j];
    }
  }
}

// Conv of channels (c, c + 1) at output pixels (r, seg * 4 + j), j < 4, of a tile staged with its halo at origin
// (-3, -3): acc[j] += sum_{ky,kx} w[c, tap] * tile[r + ky, seg * 4 + j + kx]. FLIP reads tap 48 - (7 ky + kx), i.e.
// the kernel flipped in both axes (the input gradient). weight_t: fp32 (49, Cpad), zero past C.
template <typename Tin, bool FLIP>
__device__ __forceinline__ void conv_item(const Tin* __restrict__ tile, int CK, int cl, int r, int seg,
                                          const float* __restrict__ weight_t, int Cpad, int c, float2 (&acc)[kSeg]) {
#pragma unroll
  for (int ky = 0; ky < 7; ++ky) {
    float2 w[7];
#pragma unroll
    for (int kx = 0; kx < 7; ++kx) {
      const int tap = FLIP ? 48 - (ky * 7 + kx) : ky * 7 + kx;
      w[kx] = __ldg(reinterpret_cast<const float2*>(weight_t + static_cast<size_t>(tap) * Cpad + c));
    }
    const Tin* row = tile + ((r + ky) * kHaloW + seg * kSeg) * CK + cl;
    float2 in[kSeg + 6];
#pragma unroll
    for (int q = 0; q < kSeg + 6; ++q)
      in[q] = Elem<Tin>::pair_to_float2(*reinterpret_cast<const typename Elem<Tin>::Pair*>(row + q * CK));
#pragma unroll
    for (int kx = 0; kx < 7; ++kx) {
#pragma unroll
      for (int j = 0; j < kSeg; ++j) {
        acc[j].x = fmaf(w[kx].x, in[j + kx].x, acc[j].x);
        acc[j].y = fmaf(w[kx].y, in[j + kx].y, acc[j].y);
      }
    }
  }
}

// weight (C, 7, 7) in the activation dtype -> fp32 (49, Cpad), zero past C.
template <typename T>
__global__ void transpose_weight_kernel(const T* __restrict__ weight, float* __restrict__ weight_t, int C, int Cpad) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= 49 * Cpad) return;
  const int tap = i / Cpad, c = i % Cpad;
  weight_t[i] = c < C ? Elem<T>::to_float(weight[static_cast<size_t>(c) * 49 + tap]) : 0.f;
}

// ---------------------------------------------------------------------------------------------------------------------
// Fused kernels: conv of a TH x 8 tile over all C into shared memory, then LayerNorm statistics per pixel.

struct FusedSmem {
  float* h0;     // [TP][C]: conv output (later the normalized n in the backward)
  float* mean;   // [TP]
  float* rstd;   // [TP]
  float* aux;    // [2 * TP] backward only: mean_c(dn), mean_c(dn * n)
  float* red;    // [2 * slices * C] backward only: per-slice channel sums
  void* halo;    // [(TH + 6)][14][CK] activation dtype
};

__host__ __device__ inline size_t align16(size_t n) { return (n + 15) / 16 * 16; }

// Byte layout of FusedSmem; `backward` adds aux and red. Returns the total size.
__host__ __device__ inline size_t fused_smem_layout(int TH, int CK, int C, int elem_size, bool backward,
                                                    size_t* offsets /* 6 entries or nullptr */) {
  const int TP = TH * kTileW;
  const int V = 16 / elem_size;
  const int groups = (C + V - 1) / V;
  const int slices = groups >= kThreads ? 1 : kThreads / groups;
  size_t off[6];
  size_t n = 0;
  off[0] = n; n += align16(sizeof(float) * TP * C);
  off[1] = n; n += align16(sizeof(float) * TP);
  off[2] = n; n += align16(sizeof(float) * TP);
  off[3] = n; n += backward ? align16(sizeof(float) * 2 * TP) : 0;
  off[4] = n; n += backward ? align16(sizeof(float) * 2 * slices * C) : 0;
  off[5] = n; n += align16(static_cast<size_t>(TH + 6) * kHaloW * CK * elem_size);
  if (offsets)
    for (int i = 0; i < 6; ++i) offsets[i] = off[i];
  return n;
}

__device__ inline FusedSmem fused_smem(unsigned char* base, int TH, int CK, int C, int elem_size, bool backward) {
  size_t off[6];
  fused_smem_layout(TH, CK, C, elem_size, backward, off);
  FusedSmem s;
  s.h0 = reinterpret_cast<float*>(base + off[0]);
  s.mean = reinterpret_cast<float*>(base + off[1]);
  s.rstd = reinterpret_cast<float*>(base + off[2]);
  s.aux = reinterpret_cast<float*>(base + off[3]);
  s.red = reinterpret_cast<float*>(base + off[4]);
  s.halo = base + off[5];
  return s;
}

// Fills s.h0 with the conv (+bias) of tile (y0, x0) of image b and s.mean / s.rstd with its LayerNorm statistics.
template <typename T>
__device__ void conv_ln_tile(const FusedSmem& s, const T* __restrict__ x, const float* __restrict__ weight_t,
                             const T* __restrict__ bias, int b, int y0, int x0, int H, int W, int C, int Cpad, int TH,
                             int CK, float eps, bool vec) {
  T* halo = static_cast<T*>(s.halo);
  const int pairs = CK / 2;
  const int items = pairs * TH * (kTileW / kSeg);
  Group<T> staged[kStagedGroups];
  fetch_tile<T>(staged, x, b, y0 - 3, x0 - 3, TH + 6, kHaloW, 0, CK, H, W, C, vec);
  for (int c0 = 0; c0 < C; c0 += CK) {
    __syncthreads();  // the previous chunk's readers are done with the halo tile
    commit_tile<T>(halo, staged, TH + 6, kHaloW, CK);
    __syncthreads();
    if (c0 + CK < C) fetch_tile<T>(staged, x, b, y0 - 3, x0 - 3, TH + 6, kHaloW, c0 + CK, CK, H, W, C, vec);
    for (int it = threadIdx.x; it < items; it += blockDim.x) {
      const int cp = it % pairs, rs = it / pairs;
      const int r = rs / (kTileW / kSeg), seg = rs % (kTileW / kSeg);
      const int c = c0 + 2 * cp;
      if (c >= C) continue;
      const bool has_second = c + 1 < C;
      const float2 b2 = make_float2(Elem<T>::to_float(bias[c]), has_second ? Elem<T>::to_float(bias[c + 1]) : 0.f);
      float2 acc[kSeg];
#pragma unroll
      for (int j = 0; j < kSeg; ++j) acc[j] = b2;
      conv_item<T, false>(halo, CK, 2 * cp, r, seg, weight_t, Cpad, c, acc);
#pragma unroll
      for (int j = 0; j < kSeg; ++j) {
        store_pair<float>(s.h0 + static_cast<size_t>(r * kTileW + seg * kSeg + j) * C + c, acc[j], has_second,
                          C % 2 == 0);
      }
    }
  }
  __syncthreads();
  // Two-pass statistics from shared memory: exact mean first, then the centred variance (no cancellation).
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int p = warp; p < TH * kTileW; p += warps) {
    const float* row = s.h0 + static_cast<size_t>(p) * C;
    float sum = 0.f;
    for (int c = lane; c < C; c += 32) sum += row[c];
    const float mu = warp_sum(sum) / C;
    float sq = 0.f;
    for (int c = lane; c < C; c += 32) {
      const float d = row[c] - mu;
      sq = fmaf(d, d, sq);
    }
    const float var = warp_sum(sq) / C;
    if (lane == 0) {
      s.mean[p] = mu;
      s.rstd[p] = 1.f / sqrtf(var + eps);
    }
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kFusedBlocksPerSM)
fused_forward_kernel(const T* __restrict__ x,             // (B, H, W, C)
                     const float* __restrict__ weight_t,  // (49, Cpad) fp32
                     const T* __restrict__ bias,          // (C,)
                     const T* __restrict__ shift,         // (B, C)
                     const T* __restrict__ scale,         // (B, C)
                     T* __restrict__ h,                   // (B, H, W, C)
                     int H, int W, int C, int Cpad, int TH, int CK, int tiles_w, int tiles_per_image, float eps,
                     bool vec) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int V = Elem<T>::VEC;
  const FusedSmem s = fused_smem(smem_raw, TH, CK, C, sizeof(T), false);
  // The batch is folded into grid.x (up to 2^31 - 1 blocks): grid.y would cap it at 65,535.
  const int b = blockIdx.x / tiles_per_image, tile = blockIdx.x % tiles_per_image;
  const int y0 = (tile / tiles_w) * TH, x0 = (tile % tiles_w) * kTileW;
  conv_ln_tile<T>(s, x, weight_t, bias, b, y0, x0, H, W, C, Cpad, TH, CK, eps, vec);

  const int groups = (C + V - 1) / V;
  const int TP = TH * kTileW;
  for (int i = threadIdx.x; i < TP * groups; i += blockDim.x) {
    const int p = i / groups, g = i % groups;
    const int y = y0 + p / kTileW, xx = x0 + p % kTileW;
    if (y >= H || xx >= W) continue;
    const int c = g * V, n = min(V, C - c);
    float hv[V], sh[V], sc[V], out[V];
    load_floats<V>(s.h0 + static_cast<size_t>(p) * C + c, n, vec, hv);
    load_group<T>(shift + static_cast<size_t>(b) * C + c, n, vec, sh);
    load_group<T>(scale + static_cast<size_t>(b) * C + c, n, vec, sc);
    const float mu = s.mean[p], rs = s.rstd[p];
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = fmaf((hv[k] - mu) * rs, 1.f + sc[k], sh[k]);
    store_group<T>(h + ((static_cast<size_t>(b) * H + y) * W + xx) * C + c, n, vec, out);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kFusedBlocksPerSM)
fused_backward_kernel(const T* __restrict__ grad_h,        // (B, H, W, C)
                      const T* __restrict__ x,             // (B, H, W, C)
                      const float* __restrict__ weight_t,  // (49, Cpad) fp32
                      const T* __restrict__ bias,          // (C,)
                      const T* __restrict__ scale,         // (B, C)
                      float* __restrict__ dh0,             // (B, H, W, C) fp32
                      float* __restrict__ mod_partial,     // (2, B, tiles_per_image, C) fp32
                      int B, int H, int W, int C, int Cpad, int TH, int CK, int tiles_w, int tiles_per_image,
                      float eps, bool vec) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int V = Elem<T>::VEC;
  const FusedSmem s = fused_smem(smem_raw, TH, CK, C, sizeof(T), true);
  const int b = blockIdx.x / tiles_per_image, tile = blockIdx.x % tiles_per_image;  // the batch folded into grid.x
  const int y0 = (tile / tiles_w) * TH, x0 = (tile % tiles_w) * kTileW;
  conv_ln_tile<T>(s, x, weight_t, bias, b, y0, x0, H, W, C, Cpad, TH, CK, eps, vec);

  const int groups = (C + V - 1) / V;
  const int TP = TH * kTileW;
  const T* scale_b = scale + static_cast<size_t>(b) * C;
  float* m1 = s.aux;       // mean_c(dn) per pixel
  float* m2 = s.aux + TP;  // mean_c(dn * n) per pixel

  // Per pixel (a warp each): h0 -> n in place, and the two channel means the LayerNorm backward needs.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int p = warp; p < TP; p += warps) {
    const int y = y0 + p / kTileW, xx = x0 + p % kTileW;
    const bool inside = y < H && xx < W;
    const float mu = s.mean[p], rs = s.rstd[p];
    const T* dh_row = grad_h + ((static_cast<size_t>(b) * H + min(y, H - 1)) * W + min(xx, W - 1)) * C;
    float s1 = 0.f, s2 = 0.f;
    for (int g = lane; g < groups; g += 32) {
      const int c = g * V, n = min(V, C - c);
      float hv[V], nv[V];
      float* row = s.h0 + static_cast<size_t>(p) * C + c;
      load_floats<V>(row, n, vec, hv);
#pragma unroll
      for (int k = 0; k < V; ++k) nv[k] = inside ? (hv[k] - mu) * rs : 0.f;
      store_floats<V>(row, n, vec, nv);
      if (inside) {
        float dv[V], sc[V];
        load_group<T>(dh_row + c, n, vec, dv);
        load_group<T>(scale_b + c, n, vec, sc);
#pragma unroll
        for (int k = 0; k < V; ++k) {  // past n, dv and nv are zero
          const float dn = dv[k] * (1.f + sc[k]);
          s1 += dn;
          s2 = fmaf(dn, nv[k], s2);
        }
      }
    }
    s1 = warp_sum(s1);
    s2 = warp_sum(s2);
    if (lane == 0) {
      m1[p] = s1 / C;
      m2[p] = s2 / C;
    }
  }
  __syncthreads();

  // Per channel group, over a slice of the pixels: dh0, and the tile's sums of dh and dh * n.
  const int slices = groups >= kThreads ? 1 : kThreads / groups;
  float* red_shift = s.red;               // [slices][C]
  float* red_scale = s.red + slices * C;  // [slices][C]
  for (int it = threadIdx.x; it < slices * groups; it += blockDim.x) {
    const int g = it % groups, slice = it / groups;
    const int c = g * V, n = min(V, C - c);
    float sc[V], sum_dh[V], sum_dhn[V];
    load_group<T>(scale_b + c, n, vec, sc);
#pragma unroll
    for (int k = 0; k < V; ++k) sum_dh[k] = sum_dhn[k] = 0.f;
    for (int p = slice; p < TP; p += slices) {
      const int y = y0 + p / kTileW, xx = x0 + p % kTileW;
      if (y >= H || xx >= W) continue;
      const size_t pix = (static_cast<size_t>(b) * H + y) * W + xx;
      float dv[V], nv[V], out[V];
      load_group<T>(grad_h + pix * C + c, n, vec, dv);
      load_floats<V>(s.h0 + static_cast<size_t>(p) * C + c, n, vec, nv);
      const float rs = s.rstd[p], a = m1[p], bb = m2[p];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        sum_dh[k] += dv[k];
        sum_dhn[k] = fmaf(dv[k], nv[k], sum_dhn[k]);
        out[k] = rs * (dv[k] * (1.f + sc[k]) - a - nv[k] * bb);
      }
      store_floats<V>(dh0 + pix * C + c, n, vec, out);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < n) {
        red_shift[slice * C + c + k] = sum_dh[k];
        red_scale[slice * C + c + k] = sum_dhn[k];
      }
    }
  }
  __syncthreads();
  const size_t out_base = (static_cast<size_t>(b) * tiles_per_image + tile) * C;
  const size_t plane = static_cast<size_t>(B) * tiles_per_image * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float a = 0.f, bb = 0.f;
    for (int slice = 0; slice < slices; ++slice) {
      a += red_shift[slice * C + c];
      bb += red_scale[slice * C + c];
    }
    mod_partial[out_base + c] = a;
    mod_partial[plane + out_base + c] = bb;
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Gradient kernels on 8 x 8 tiles and 32-channel chunks.

// dx = depthwise conv of dh0 with the flipped kernel (padding 3).
template <typename T>
__global__ void __launch_bounds__(kThreads)
input_grad_kernel(const float* __restrict__ dh0,       // (B, H, W, C) fp32
                  const float* __restrict__ weight_t,  // (49, Cpad) fp32
                  T* __restrict__ dx,                  // (B, H, W, C)
                  int H, int W, int C, int Cpad, int tiles_w, int tiles_per_image, bool vec) {
  constexpr int CK = kGradChunk, TH = kGradRows;
  __shared__ __align__(16) float tile[(TH + 6) * kHaloW * CK];
  // The batch is folded into grid.x: grid.z would cap it at 65,535.
  const int b = blockIdx.x / tiles_per_image, c0 = blockIdx.y * CK;
  const int t = blockIdx.x % tiles_per_image;
  const int y0 = (t / tiles_w) * TH, x0 = (t % tiles_w) * kTileW;
  load_tile<float>(tile, dh0, b, y0 - 3, x0 - 3, TH + 6, kHaloW, c0, CK, H, W, C, vec);
  __syncthreads();
  const int pairs = CK / 2;
  const int items = pairs * TH * (kTileW / kSeg);
  for (int it = threadIdx.x; it < items; it += blockDim.x) {
    const int cp = it % pairs, rs = it / pairs;
    const int r = rs / (kTileW / kSeg), seg = rs % (kTileW / kSeg);
    const int c = c0 + 2 * cp;
    const int y = y0 + r;
    if (c >= C || y >= H) continue;
    float2 acc[kSeg];
#pragma unroll
    for (int j = 0; j < kSeg; ++j) acc[j] = make_float2(0.f, 0.f);
    conv_item<float, true>(tile, CK, 2 * cp, r, seg, weight_t, Cpad, c, acc);
#pragma unroll
    for (int j = 0; j < kSeg; ++j) {
      const int xx = x0 + seg * kSeg + j;
      if (xx >= W) continue;
      store_pair<T>(dx + ((static_cast<size_t>(b) * H + y) * W + xx) * C + c, acc[j], c + 1 < C, C % 2 == 0);
    }
  }
}

// Partial sums over a share of the 8 x 8 tiles: part[split, c, tap] = sum dh0[p, c] * x[p + tap offset, c] (tap < 49)
// and part[split, c, 49] = sum dh0[p, c]. Thread = (channel, tile row); rows are combined in shared memory at the end.
template <typename T>
__global__ void __launch_bounds__(kThreads)
weight_grad_kernel(const T* __restrict__ x,        // (B, H, W, C)
                   const float* __restrict__ dh0,  // (B, H, W, C) fp32
                   float* __restrict__ part,       // (S, C, 50) fp32
                   int B, int H, int W, int C, int tiles_w, int tiles_per_image, int splits, bool vec_x, bool vec_d) {
  constexpr int CK = kGradChunk, TH = kGradRows;
  static_assert(CK * TH == kThreads, "one thread per (channel, tile row)");
  __shared__ __align__(16) T xs[(TH + 6) * kHaloW * CK];
  __shared__ __align__(16) float ds[TH * kTileW * CK];
  __shared__ float red[CK][50];
  const int c0 = blockIdx.x * CK, split = blockIdx.y;
  const int cl = threadIdx.x % CK, r = threadIdx.x / CK;
  float acc[49];
#pragma unroll
  for (int k = 0; k < 49; ++k) acc[k] = 0.f;
  float acc_bias = 0.f;
  const int total = B * tiles_per_image;
  for (int t = split; t < total; t += splits) {
    const int b = t / tiles_per_image, tile = t % tiles_per_image;
    const int y0 = (tile / tiles_w) * TH, x0 = (tile % tiles_w) * kTileW;
    __syncthreads();
    load_tile<T>(xs, x, b, y0 - 3, x0 - 3, TH + 6, kHaloW, c0, CK, H, W, C, vec_x);
    load_tile<float>(ds, dh0, b, y0, x0, TH, kTileW, c0, CK, H, W, C, vec_d);
    __syncthreads();
    float d[kTileW];
#pragma unroll
    for (int j = 0; j < kTileW; ++j) {
      d[j] = ds[(r * kTileW + j) * CK + cl];  // zero outside the image
      acc_bias += d[j];
    }
#pragma unroll
    for (int ky = 0; ky < 7; ++ky) {
      float in[kHaloW];
#pragma unroll
      for (int q = 0; q < kHaloW; ++q) in[q] = Elem<T>::to_float(xs[((r + ky) * kHaloW + q) * CK + cl]);
#pragma unroll
      for (int kx = 0; kx < 7; ++kx) {
#pragma unroll
        for (int j = 0; j < kTileW; ++j) acc[ky * 7 + kx] = fmaf(d[j], in[j + kx], acc[ky * 7 + kx]);
      }
    }
  }
  // Combine the TH rows of each channel in a fixed order (deterministic).
  for (int rr = 0; rr < TH; ++rr) {
    __syncthreads();
    if (r == rr) {
#pragma unroll
      for (int k = 0; k < 49; ++k) red[cl][k] = (rr == 0 ? 0.f : red[cl][k]) + acc[k];
      red[cl][49] = (rr == 0 ? 0.f : red[cl][49]) + acc_bias;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < CK * 50; i += blockDim.x) {
    const int k = i % 50, ch = i / 50;
    if (c0 + ch < C) part[(static_cast<size_t>(split) * C + c0 + ch) * 50 + k] = red[ch][k];
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Host side.

int ceil_div(int a, int b) { return (a + b - 1) / b; }

int elem_size(ElemType type) { return type == ElemType::kFloat32 ? 4 : 2; }

template <typename F>
void dispatch_type(ElemType type, F&& f) {
  switch (type) {
    case ElemType::kFloat32: f(float{}); break;
    case ElemType::kFloat16: f(__half{}); break;
    case ElemType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}

void set_dynamic_smem(const void* kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename T>
void launch_transpose_weight(const void* weight, float* weight_t, int C, int Cpad, cudaStream_t stream) {
  const int n = 49 * Cpad;
  transpose_weight_kernel<T><<<ceil_div(n, kThreads), kThreads, 0, stream>>>(static_cast<const T*>(weight), weight_t,
                                                                             C, Cpad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

DwconvPlan dwconv_plan(int B, int H, int W, int C, ElemType type, int device) {
  TORCH_CHECK(C > 0 && H > 0 && W > 0 && B > 0, "dwconv_plan: empty shape");
  const int esz = elem_size(type);
  DwconvPlan plan{};
  int TH = 8;
  while (TH > 1 && TH * kTileW * C > kMaxTileFloats) TH /= 2;
  int CK = std::min((C + 7) / 8 * 8, 2 * kThreads / (TH * (kTileW / kSeg)));  // one conv item per thread
  while (CK > 8 && static_cast<size_t>(TH + 6) * kHaloW * CK * esz > kMaxHaloBytes)
    CK = std::max(8, (CK / 2 + 7) / 8 * 8);
  TORCH_CHECK(static_cast<size_t>(TH + 6) * kHaloW * CK * esz <= kMaxHaloBytes, "dwconv_plan: halo chunk too large");
  plan.tile_rows = TH;
  plan.chunk_channels = CK;
  plan.tiles_w = ceil_div(W, kTileW);
  plan.tiles_per_image = plan.tiles_w * ceil_div(H, TH);
  plan.padded_channels = (C + 7) / 8 * 8;
  plan.fused_smem_forward = fused_smem_layout(TH, CK, C, esz, false, nullptr);
  plan.fused_smem_backward = fused_smem_layout(TH, CK, C, esz, true, nullptr);

  int sms = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK_VALUE(plan.fused_smem_backward <= static_cast<size_t>(smem_optin),
                    "fcdm dwconv_ln_modulate (CUDA): C=", C, " needs ", plan.fused_smem_backward,
                    " bytes of shared memory per block but the device allows ", smem_optin,
                    "; use the triton or torch backend for this width");
  // The batch is folded into grid.x (CUDA's limit: 2^31 - 1 blocks) of the fused and dx kernels.
  const int64_t fused_blocks = int64_t{B} * plan.tiles_per_image;
  const int64_t dx_blocks = int64_t{B} * plan.tiles_w * ceil_div(H, kGradRows);
  TORCH_CHECK_VALUE(std::max(fused_blocks, dx_blocks) <= kMaxGridX, "fcdm dwconv_ln_modulate (CUDA): B=", B, " at ", H,
                    "x", W, " needs ", std::max(fused_blocks, dx_blocks), " blocks, above CUDA's grid limit of ",
                    kMaxGridX, "; split the batch");
  const int grad_tiles = static_cast<int>(dx_blocks);
  const int chunks = ceil_div(C, kGradChunk);
  plan.weight_splits = std::max(1, std::min(grad_tiles, ceil_div(4 * sms, chunks)));
  return plan;
}

void dwconv_ln_modulate_forward(ElemType type, const void* x, const void* weight, const void* bias,
                                const void* shift, const void* scale, void* h, float* weight_t,
                                int B, int H, int W, int C, float eps, bool vectorized, const DwconvPlan& plan,
                                cudaStream_t stream) {
  dispatch_type(type, [&](auto tag) {
    using T = decltype(tag);
    launch_transpose_weight<T>(weight, weight_t, C, plan.padded_channels, stream);
    auto kernel = fused_forward_kernel<T>;
    set_dynamic_smem(reinterpret_cast<const void*>(kernel), plan.fused_smem_forward);
    const dim3 grid(plan.tiles_per_image * B);
    kernel<<<grid, kThreads, plan.fused_smem_forward, stream>>>(
        static_cast<const T*>(x), weight_t, static_cast<const T*>(bias), static_cast<const T*>(shift),
        static_cast<const T*>(scale), static_cast<T*>(h), H, W, C, plan.padded_channels, plan.tile_rows,
        plan.chunk_channels, plan.tiles_w, plan.tiles_per_image, eps, vectorized);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void dwconv_ln_modulate_backward(ElemType type, const void* grad_h, const void* x, const void* weight,
                                 const void* bias, const void* scale, void* dx, float* dh0, float* weight_t,
                                 float* weight_partial, float* modulation_partial, int B, int H, int W, int C,
                                 float eps, bool vectorized, const DwconvPlan& plan, cudaStream_t stream) {
  // dh0 is fp32 with C channels: 16-byte groups of 4 floats need C % 4 == 0 (its base comes from the allocator).
  const bool vec_dh0 = C % 4 == 0;
  dispatch_type(type, [&](auto tag) {
    using T = decltype(tag);
    launch_transpose_weight<T>(weight, weight_t, C, plan.padded_channels, stream);

    auto fused = fused_backward_kernel<T>;
    set_dynamic_smem(reinterpret_cast<const void*>(fused), plan.fused_smem_backward);
    fused<<<dim3(plan.tiles_per_image * B), kThreads, plan.fused_smem_backward, stream>>>(
        static_cast<const T*>(grad_h), static_cast<const T*>(x), weight_t, static_cast<const T*>(bias),
        static_cast<const T*>(scale), dh0, modulation_partial, B, H, W, C, plan.padded_channels, plan.tile_rows,
        plan.chunk_channels, plan.tiles_w, plan.tiles_per_image, eps, vectorized);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // The gradient kernels' 8 x 8 tiles share the fused kernels' 8-pixel columns (plan.tiles_w), not their rows.
    const int grad_tiles = plan.tiles_w * ceil_div(H, kGradRows);
    input_grad_kernel<T><<<dim3(grad_tiles * B, ceil_div(C, kGradChunk)), kThreads, 0, stream>>>(
        dh0, weight_t, static_cast<T*>(dx), H, W, C, plan.padded_channels, plan.tiles_w, grad_tiles, vec_dh0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    weight_grad_kernel<T><<<dim3(ceil_div(C, kGradChunk), plan.weight_splits), kThreads, 0, stream>>>(
        static_cast<const T*>(x), dh0, weight_partial, B, H, W, C, plan.tiles_w, grad_tiles, plan.weight_splits,
        vectorized, vec_dh0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fcdm
