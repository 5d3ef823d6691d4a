// Shared helpers of hessfast's kernels.
//
// The first half compiles for the host (g++, the CPU implementations in cpu.cpp) and for the
// device (nvcc): the per-element math of every op family is written once, against these wrappers,
// in <family>.cuh. The second half (__CUDACC__ only) holds device helpers: 16-byte packed loads
// and stores, and warp/block reductions.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#ifdef __CUDACC__
#define HF_HD __host__ __device__ __forceinline__
#else
#define HF_HD inline
#endif

namespace hessfast {

// The accumulation type of a storage type: float for float, half and bfloat16; double for double.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

HF_HD float hf_exp(float x) { return expf(x); }
HF_HD double hf_exp(double x) { return exp(x); }
HF_HD float hf_log(float x) { return logf(x); }
HF_HD double hf_log(double x) { return log(x); }
HF_HD float hf_erfc(float x) { return erfcf(x); }
HF_HD double hf_erfc(double x) { return erfc(x); }
HF_HD float hf_tanh(float x) { return tanhf(x); }
HF_HD double hf_tanh(double x) { return tanh(x); }
HF_HD float hf_sqrt(float x) { return sqrtf(x); }
HF_HD double hf_sqrt(double x) { return sqrt(x); }

template <typename T>
HF_HD T hf_max(T a, T b) {
  return a > b ? a : b;
}

template <typename T>
HF_HD T hf_neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
HF_HD T hf_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

}  // namespace hessfast

#ifdef __CUDACC__

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>

#include <initializer_list>

namespace hessfast {

// Dispatch over the storage types the CUDA kernels take: float32, float16, bfloat16.
#define HF_DISPATCH_CUDA_FLOATS(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                      \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__) \
                             AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// Elements of T in one 16-byte access.
template <typename T>
constexpr int pack_size() {
  return 16 / static_cast<int>(sizeof(T));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Load elements [i, i + N) of p (converted to float) into out; those past n read as 0. With vec
// (p 16-byte aligned and every row a whole number of packs) one 16-byte load, else N scalar loads.
template <int N, typename T>
__device__ __forceinline__ void load_pack(const T* __restrict__ p, int64_t i, int64_t n, bool vec,
                                          float (&out)[N]) {
  if (vec && i + N <= n) {
    Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p + i);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = static_cast<float>(pk.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = i + j < n ? static_cast<float>(p[i + j]) : 0.f;
  }
}

// Store elements [i, i + N) of p from in (rounded to T); those past n are not written.
template <int N, typename T>
__device__ __forceinline__ void store_pack(T* __restrict__ p, int64_t i, int64_t n, bool vec,
                                           const float (&in)[N]) {
  if (vec && i + N <= n) {
    Pack<T, N> pk;
#pragma unroll
    for (int j = 0; j < N; ++j) pk.v[j] = static_cast<T>(in[j]);
    *reinterpret_cast<Pack<T, N>*>(p + i) = pk;
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (i + j < n) p[i + j] = static_cast<T>(in[j]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum each of v[0..NV) over the (1-D) block; every thread receives the totals. scratch holds
// 32 * NV floats of shared memory. blockDim.x must be a multiple of 32.
template <int NV>
__device__ __forceinline__ void block_sum(float (&v)[NV], float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int q = 0; q < NV; ++q) v[q] = warp_sum(v[q]);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) {
#pragma unroll
    for (int q = 0; q < NV; ++q) scratch[q * 32 + warp] = v[q];
  }
  __syncthreads();
#pragma unroll
  for (int q = 0; q < NV; ++q) v[q] = warp_sum(lane < warps ? scratch[q * 32 + lane] : 0.f);
}

// The maximum of v over the (1-D) block, in every thread; scratch holds 32 floats.
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_max(lane < warps ? scratch[lane] : hf_neg_inf<float>());
}

// An attribute of the current device (cudaDevAttrMultiProcessorCount, ...).
inline int64_t device_attr(cudaDeviceAttr attr) {
  int dev = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, dev));
  return value;
}

// Threads for a row of n elements handled in packs of `pack`: a power of two in [32, cap].
inline int row_threads(int64_t n, int pack, int cap) {
  int64_t packs = (n + pack - 1) / pack;
  int t = 32;
  while (t < cap && t < packs) t <<= 1;
  return t;
}

// Whether every listed pointer is 16-byte aligned (nullptr counts as aligned).
inline bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

}  // namespace hessfast

#endif  // __CUDACC__
