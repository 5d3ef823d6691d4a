// LayerNorm and RMSNorm over the last dimension of a row-major [M, N] input: the per-element
// algebra shared by the CPU (cpu.cpp) and CUDA (layer_norm.cu) kernels. Index conventions: row n,
// column j, tangent k; row statistics are means over the N columns; w = γ, b = β (1 and 0 when
// absent). The math is that of hessfast/rules/layer_norm.py:
//
//   x̂ = (x − m) r,  m = mean(x),  r = (mean((x − m)²) + eps)^(−1/2)     (LayerNorm, center)
//   x̂ = x r,        r = (mean(x²) + eps)^(−1/2)                           (RMSNorm)
//   P(t) = t − [mean t] − x̂ mean(x̂ t)                                     ([·] only when centring)
//
// forward:  y = γ x̂ + β,  ẏ_k = γ r P(ẋ_k) + γ̇_k x̂ + β̇_k  (kept per row and k: tm_k = [mean ẋ_k],
//           a_k = mean(x̂ ẋ_k), so that ẋ̂_k = r (ẋ_k − tm_k − x̂ a_k) and ṙ_k = −r² a_k)
// backward, with c = γ ḡ and ċ_k = γ ġ_k + γ̇_k ḡ:
//   ḡ_x   = r P(c)  = r (c − [S1] − x̂ S2),           S1 = mean c, S2 = mean(x̂ c)
//   ġ_x,k = r P(ċ_k) − r² a_k P(c) − r (ẋ̂_k S2 + x̂ T3_k),  T3_k = mean(ẋ̂_k c)
//   ḡ_γ = Σ_n ḡ x̂,  ġ_γ,k = Σ_n (ġ_k x̂ + ḡ ẋ̂_k),  ḡ_β = Σ_n ḡ,  ġ_β,k = Σ_n ġ_k
// The terms with ḡ inside a tangent (γ̇ ḡ, −r² a P(c), ẋ̂ S2, x̂ T3, ḡ ẋ̂) are second order: they are
// absent in GGN mode (no ḡ).
#pragma once

#include "common.cuh"

namespace hessfast {

// r from the mean square of the (centred) row.
template <typename T>
HF_HD T norm_rstd(T mean_square, T eps) {
  return T(1) / hf_sqrt(mean_square + eps);
}

template <typename T>
HF_HD T norm_xhat(T x, T mean, T rstd) {
  return (x - mean) * rstd;
}

// P(t) = t − tmean − x̂ a, with tmean = mean(t) when centring (else 0) and a = mean(x̂ t).
template <typename T>
HF_HD T norm_project(T t, T tmean, T xhat, T a) {
  return t - tmean - xhat * a;
}

// ẏ = γ r P(ẋ) + γ̇ x̂ + β̇ (pass p = P(ẋ), 0 without ẋ; γ̇, β̇ = 0 when absent).
template <typename T>
HF_HD T norm_tangent_out(T w, T rstd, T p, T wdot, T xhat, T bdot) {
  return w * rstd * p + wdot * xhat + bdot;
}

// The second-order part of ġ_x: −r (r a P(c) + ẋ̂ S2 + x̂ T3).
template <typename T>
HF_HD T norm_second_order(T rstd, T a, T pc, T xhat_dot, T s2, T xhat, T t3) {
  return -rstd * (rstd * a * pc + xhat_dot * s2 + xhat * t3);
}

}  // namespace hessfast
