// CUDA kernels of the elementwise activations (math in activation.cuh).
//
// One thread handles one 16-byte pack of elements (4 float32, 8 float16/bfloat16) per grid-stride
// step: it reads x (or the residual, and ḡ) once, keeps f' and f'' in registers, and streams the K
// tangent rows through them. Accumulation is in float32.
//
// Bytes moved, s = bytes per element, n elements, K tangents:
//   act_fwd_jvp: read (1 + K) n s, write (1 + K) n s
//   act_bwd_jvp: read (2 + 2K) n s (src, ḡ, ġ, ẋ), write (1 + K) n s; less what is absent
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "activation.cuh"
#include "ops.h"

namespace hessfast {

namespace {

constexpr int kThreads = 256;

template <typename scalar_t, Act A>
__global__ void __launch_bounds__(kThreads)
    act_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ tx,
                   scalar_t* __restrict__ y, scalar_t* __restrict__ ydot, int64_t n, int64_t K,
                   bool vec) {
  constexpr int V = pack_size<scalar_t>();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < n;
       i += stride) {
    float xv[V], yv[V], d1[V];
    load_pack<V>(x, i, n, vec, xv);
#pragma unroll
    for (int j = 0; j < V; ++j) act_value_d1<A>(xv[j], yv[j], d1[j]);
    store_pack<V>(y, i, n, vec, yv);
    for (int64_t k = 0; k < K; ++k) {
      float t[V];
      load_pack<V>(tx + k * n, i, n, vec, t);
#pragma unroll
      for (int j = 0; j < V; ++j) t[j] *= d1[j];
      store_pack<V>(ydot + k * n, i, n, vec, t);
    }
  }
}

template <typename scalar_t, Act A>
__global__ void __launch_bounds__(kThreads)
    act_bwd_kernel(const scalar_t* __restrict__ src, const scalar_t* __restrict__ g,
                   const scalar_t* __restrict__ gdot, const scalar_t* __restrict__ tx,
                   scalar_t* __restrict__ gx, scalar_t* __restrict__ gdx, int64_t n, int64_t K,
                   bool second, bool vec) {
  constexpr int V = pack_size<scalar_t>();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < n;
       i += stride) {
    float s[V], d1[V], d2[V], gv[V];
    load_pack<V>(src, i, n, vec, s);
#pragma unroll
    for (int j = 0; j < V; ++j) act_d1_d2<A>(s[j], d1[j], d2[j]);
    if (g == nullptr) {
#pragma unroll
      for (int j = 0; j < V; ++j) gv[j] = 0.f;
    } else {
      load_pack<V>(g, i, n, vec, gv);
      if (gx != nullptr) {
        float o[V];
#pragma unroll
        for (int j = 0; j < V; ++j) o[j] = d1[j] * gv[j];
        store_pack<V>(gx, i, n, vec, o);
      }
    }
    for (int64_t k = 0; k < K; ++k) {
      float o[V];
      if (gdot != nullptr) {
        load_pack<V>(gdot + k * n, i, n, vec, o);
#pragma unroll
        for (int j = 0; j < V; ++j) o[j] *= d1[j];
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) o[j] = 0.f;
      }
      if (second) {
        float t[V];
        load_pack<V>(tx + k * n, i, n, vec, t);
#pragma unroll
        for (int j = 0; j < V; ++j) o[j] += d2[j] * gv[j] * t[j];
      }
      store_pack<V>(gdx + k * n, i, n, vec, o);
    }
  }
}

// Blocks for n elements in packs of V: enough to fill the device, grid-stride beyond that.
int grid_for(int64_t n, int V) {
  const int64_t packs = (n + V - 1) / V;
  const int64_t want = (packs + kThreads - 1) / kThreads;
  const int64_t cap = device_attr(cudaDevAttrMultiProcessorCount) * 16;
  return static_cast<int>(std::max<int64_t>(1, std::min(want, cap)));
}

void check_cuda_float(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": argument '", name, "' must be a CUDA tensor, got ", x.device());
  auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": the CUDA kernels take float32, float16 and bfloat16; argument '", name,
              "' is ", t);
}

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

}  // namespace

Tensor2 act_fwd_jvp_cuda(const at::Tensor& x, const OptTensor& tx, c10::string_view act) {
  Act a = parse_act(act);
  check_cuda_float(x, "x", "hessfast::act_fwd_jvp");
  check_act_fwd(x, tx);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y, ydot;
  std::tie(y, ydot) = alloc_act_fwd(x, tx);
  const int64_t n = x.numel(), K = tx ? tx->size(0) : 0;
  if (n == 0) return {y, ydot};
  auto stream = c10::cuda::getCurrentCUDAStream();
  HF_DISPATCH_CUDA_FLOATS(x.scalar_type(), "act_fwd_jvp_cuda", [&] {
    constexpr int V = pack_size<scalar_t>();
    const scalar_t* tp = ptr_or_null<scalar_t>(tx);
    const bool vec = n % V == 0 && aligned16({x.data_ptr(), tp, y.data_ptr(),
                                               K ? ydot.data_ptr() : nullptr});
    dispatch_act(a, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      act_fwd_kernel<scalar_t, A><<<grid_for(n, V), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), tp, y.data_ptr<scalar_t>(),
          K ? ydot.data_ptr<scalar_t>() : nullptr, n, K, vec);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, ydot};
}

Tensor2 act_bwd_jvp_cuda(const at::Tensor& src, const OptTensor& g, const OptTensor& gdot,
                         const OptTensor& tx, c10::string_view act) {
  Act a = parse_act(act);
  check_cuda_float(src, "src", "hessfast::act_bwd_jvp");
  check_act_bwd(src, g, gdot, tx);
  c10::cuda::CUDAGuard guard(src.device());
  at::Tensor gx, gdx;
  std::tie(gx, gdx) = alloc_act_bwd(src, g, gdot, tx, a);
  const bool second = act_second(a, g, tx);
  const int64_t n = src.numel(), K = gdx.size(0);
  if (n == 0 || (!g && K == 0)) return {gx, gdx};
  auto stream = c10::cuda::getCurrentCUDAStream();
  HF_DISPATCH_CUDA_FLOATS(src.scalar_type(), "act_bwd_jvp_cuda", [&] {
    constexpr int V = pack_size<scalar_t>();
    const scalar_t *gp = ptr_or_null<scalar_t>(g), *gdp = ptr_or_null<scalar_t>(gdot),
                   *tp = second ? ptr_or_null<scalar_t>(tx) : nullptr;
    scalar_t* gxp = g ? gx.data_ptr<scalar_t>() : nullptr;
    scalar_t* gdxp = K ? gdx.data_ptr<scalar_t>() : nullptr;
    const bool vec = n % V == 0 && aligned16({src.data_ptr(), gp, gdp, tp, gxp, gdxp});
    dispatch_act(a, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      act_bwd_kernel<scalar_t, A><<<grid_for(n, V), kThreads, 0, stream>>>(
          src.data_ptr<scalar_t>(), gp, gdp, tp, gxp, gdxp, n, K, second, vec);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gx, gdx};
}

}  // namespace hessfast
