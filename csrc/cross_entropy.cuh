// Softmax cross-entropy rows: the online softmax and the row algebra shared by the CPU (cpu.cpp) and
// CUDA (cross_entropy.cu) kernels of hessfast::cross_entropy_rows.
//
// Row n of logits z [M, V] with target y, class weights w (1 when absent), label smoothing ε and a
// scale s (1/denominator of a mean, 1 for a sum). With p = softmax(z_n) the loss is
// −s Σ_c a_c log p_c with coefficients (zero on an ignored row)
//
//   a_c = (1−ε) w_y δ_{c,y} + (ε/V) w_c,   A = Σ_c a_c = (1−ε) w_y + (ε/V) W,   W = Σ_c w_c,
//
// and, with lse = log Σ_c e^{z_c} and u = ż_{k,n} one tangent row:
//
//   loss  = −s [(1−ε) w_y (z_y − lse) + (ε/V) (Σ_c w_c z_c − W lse)]
//   gz_c  = s (A p_c − a_c)
//   gdz_c = s A (p_c u_c − p_c ⟨p, u⟩)       (the Hessian A (diag p − p pᵀ) applied to u)
//
// One sweep over the row accumulates the online softmax state (running max m, Σ e^{z−m}) together
// with Σ e^{z−m} u for every tangent, rescaled whenever m grows; ⟨p, u⟩ = Σ e^{z−m} u / Σ e^{z−m}.
#pragma once

#include "common.cuh"

namespace hessfast {

// exp(m_old − m_new): the factor that rescales sums taken relative to m_old to m_new ≥ m_old
// (0 when nothing was accumulated yet, m_old = −inf).
template <typename T>
HF_HD T rescale_factor(T m_old, T m_new) {
  return m_old == hf_neg_inf<T>() ? T(0) : hf_exp(m_old - m_new);
}

// e^{z − m} for the running max m ≥ z; 0 for z = −inf (a masked class), even while m = −inf.
template <typename T>
HF_HD T softmax_term(T z, T m) {
  return z == hf_neg_inf<T>() ? T(0) : hf_exp(z - m);
}

// The row's coefficient summary: ay = (1−ε) w_y, smooth = ε/V, A = ay + smooth W.
template <typename T>
struct CeCoeffs {
  T ay;
  T smooth;
  T A;
};

template <typename T>
HF_HD CeCoeffs<T> ce_coeffs(T w_y, T W, T eps, int64_t V) {
  CeCoeffs<T> c;
  c.ay = (T(1) - eps) * w_y;
  c.smooth = eps / T(V);
  c.A = c.ay + c.smooth * W;
  return c;
}

// a_c for a class c (is_target: c = y).
template <typename T>
HF_HD T ce_coeff(const CeCoeffs<T>& c, T w_c, bool is_target) {
  return (is_target ? c.ay : T(0)) + c.smooth * w_c;
}

// The row loss −s Σ_c a_c log p_c from z_y, Σ_c w_c z_c (only read when ε > 0), W, the row max m
// and log_s = log Σ_c e^{z_c − m}. log p_y = (z_y − m) − log_s: never z_y − lse with lse = m +
// log_s, a difference at the logits' size (rounded at float32's spacing near them, 1e-3 near 1e4).
// The smoothing part Σ_c w_c log p_c = (Σ_c w_c z_c − W m) − W log_s still subtracts two sums at
// the logits' size.
template <typename T>
HF_HD T ce_loss(const CeCoeffs<T>& c, T scale, T z_y, T sum_wz, T W, T m, T log_s) {
  T smooth_part = c.smooth != T(0) ? c.smooth * ((sum_wz - W * m) - W * log_s) : T(0);
  return -scale * (c.ay * ((z_y - m) - log_s) + smooth_part);
}

template <typename T>
HF_HD T ce_grad(T scale, T A, T p, T a_c) {
  return scale * (A * p - a_c);
}

// s A p (u − ⟨p, u⟩).
template <typename T>
HF_HD T ce_hvp(T scale, T A, T p, T u, T pu) {
  return scale * A * p * (u - pu);
}

}  // namespace hessfast
