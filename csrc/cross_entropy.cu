// CUDA kernel of hessfast::cross_entropy_rows (math in cross_entropy.cuh).
//
// One block per row of logits. Sweep 1 reads z and every tangent row u_k once, in 16-byte packs,
// keeping per thread an online softmax (running max m, Σ e^{z−m}) and Σ e^{z−m} u_k for each k
// (in the thread's own shared-memory slots), rescaled whenever its max grows; one block reduction
// combines them into the row max m, log Σ e^{z−m} and ⟨p, u_k⟩. Sweep 2 reads z and u_k again and
// writes the gradient and the K Hessian-vector rows. A vocabulary row (and its K tangents) is too
// long to keep on chip, so the second read is a re-read (served by L2 when the rows in flight fit).
// Tangents go 32 per launch (the shared-memory slots); later launches re-read z. Accumulation is in
// float32.
//
// Bytes moved, s = bytes per element, M rows of V classes, K tangents:
//   read 2 (1 + K) M V s (+ 8 M targets, 4 V weights), write (1 + K) M V s + 4 M losses
//   (without want_grad the gradient is not written: K M V s + 4 M)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "cross_entropy.cuh"
#include "ops.h"

namespace hessfast {

namespace {

constexpr int kMaxChunk = 32;

template <typename scalar_t>
__global__ void ce_rows_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ zdot,
                               const int64_t* __restrict__ target,
                               const float* __restrict__ weight, float* __restrict__ loss,
                               scalar_t* __restrict__ gz, scalar_t* __restrict__ gdz, int64_t M,
                               int64_t V, int64_t k0, int64_t kc, int64_t ignore_index, float eps,
                               float scale, bool primal, bool vec) {
  constexpr int P = pack_size<scalar_t>();
  extern __shared__ float sm[];  // [kc + 3][blockDim]: Σ e^{z−m} u_k, Σ e^{z−m}, Σ w z, Σ w; totals
  __shared__ float red[32];
  const int B = blockDim.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float* tot = sm + (kc + 3) * B;
  const int64_t n = blockIdx.x, C = (V + P - 1) / P;
  const scalar_t* zr = z + n * V;
  const int64_t y = target[n];

  if (y == ignore_index) {
    const float zero[P] = {};
    if (primal && tid == 0) loss[n] = 0.f;
    for (int64_t c = tid; c < C; c += B) {
      if (primal && gz != nullptr) store_pack<P>(gz + n * V, c * P, V, vec, zero);
      for (int64_t kk = 0; kk < kc; ++kk)
        store_pack<P>(gdz + ((k0 + kk) * M + n) * V, c * P, V, vec, zero);
    }
    return;
  }
  const bool valid = y >= 0 && y < V;
  const bool smooth = eps != 0.f;

  // sweep 1: online softmax and the tangent sums
  float m = hf_neg_inf<float>(), s = 0.f, swz = 0.f, wsum = 0.f;
  for (int64_t kk = 0; kk < kc; ++kk) sm[kk * B + tid] = 0.f;
  for (int64_t c = tid; c < C; c += B) {
    const int64_t i = c * P;
    float zv[P];
    load_pack<P>(zr, i, V, vec, zv);
    float cm = hf_neg_inf<float>();
#pragma unroll
    for (int j = 0; j < P; ++j) {
      if (i + j >= V) zv[j] = hf_neg_inf<float>();
      cm = fmaxf(cm, zv[j]);
    }
    if (cm > m) {
      const float f = rescale_factor(m, cm);
      s *= f;
      for (int64_t kk = 0; kk < kc; ++kk) sm[kk * B + tid] *= f;
      m = cm;
    }
    float e[P];
#pragma unroll
    for (int j = 0; j < P; ++j) {
      e[j] = softmax_term(zv[j], m);
      s += e[j];
    }
    for (int64_t kk = 0; kk < kc; ++kk) {
      float u[P];
      load_pack<P>(zdot + ((k0 + kk) * M + n) * V, i, V, vec, u);
      float acc = 0.f;
#pragma unroll
      for (int j = 0; j < P; ++j) acc += e[j] * u[j];
      sm[kk * B + tid] += acc;
    }
    if (smooth) {
#pragma unroll
      for (int j = 0; j < P; ++j) {
        if (i + j < V) {
          const float wc = weight != nullptr ? weight[i + j] : 1.f;
          swz += wc * zv[j];
          wsum += wc;
        }
      }
    }
  }
  // combine: rescale every thread's sums to the row max, then sum rows q of sm, one warp a row
  const float row_max = block_max(m, red);
  const float f = rescale_factor(m, row_max);
  for (int64_t kk = 0; kk < kc; ++kk) sm[kk * B + tid] *= f;
  sm[kc * B + tid] = s * f;
  sm[(kc + 1) * B + tid] = swz;
  sm[(kc + 2) * B + tid] = wsum;
  __syncthreads();
  for (int64_t q = warp; q < kc + 3; q += B / 32) {
    float a = 0.f;
    for (int t = lane; t < B; t += 32) a += sm[q * B + t];
    a = warp_sum(a);
    if (lane == 0) tot[q] = a;
  }
  __syncthreads();
  const float sum_e = tot[kc], inv_s = 1.f / sum_e;
  const float W = smooth ? tot[kc + 2] : static_cast<float>(V);
  const float wy = valid ? (weight != nullptr ? weight[y] : 1.f) : hf_nan<float>();
  const CeCoeffs<float> co = ce_coeffs(wy, W, eps, V);
  if (primal && tid == 0) {
    const float zy = valid ? static_cast<float>(zr[y]) : hf_nan<float>();
    loss[n] = ce_loss(co, scale, zy, tot[kc + 1], W, row_max, hf_log(sum_e));
  }

  // sweep 2: the gradient and the Hessian-vector rows
  for (int64_t c = tid; c < C; c += B) {
    const int64_t i = c * P;
    float zv[P], p[P];
    load_pack<P>(zr, i, V, vec, zv);
#pragma unroll
    for (int j = 0; j < P; ++j) p[j] = i + j < V ? softmax_term(zv[j], row_max) * inv_s : 0.f;
    if (primal && gz != nullptr) {
      float o[P];
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const float wc = smooth && weight != nullptr && i + j < V ? weight[i + j] : 1.f;
        o[j] = ce_grad(scale, co.A, p[j], ce_coeff(co, wc, i + j == y));
      }
      store_pack<P>(gz + n * V, i, V, vec, o);
    }
    for (int64_t kk = 0; kk < kc; ++kk) {
      const float pu = tot[kk] * inv_s;
      float u[P];
      scalar_t* row = gdz + ((k0 + kk) * M + n) * V;
      load_pack<P>(zdot + ((k0 + kk) * M + n) * V, i, V, vec, u);
#pragma unroll
      for (int j = 0; j < P; ++j) u[j] = ce_hvp(scale, co.A, p[j], u[j], pu);
      store_pack<P>(row, i, V, vec, u);
    }
  }
}

}  // namespace

Tensor3 cross_entropy_rows_cuda(const at::Tensor& z, const OptTensor& zdot,
                                const at::Tensor& target, const OptTensor& weight,
                                int64_t ignore_index, double label_smoothing, double scale,
                                bool want_grad) {
  const char* op = "hessfast::cross_entropy_rows";
  TORCH_CHECK(z.is_cuda(), op, ": argument 'z' must be a CUDA tensor, got ", z.device());
  const auto t = z.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": the CUDA kernel takes float32, float16 and bfloat16 logits; argument 'z' is ", t);
  check_ce(z, zdot, target, weight, label_smoothing);
  c10::cuda::CUDAGuard guard(z.device());
  at::Tensor loss, gz, gdz;
  std::tie(loss, gz, gdz) = alloc_ce(z, zdot, want_grad);
  const int64_t M = z.size(0), V = z.size(1), K = gdz.size(0);
  if (M == 0) return {loss, gz, gdz};
  auto stream = c10::cuda::getCurrentCUDAStream();
  HF_DISPATCH_CUDA_FLOATS(t, "cross_entropy_rows_cuda", [&] {
    constexpr int P = pack_size<scalar_t>();
    const scalar_t* up = zdot ? zdot->data_ptr<scalar_t>() : nullptr;
    scalar_t* gzp = want_grad ? gz.data_ptr<scalar_t>() : nullptr;
    scalar_t* gdzp = K ? gdz.data_ptr<scalar_t>() : nullptr;
    const bool vec = (V * sizeof(scalar_t)) % 16 == 0 && aligned16({z.data_ptr(), up, gzp, gdzp});
    const int threads = row_threads(V, P, 256);
    for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kMaxChunk) {
      const int64_t kc = std::min<int64_t>(kMaxChunk, K - k0);
      const size_t smem = (static_cast<size_t>(kc + 3) * threads + kc + 3) * sizeof(float);
      ce_rows_kernel<scalar_t><<<M, threads, smem, stream>>>(
          z.data_ptr<scalar_t>(), up, target.data_ptr<int64_t>(),
          weight ? weight->data_ptr<float>() : nullptr, loss.data_ptr<float>(), gzp, gdzp, M, V,
          k0, kc, ignore_index, static_cast<float>(label_smoothing), static_cast<float>(scale),
          k0 == 0, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, gz, gdz};
}

}  // namespace hessfast
