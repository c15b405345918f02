// Runs the CUDA kernels of this directory on the CPU, for tests on machines without a GPU (tests/test_cuda_build.py).
//
// Not part of the extension (setup.py and CMake compile only .cu/.cpp). The test strips the CUDA includes from the .cu
// file, rewrites `kernel<<<grid, block, smem, stream>>>(args)` into `emu::launch(kernel, grid, block, smem, stream,
// args)` and the dynamic shared memory declaration into `emu::dynamic_smem()`, and compiles it as C++ after this
// header.
// Every CUDA thread of a block is a cooperatively scheduled fiber; __syncthreads is a barrier over the block and warp
// shuffles exchange through a per-warp buffer with a barrier over the warp, so the kernels' indexing, tiling,
// synchronisation and reductions run exactly as written (a missing __syncthreads shows up as a data race would: wrong
// values). Dynamic shared memory starts as NaN in every block. Blocks run one after another.
// Every launch is checked against CUDA's grid limits (2^31 - 1 blocks on x, 65,535 on y and z); in a dry run
// (emu_set_dry_run) launches are only checked, not run, so the host code can be tested at batches far too large to
// emulate.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <ucontext.h>
#include <functional>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define C10_CUDA_CHECK(expr) ((void)(expr))
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

using std::max;
using std::min;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 { unsigned x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
template <typename T> inline T __ldg(const T* p) { return *p; }

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
struct __half2 { __half x, y; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline float __half2float(__half v) { return static_cast<float>(v); }
inline __half __float2half_rn(float v) { return __half(v); }  // c10::Half rounds to nearest even, as the intrinsic
inline float2 __half22float2(__half2 v) { return {static_cast<float>(v.x), static_cast<float>(v.y)}; }
inline __half2 __float22half2_rn(float2 v) { return {__half(v.x), __half(v.y)}; }
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(v); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {static_cast<float>(v.x), static_cast<float>(v.y)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return {__nv_bfloat16(v.x), __nv_bfloat16(v.y)}; }

using cudaStream_t = void*;
using cudaError_t = int;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount, cudaDevAttrMaxSharedMemoryPerBlockOptin };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
// An H100: 132 SMs, 227 KB of opt-in shared memory per block.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? 132 : 227 * 1024;
  return 0;
}
inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return 0; }

namespace emu {

// A CUDA thread: a user-space context with its own stack, switched cooperatively (ucontext), so a barrier costs a
// few context switches in user space instead of waking OS threads.
struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  dim3 thread_idx;
  bool done = false;
};

inline dim3 grid_dim, block_dim, block_idx;
inline std::vector<unsigned char> smem;
inline std::vector<Fiber> fibers;
inline Fiber* current = nullptr;
inline ucontext_t scheduler;
inline std::function<void()> body;
inline unsigned block_arrived = 0, block_phase = 0;
inline std::vector<unsigned> warp_arrived, warp_phase;
inline std::vector<float> warp_slots;
inline bool dry_run = false;

inline void yield() { swapcontext(&current->context, &scheduler); }

// A barrier over `participants` fibers: the last to arrive opens the next phase; the others yield until it does.
inline void arrive_and_wait(unsigned& arrived, unsigned& phase, unsigned participants) {
  const unsigned mine = phase;
  if (++arrived == participants) {
    arrived = 0;
    ++phase;
    return;
  }
  while (phase == mine) yield();
}

inline void syncthreads() { arrive_and_wait(block_arrived, block_phase, block_dim.x); }

inline float shfl_xor(float v, int offset) {
  const unsigned warp = current->thread_idx.x / 32, lane = current->thread_idx.x % 32;
  warp_slots[warp * 32 + lane] = v;
  arrive_and_wait(warp_arrived[warp], warp_phase[warp], 32);
  const float other = warp_slots[warp * 32 + (lane ^ offset)];
  arrive_and_wait(warp_arrived[warp], warp_phase[warp], 32);
  return other;
}

inline void fiber_main() {
  body();
  current->done = true;  // returning resumes uc_link, the scheduler
}

inline unsigned char* dynamic_smem() {
  return reinterpret_cast<unsigned char*>((reinterpret_cast<std::uintptr_t>(smem.data()) + 15) / 16 * 16);
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t, Args... args) {
  const unsigned threads = block.x * block.y * block.z;
  TORCH_CHECK(block.y == 1 && block.z == 1 && threads % 32 == 0, "emulation supports 1-D blocks of whole warps");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535 &&
                  grid.z <= 65535,
              "grid (", grid.x, ", ", grid.y, ", ", grid.z, ") exceeds CUDA's limits (2^31 - 1, 65535, 65535)");
  if (dry_run) return;
  grid_dim = grid;
  block_dim = block;
  body = [&] { kernel(args...); };
  fibers = std::vector<Fiber>(threads);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        block_idx = dim3(x, y, z);
        smem.assign(smem_bytes + 16, 0xFF);  // all-ones bytes are NaN in fp32, fp16 and bf16
        block_arrived = block_phase = 0;
        warp_arrived.assign(threads / 32, 0);
        warp_phase.assign(threads / 32, 0);
        warp_slots.assign(threads, 0.f);
        for (unsigned t = 0; t < threads; ++t) {
          Fiber& f = fibers[t];
          f.stack.resize(256 * 1024);
          f.thread_idx = dim3(t);
          f.done = false;
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.data();
          f.context.uc_stack.ss_size = f.stack.size();
          f.context.uc_link = &scheduler;
          makecontext(&f.context, fiber_main, 0);
        }
        // Round robin until every thread of the block has returned; a thread runs until it waits at a barrier.
        for (bool running = true; running;) {
          running = false;
          for (Fiber& f : fibers) {
            if (f.done) continue;
            running = true;
            current = &f;
            swapcontext(&scheduler, &f.context);
          }
        }
      }
}

}  // namespace emu

// Test hooks, callable through ctypes.
extern "C" void emu_set_dry_run(int on) { emu::dry_run = on != 0; }
extern "C" int emu_grid_accepted(unsigned x, unsigned y, unsigned z) {
  const bool was = emu::dry_run;
  emu::dry_run = true;
  int accepted = 1;
  try {
    emu::launch(+[] {}, dim3(x, y, z), dim3(32), 0, nullptr);
  } catch (const std::exception&) {
    accepted = 0;
  }
  emu::dry_run = was;
  return accepted;
}

#define threadIdx (emu::current->thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
inline void __syncthreads() { emu::syncthreads(); }
inline float __shfl_xor_sync(unsigned, float v, int offset) { return emu::shfl_xor(v, offset); }
