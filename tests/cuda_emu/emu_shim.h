// Just enough of CUDA to run kernel source on the CPU, for tests on machines
// without a GPU: one std::thread per CUDA thread, CTAs one after another, so a
// kernel's `static` locals (what __shared__ becomes) are its CTA's shared
// memory. fp32 maths is the host's; sincosf/exp2f are glibc's, not CUDA's, so
// this checks indexing, synchronisation and the algorithm, not ulps or speed.
#pragma once
#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

using std::max;
using std::min;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 x) {
  const uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {  // round to nearest even (no NaN inputs)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}
inline float __half2float(__half x) {
  _Float16 h;
  std::memcpy(&h, &x.bits, 2);
  return float(h);
}
inline __half __float2half_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  __half r;
  std::memcpy(&r.bits, &h, 2);
  return r;
}

// A barrier whose waiters sleep: std::barrier spins, and hundreds of spinning
// threads would starve a small shared machine.
class EmuBarrier {
 public:
  explicit EmuBarrier(unsigned n) : expected_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const unsigned long phase = phase_;
    if (++arrived_ >= expected_) {
      complete();
    } else {
      cv_.wait(lock, [&] { return phase_ != phase; });
    }
  }
  void arrive_and_drop() {
    std::lock_guard<std::mutex> lock(mu_);
    --expected_;
    if (expected_ > 0 && arrived_ >= expected_) complete();
  }

 private:
  void complete() {
    arrived_ = 0;
    ++phase_;
    cv_.notify_all();
  }
  std::mutex mu_;
  std::condition_variable cv_;
  unsigned expected_, arrived_ = 0;
  unsigned long phase_ = 0;
};

struct EmuWarp {
  EmuBarrier bar{32};
  float buf[32];
};
struct EmuCta {
  explicit EmuCta(unsigned n) : bar(n) {
    for (unsigned w = 0; w < (n + 31) / 32; ++w) warps.emplace_back(new EmuWarp);
  }
  EmuBarrier bar;
  std::vector<std::unique_ptr<EmuWarp>> warps;
};
inline thread_local EmuCta* emu_cta = nullptr;

inline void __syncthreads() { emu_cta->bar.arrive_and_wait(); }
inline EmuWarp& emu_warp() { return *emu_cta->warps[threadIdx.x / 32]; }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp().bar.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float x, int offset) {
  EmuWarp& w = emu_warp();
  const unsigned lane = threadIdx.x % 32;
  w.buf[lane] = x;
  w.bar.arrive_and_wait();
  const float r = w.buf[lane ^ offset];
  w.bar.arrive_and_wait();
  return r;
}

// kernel<<<grid, block>>>(args) becomes emu_launch(grid, block, [&] { kernel(args); }).
// A thread that returns drops out of its CTA's barriers, as an exited CUDA thread does.
template <typename F>
void emu_launch(dim3 grid, dim3 block, F kernel) {
  gridDim = grid;
  blockDim = block;
  const unsigned n = block.x, ctas = grid.x * grid.y * grid.z;
  std::vector<std::unique_ptr<EmuCta>> state;
  for (unsigned c = 0; c < ctas; ++c) state.emplace_back(new EmuCta(n));
  EmuBarrier cta_done(n);  // no thread starts a CTA while shared memory is in use
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < n; ++t) {
    threads.emplace_back([&, t] {
      threadIdx = dim3(t);
      for (unsigned c = 0; c < ctas; ++c) {
        blockIdx = dim3(c % grid.x, (c / grid.x) % grid.y, c / (grid.x * grid.y));
        emu_cta = state[c].get();
        kernel();
        emu_cta->bar.arrive_and_drop();
        emu_warp().bar.arrive_and_drop();
        cta_done.arrive_and_wait();
      }
    });
  }
  for (auto& th : threads) th.join();
}
