// CUDA kernels of LayerNorm / RMSNorm over rows x [M, N] (math in layer_norm.cuh).
//
// Forward and the input cotangents: one block per row. The row is read once from global memory and
// cached, in float32, in shared memory (x̂, and the current tangent row), so the statistics, their
// tangents and the outputs need no second read; packs of 16 bytes, each thread owning the same
// packs in every pass (shared memory laid out [pack element][pack] so that a warp's accesses are
// conflict-free). Accumulation is in float32 for every input dtype.
// Weight and bias cotangents: a second kernel over 32-column tiles sums ḡ x̂, ḡ, ġ x̂ + ḡ ẋ̂, ġ over
// the rows into per-block partials (deterministic, no atomics), which one torch sum reduces.
//
// Bytes moved, s = bytes per element, M×N rows, K tangents (the statistics are O(M K)):
//   norm_fwd_jvp: read (1 + K) M N s, write (1 + K) M N s (+ γ, β, γ̇, β̇: O(K N))
//   norm_bwd_jvp: x cotangents: read (2 + 2K) M N s (x, ḡ, ġ, ẋ), write (1 + K) M N s;
//                 weight/bias cotangents: read the same (2 + 2K) M N s again, write O(K N)
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "layer_norm.cuh"
#include "ops.h"

namespace hessfast {

namespace {

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

// A pack of γ (1 without weight) or of an optional row (0 when absent).
template <int V, typename T>
__device__ __forceinline__ void load_or(const T* p, int64_t i, int64_t n, bool vec, float fill,
                                        float (&out)[V]) {
  if (p != nullptr) {
    load_pack<V>(p, i, n, vec, out);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = fill;
  }
}

template <typename scalar_t>
__global__ void norm_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                const scalar_t* __restrict__ b, const scalar_t* __restrict__ tx,
                                const scalar_t* __restrict__ tw, const scalar_t* __restrict__ tb,
                                scalar_t* __restrict__ y, scalar_t* __restrict__ ydot,
                                float* __restrict__ stats, float* __restrict__ tstats, int64_t M,
                                int64_t N, int64_t K, float eps, bool center, bool vec) {
  constexpr int V = pack_size<scalar_t>();
  extern __shared__ float smem[];
  __shared__ float red[2 * 32];
  const int64_t C = (N + V - 1) / V;
  float* xs = smem;          // x, then x̂
  float* ts = smem + C * V;  // the current tangent row ẋ_k
  const int64_t n = blockIdx.x;
  const float inv_n = 1.f / static_cast<float>(N);

  float part[1] = {0.f};
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    float v[V];
    load_pack<V>(x + n * N, c * V, N, vec, v);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      xs[j * C + c] = v[j];
      part[0] += v[j];
    }
  }
  float mean = 0.f;
  if (center) {
    block_sum<1>(part, red);
    mean = part[0] * inv_n;
  }
  part[0] = 0.f;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float d = c * V + j < N ? xs[j * C + c] - mean : 0.f;
      part[0] += d * d;
    }
  }
  block_sum<1>(part, red);
  const float rstd = norm_rstd(part[0] * inv_n, eps);
  if (threadIdx.x == 0) {
    stats[2 * n] = mean;
    stats[2 * n + 1] = rstd;
  }
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    float wv[V], bv[V], o[V];
    load_or<V>(w, c * V, N, vec, 1.f, wv);
    load_or<V>(b, c * V, N, vec, 0.f, bv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float xh = c * V + j < N ? norm_xhat(xs[j * C + c], mean, rstd) : 0.f;
      xs[j * C + c] = xh;
      o[j] = wv[j] * xh + bv[j];
    }
    store_pack<V>(y + n * N, c * V, N, vec, o);
  }
  for (int64_t k = 0; k < K; ++k) {
    const int64_t row = (k * M + n) * N;
    float tm = 0.f, a = 0.f;
    if (tx != nullptr) {
      float s[2] = {0.f, 0.f};
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
        float t[V];
        load_pack<V>(tx + row, c * V, N, vec, t);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          ts[j * C + c] = t[j];
          s[0] += t[j];
          s[1] += xs[j * C + c] * t[j];
        }
      }
      block_sum<2>(s, red);
      tm = center ? s[0] * inv_n : 0.f;
      a = s[1] * inv_n;
      if (threadIdx.x == 0) {
        tstats[2 * (k * M + n)] = tm;
        tstats[2 * (k * M + n) + 1] = a;
      }
    }
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      float wv[V], wd[V], bd[V], o[V];
      load_or<V>(w, c * V, N, vec, 1.f, wv);
      load_or<V>(tw == nullptr ? tw : tw + k * N, c * V, N, vec, 0.f, wd);
      load_or<V>(tb == nullptr ? tb : tb + k * N, c * V, N, vec, 0.f, bd);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float xh = xs[j * C + c];
        float p = tx != nullptr ? norm_project(ts[j * C + c], tm, xh, a) : 0.f;
        o[j] = norm_tangent_out(wv[j], rstd, p, wd[j], xh, bd[j]);
      }
      store_pack<V>(ydot + row, c * V, N, vec, o);
    }
  }
}

template <typename scalar_t>
__global__ void norm_bwd_x_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                  const scalar_t* __restrict__ tx, const scalar_t* __restrict__ tw,
                                  const float* __restrict__ stats, const float* __restrict__ tstats,
                                  const scalar_t* __restrict__ g, const scalar_t* __restrict__ gdot,
                                  scalar_t* __restrict__ gx, scalar_t* __restrict__ gdx, int64_t M,
                                  int64_t N, int64_t K, bool center, bool second, bool wdot_g,
                                  bool vec) {
  constexpr int V = pack_size<scalar_t>();
  extern __shared__ float smem[];
  __shared__ float red[3 * 32];
  const int64_t C = (N + V - 1) / V;
  float* xs = smem;              // x̂
  float* gs = smem + C * V;      // ḡ
  float* cds = smem + 2 * C * V;  // ċ_k
  float* xds = smem + 3 * C * V;  // ẋ̂_k
  const int64_t n = blockIdx.x;
  const float inv_n = 1.f / static_cast<float>(N);
  const float mean = stats[2 * n], r = stats[2 * n + 1];

  // S1 = mean(c), S2 = mean(x̂ c), c = γ ḡ
  float s[2] = {0.f, 0.f};
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    float xv[V], wv[V], gv[V];
    load_pack<V>(x + n * N, c * V, N, vec, xv);
    load_or<V>(w, c * V, N, vec, 1.f, wv);
    load_or<V>(g == nullptr ? g : g + n * N, c * V, N, vec, 0.f, gv);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float xh = c * V + j < N ? norm_xhat(xv[j], mean, r) : 0.f;
      xs[j * C + c] = xh;
      gs[j * C + c] = gv[j];
      s[0] += wv[j] * gv[j];
      s[1] += xh * wv[j] * gv[j];
    }
  }
  block_sum<2>(s, red);
  const float s1 = center ? s[0] * inv_n : 0.f, s2 = s[1] * inv_n;
  if (gx != nullptr) {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      float wv[V], o[V];
      load_or<V>(w, c * V, N, vec, 1.f, wv);
#pragma unroll
      for (int j = 0; j < V; ++j)
        o[j] = r * norm_project(wv[j] * gs[j * C + c], s1, xs[j * C + c], s2);
      store_pack<V>(gx + n * N, c * V, N, vec, o);
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const int64_t row = (k * M + n) * N;
    const float tm = second ? tstats[2 * (k * M + n)] : 0.f;
    const float a = second ? tstats[2 * (k * M + n) + 1] : 0.f;
    // T1 = mean(ċ), T2 = mean(x̂ ċ), T3 = mean(ẋ̂ c)
    float t[3] = {0.f, 0.f, 0.f};
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      float wv[V], gd[V], wd[V], xd[V];
      load_or<V>(w, c * V, N, vec, 1.f, wv);
      load_or<V>(gdot == nullptr ? gdot : gdot + row, c * V, N, vec, 0.f, gd);
      load_or<V>(wdot_g ? tw + k * N : nullptr, c * V, N, vec, 0.f, wd);
      load_or<V>(second ? tx + row : nullptr, c * V, N, vec, 0.f, xd);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float xh = xs[j * C + c], gv = gs[j * C + c];
        const float cd = wv[j] * gd[j] + wd[j] * gv;
        const float xhd = second && c * V + j < N ? r * norm_project(xd[j], tm, xh, a) : 0.f;
        cds[j * C + c] = cd;
        xds[j * C + c] = xhd;
        t[0] += cd;
        t[1] += xh * cd;
        t[2] += xhd * wv[j] * gv;
      }
    }
    block_sum<3>(t, red);
    const float t1 = center ? t[0] * inv_n : 0.f, t2 = t[1] * inv_n, t3 = t[2] * inv_n;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      float wv[V], o[V];
      load_or<V>(w, c * V, N, vec, 1.f, wv);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float xh = xs[j * C + c];
        o[j] = r * norm_project(cds[j * C + c], t1, xh, t2);
        if (second) {
          const float pc = norm_project(wv[j] * gs[j * C + c], s1, xh, s2);
          o[j] += norm_second_order(r, a, pc, xds[j * C + c], s2, xh, t3);
        }
      }
      store_pack<V>(gdx + row, c * V, N, vec, o);
    }
  }
}

constexpr int kTileCols = 32, kTileRows = 8, kMaxChunk = 16;

// Column sums over rows for the weight and bias cotangents, tangents k0 .. k0 + kc: block
// (32 columns, 8 row lanes) accumulates, in its own shared-memory slots, ḡ x̂ and ḡ (with primal)
// and for each k ġ_k x̂ + ḡ ẋ̂_k and ġ_k; the 8 lanes are summed into part [gridDim.y, Q, N],
// rows q = 0 (ḡ_γ), 1 (ḡ_β), 2 + 2k (ġ_γ,k), 3 + 2k (ġ_β,k).
template <typename scalar_t>
__global__ void __launch_bounds__(kTileCols* kTileRows)
    norm_bwd_w_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ tx,
                      const float* __restrict__ stats, const float* __restrict__ tstats,
                      const scalar_t* __restrict__ g, const scalar_t* __restrict__ gdot,
                      float* __restrict__ part, int64_t M, int64_t N, int64_t Q, int64_t k0,
                      int64_t kc, bool primal, bool second) {
  constexpr int T = kTileCols * kTileRows;
  extern __shared__ float acc[];  // [2 + 2 kc][T]
  const int lin = threadIdx.y * kTileCols + threadIdx.x;
  const int64_t q_local = 2 + 2 * kc;
  for (int64_t q = 0; q < q_local; ++q) acc[q * T + lin] = 0.f;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTileCols + threadIdx.x;
  if (j < N) {
    for (int64_t n = static_cast<int64_t>(blockIdx.y) * kTileRows + threadIdx.y; n < M;
         n += static_cast<int64_t>(gridDim.y) * kTileRows) {
      const float r = stats[2 * n + 1];
      const float xh = norm_xhat(static_cast<float>(x[n * N + j]), stats[2 * n], r);
      const float gv = g != nullptr ? static_cast<float>(g[n * N + j]) : 0.f;
      if (primal) {
        acc[lin] += gv * xh;
        acc[T + lin] += gv;
      }
      for (int64_t kk = 0; kk < kc; ++kk) {
        const int64_t k = k0 + kk, i = (k * M + n) * N + j;
        const float gd = gdot != nullptr ? static_cast<float>(gdot[i]) : 0.f;
        float sw = gd * xh;
        if (second) {
          const float* ts = tstats + 2 * (k * M + n);
          sw += gv * r * norm_project(static_cast<float>(tx[i]), ts[0], xh, ts[1]);
        }
        acc[(2 + 2 * kk) * T + lin] += sw;
        acc[(3 + 2 * kk) * T + lin] += gd;
      }
    }
  }
  __syncthreads();
  for (int64_t idx = lin; idx < q_local * kTileCols; idx += T) {
    const int64_t q = idx / kTileCols, col = idx % kTileCols;
    const int64_t jj = static_cast<int64_t>(blockIdx.x) * kTileCols + col;
    if (jj >= N || (q < 2 && !primal)) continue;
    float s = 0.f;
#pragma unroll
    for (int ty = 0; ty < kTileRows; ++ty) s += acc[q * T + ty * kTileCols + col];
    const int64_t q_global = q < 2 ? q : q + 2 * k0;
    part[(static_cast<int64_t>(blockIdx.y) * Q + q_global) * N + jj] = s;
  }
}

void check_cuda_float(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": argument 'x' must be a CUDA tensor, got ", x.device());
  auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": the CUDA kernels take float32, float16 and bfloat16; argument 'x' is ", t);
}

// Dynamic shared memory for `rows` cached float rows of N (padded to whole packs); opts the
// kernel in above the default 48 KiB, or says why the row does not fit.
template <typename Kernel>
size_t row_cache_bytes(Kernel kernel, int64_t N, int V, int rows, const char* op) {
  const size_t bytes = static_cast<size_t>(rows) * ((N + V - 1) / V) * V * sizeof(float);
  const size_t optin = device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  TORCH_CHECK(bytes + 1024 <= optin, op, ": rows of N = ", N, " columns need ", bytes,
              " bytes of shared memory for the row cache; this GPU allows ", optin,
              " per block (use the Triton or torch backend for such rows)");
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  return bytes;
}

}  // namespace

Tensor4 norm_fwd_jvp_cuda(const at::Tensor& x, const OptTensor& w, const OptTensor& b,
                          const OptTensor& tx, const OptTensor& tw, const OptTensor& tb,
                          double eps, bool center) {
  const char* op = "hessfast::norm_fwd_jvp";
  check_cuda_float(x, op);
  check_norm_fwd(x, w, b, tx, tw, tb);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y, ydot, stats, tstats;
  std::tie(y, ydot, stats, tstats) = alloc_norm_fwd(x, tx, tw, tb);
  const int64_t M = x.size(0), N = x.size(1), K = ydot.size(0);
  if (M == 0) return {y, ydot, stats, tstats};
  auto stream = c10::cuda::getCurrentCUDAStream();
  HF_DISPATCH_CUDA_FLOATS(x.scalar_type(), "norm_fwd_jvp_cuda", [&] {
    constexpr int V = pack_size<scalar_t>();
    const scalar_t *wp = ptr_or_null<scalar_t>(w), *bp = ptr_or_null<scalar_t>(b),
                   *txp = ptr_or_null<scalar_t>(tx), *twp = ptr_or_null<scalar_t>(tw),
                   *tbp = ptr_or_null<scalar_t>(tb);
    scalar_t* ydp = K ? ydot.data_ptr<scalar_t>() : nullptr;
    const bool vec = (N * sizeof(scalar_t)) % 16 == 0 &&
                     aligned16({x.data_ptr(), wp, bp, txp, twp, tbp, y.data_ptr(), ydp});
    auto kernel = norm_fwd_kernel<scalar_t>;
    const size_t smem = row_cache_bytes(kernel, N, V, txp ? 2 : 1, op);
    kernel<<<M, row_threads(N, V, 512), smem, stream>>>(
        x.data_ptr<scalar_t>(), wp, bp, txp, twp, tbp, y.data_ptr<scalar_t>(), ydp,
        stats.data_ptr<float>(), txp ? tstats.data_ptr<float>() : nullptr, M, N, K,
        static_cast<float>(eps), center, vec);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, ydot, stats, tstats};
}

Tensor6 norm_bwd_jvp_cuda(const at::Tensor& x, const OptTensor& w, const OptTensor& tx,
                          const OptTensor& tw, const at::Tensor& stats, const at::Tensor& tstats,
                          const OptTensor& g, const OptTensor& gdot, bool center, bool need_x,
                          bool need_w, bool need_b) {
  const char* op = "hessfast::norm_bwd_jvp";
  check_cuda_float(x, op);
  check_norm_bwd(x, w, tx, tw, stats, tstats, g, gdot, need_w);
  c10::cuda::CUDAGuard guard(x.device());
  const NormBwdPlan p = plan_norm_bwd(tx, tw, g, gdot, need_x, need_w, need_b);
  at::Tensor gx, gdx, gw, gdw, gb, gdb;
  std::tie(gx, gdx, gw, gdw, gb, gdb) = alloc_norm_bwd(x, tx, tw, gdot, p);
  const int64_t M = x.size(0), N = x.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  HF_DISPATCH_CUDA_FLOATS(x.scalar_type(), "norm_bwd_jvp_cuda", [&] {
    constexpr int V = pack_size<scalar_t>();
    const scalar_t *wp = ptr_or_null<scalar_t>(w), *gp = ptr_or_null<scalar_t>(g),
                   *gdp = ptr_or_null<scalar_t>(gdot);
    const scalar_t* txp = p.second ? tx->data_ptr<scalar_t>() : nullptr;
    const scalar_t* twp = p.wdot_g ? tw->data_ptr<scalar_t>() : nullptr;
    const float* tsp = p.second ? tstats.data_ptr<float>() : nullptr;
    const int64_t Kx = gdx.size(0);
    if ((p.gx || p.gdx) && M > 0) {
      scalar_t* gxp = p.gx ? gx.data_ptr<scalar_t>() : nullptr;
      scalar_t* gdxp = p.gdx ? gdx.data_ptr<scalar_t>() : nullptr;
      const bool vec = (N * sizeof(scalar_t)) % 16 == 0 &&
                       aligned16({x.data_ptr(), wp, txp, twp, gp, gdp, gxp, gdxp});
      auto kernel = norm_bwd_x_kernel<scalar_t>;
      const size_t smem = row_cache_bytes(kernel, N, V, Kx ? 4 : 2, op);
      kernel<<<M, row_threads(N, V, 512), smem, stream>>>(
          x.data_ptr<scalar_t>(), wp, txp, twp, stats.data_ptr<float>(), tsp, gp, gdp, gxp,
          gdxp, M, N, Kx, center, p.second, p.wdot_g, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (!(p.gw || p.gdw || p.gb || p.gdb)) return;
    const int64_t K = std::max(gdw.size(0), gdb.size(0));
    const int64_t Q = 2 + 2 * K;
    const int64_t tiles = (N + kTileCols - 1) / kTileCols;
    const int64_t sms = device_attr(cudaDevAttrMultiProcessorCount);
    const int64_t gy = std::max<int64_t>(
        1, std::min<int64_t>({(4 * sms + tiles - 1) / tiles, (M + kTileRows - 1) / kTileRows, 64}));
    at::Tensor part = at::empty({gy, Q, N}, x.options().dtype(at::kFloat));
    if (M == 0) part.zero_();
    for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kMaxChunk) {
      const int64_t kc = std::min<int64_t>(kMaxChunk, K - k0);
      const size_t smem = static_cast<size_t>(2 + 2 * kc) * kTileCols * kTileRows * sizeof(float);
      if (M > 0)
        norm_bwd_w_kernel<scalar_t><<<dim3(tiles, gy), dim3(kTileCols, kTileRows), smem, stream>>>(
            x.data_ptr<scalar_t>(), txp, stats.data_ptr<float>(), tsp, gp, gdp,
            part.data_ptr<float>(), M, N, Q, k0, kc, k0 == 0, p.second);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    at::Tensor tot = part.sum(0);
    if (p.gw) gw.copy_(tot.select(0, 0));
    if (p.gb) gb.copy_(tot.select(0, 1));
    if (p.gdw) gdw.copy_(tot.slice(0, 2, Q, 2));
    if (p.gdb) gdb.copy_(tot.slice(0, 3, Q, 2));
  });
  return {gx, gdx, gw, gdw, gb, gdb};
}

}  // namespace hessfast
