// Elementwise activations: values and first and second derivatives, for the host and the device.
//
// For y = f(x) the rule needs f'(x) (forward tangent ẏ = f' ẋ, cotangent ḡ_x = f' ḡ) and f''(x)
// (second-order term of the cotangent's tangent, ġ_x = f' ġ + f'' ẋ ḡ). As in
// hessfast/rules/activation.py, the derivatives of relu, tanh and sigmoid are functions of the
// result y (the residual the backward keeps); those of gelu, silu and hardswish are functions of x:
//
//   relu        f' = [y > 0]                         f'' = 0
//   gelu (erf)  f' = Φ(x) + x φ(x)                   f'' = φ(x) (2 − x²)
//   gelu (tanh) f' = ½(1+t) + ½ x (1−t²) u'          f'' = (1−t²) (u' + ½ x (u'' − 2 t u'²))
//               t = tanh u, u = c (x + κ x³), u' = c (1 + 3κ x²), u'' = 6 c κ x,
//               c = √(2/π), κ = 0.044715
//   silu        f' = s (1 + x (1−s)), s = σ(x)       f'' = s (1−s) (2 + x (1−2s))
//   tanh        f' = 1 − y²                          f'' = −2 y (1 − y²)
//   sigmoid     f' = y (1 − y)                       f'' = y (1 − y) (1 − 2y)
//   hardswish   y = x relu6(x + 3) / 6:
//               f' = 0 (x ≤ −3), x/3 + ½ (−3 < x < 3), 1 (x ≥ 3)
//               f'' = 1/3 on (−3, 3), 0 elsewhere
//               (y = x (x + 3)/6 on (−3, 3), whose derivatives are (2x + 3)/6 and 1/3; at the
//               kinks the sides torch's hardswish_backward and its double backward take)
//
// Evaluated without cancellation where the plain formulas lose relative accuracy: Φ(x) =
// ½ erfc(−x/√2) (not ½ (1 + erf(x/√2)), which cancels for x ≪ 0); for gelu (tanh)
// ½ (1 + t) = σ(2u) and 1 − t² = 4 σ(2u) σ(−2u); for silu 1 − s = σ(−x) and 1 − 2s = σ(−x) − σ(x).
#pragma once

#include <type_traits>

#include "common.cuh"

namespace hessfast {

// The activations, X(enumerator, the name the ops' `act` argument takes), in the order of their
// codes (0, 1, ...). Adding one: a line here, its formulas in act_value_d1 and act_d1_d2 (and in
// ActInfo when f' is a function of the result y); parse_act, dispatch_act and kActs follow.
#define HESSFAST_ACTS(X)    \
  X(Relu, "relu")           \
  X(Gelu, "gelu")           \
  X(GeluTanh, "gelu_tanh")  \
  X(Silu, "silu")           \
  X(Tanh, "tanh")           \
  X(Sigmoid, "sigmoid")     \
  X(Hardswish, "hardswish")

#define HF_ACT_ENUM(e, name) e,
enum class Act : int { HESSFAST_ACTS(HF_ACT_ENUM) };
#undef HF_ACT_ENUM

// Every activation and its name, in code order.
#define HF_ACT_VALUE(e, name) Act::e,
inline constexpr Act kActs[] = {HESSFAST_ACTS(HF_ACT_VALUE)};
#undef HF_ACT_VALUE
#define HF_ACT_NAME(e, name) name,
inline constexpr const char* kActNames[] = {HESSFAST_ACTS(HF_ACT_NAME)};
#undef HF_ACT_NAME
inline constexpr int kNumActs = static_cast<int>(sizeof(kActs) / sizeof(kActs[0]));

// from_result: the derivatives are functions of y (the backward's residual is y, else x);
// curved: f'' is not identically zero (the backward then needs the input tangent ẋ).
template <Act A>
struct ActInfo {
  static constexpr bool from_result = A == Act::Relu || A == Act::Tanh || A == Act::Sigmoid;
  static constexpr bool curved = A != Act::Relu;
};

template <typename T>
HF_HD T sigmoid(T x) {
  return T(1) / (T(1) + hf_exp(-x));
}

// The constants of gelu: 1/√2, 1/√(2π), c = √(2/π), κ.
template <typename T>
struct GeluConst {
  static constexpr T inv_sqrt2 = T(0.70710678118654752440);
  static constexpr T inv_sqrt_2pi = T(0.39894228040143267794);
  static constexpr T c = T(0.79788456080286535588);
  static constexpr T kappa = T(0.044715);
};

// Exact gelu: Φ(x) and φ(x).
template <typename T>
HF_HD void gelu_cdf_pdf(T x, T& cdf, T& pdf) {
  using G = GeluConst<T>;
  cdf = T(0.5) * hf_erfc(-x * G::inv_sqrt2);
  pdf = G::inv_sqrt_2pi * hf_exp(T(-0.5) * x * x);
}

// Tanh gelu: sp = σ(2u) = ½ (1 + tanh u), sm = σ(−2u) = ½ (1 − tanh u), and u'.
template <typename T>
HF_HD void gelu_tanh_parts(T x, T& sp, T& sm, T& du) {
  using G = GeluConst<T>;
  const T x2 = x * x;
  const T u = G::c * (x + G::kappa * x2 * x);
  sp = sigmoid(T(2) * u);
  sm = sigmoid(T(-2) * u);
  du = G::c * (T(1) + T(3) * G::kappa * x2);
}

// Hardswish's f' and f'' (for NaN x: f' = 1, f'' = 0, as the torch rule's where-chain).
template <typename T>
HF_HD void hardswish_d1_d2(T x, T& d1, T& d2) {
  d1 = x <= T(-3) ? T(0) : (x < T(3) ? x / T(3) + T(0.5) : T(1));
  d2 = x > T(-3) && x < T(3) ? T(1) / T(3) : T(0);
}

// y = f(x) and f'(x) (for from_result activations f' is computed from the unrounded y).
template <Act A, typename T>
HF_HD void act_value_d1(T x, T& y, T& d1) {
  if constexpr (A == Act::Relu) {
    y = x < T(0) ? T(0) : x;  // NaN propagates, as in torch
    d1 = y > T(0) ? T(1) : T(0);
  } else if constexpr (A == Act::Gelu) {
    T cdf, pdf;
    gelu_cdf_pdf(x, cdf, pdf);
    y = x * cdf;
    d1 = cdf + x * pdf;
  } else if constexpr (A == Act::GeluTanh) {
    T sp, sm, du;
    gelu_tanh_parts(x, sp, sm, du);
    y = x * sp;
    d1 = sp + T(2) * x * sp * sm * du;
  } else if constexpr (A == Act::Silu) {
    const T s = sigmoid(x), sn = sigmoid(-x);
    y = x * s;
    d1 = s * (T(1) + x * sn);
  } else if constexpr (A == Act::Tanh) {
    y = hf_tanh(x);
    d1 = T(1) - y * y;
  } else if constexpr (A == Act::Sigmoid) {
    y = sigmoid(x);
    d1 = y * (T(1) - y);
  } else {
    static_assert(A == Act::Hardswish);
    T d2;
    hardswish_d1_d2(x, d1, d2);
    const T r = x + T(3);
    y = x * (r < T(0) ? T(0) : (r > T(6) ? T(6) : r)) / T(6);
  }
}

// f' and f'' from the residual src (y for from_result activations, else x).
template <Act A, typename T>
HF_HD void act_d1_d2(T src, T& d1, T& d2) {
  if constexpr (A == Act::Relu) {
    d1 = src > T(0) ? T(1) : T(0);
    d2 = T(0);
  } else if constexpr (A == Act::Gelu) {
    const T x = src;
    T cdf, pdf;
    gelu_cdf_pdf(x, cdf, pdf);
    d1 = cdf + x * pdf;
    d2 = pdf * (T(2) - x * x);
  } else if constexpr (A == Act::GeluTanh) {
    const T x = src;
    T sp, sm, du;
    gelu_tanh_parts(x, sp, sm, du);
    const T sech2 = T(4) * sp * sm, t = sp - sm;
    const T ddu = T(6) * GeluConst<T>::c * GeluConst<T>::kappa * x;
    d1 = sp + T(0.5) * x * sech2 * du;
    d2 = sech2 * (du + T(0.5) * x * (ddu - T(2) * t * du * du));
  } else if constexpr (A == Act::Silu) {
    const T x = src, s = sigmoid(x), sn = sigmoid(-x);
    d1 = s * (T(1) + x * sn);
    d2 = s * sn * (T(2) + x * (sn - s));
  } else if constexpr (A == Act::Tanh) {
    const T y = src;
    d1 = T(1) - y * y;
    d2 = T(-2) * y * d1;
  } else if constexpr (A == Act::Sigmoid) {
    const T y = src;
    d1 = y * (T(1) - y);
    d2 = d1 * (T(1) - T(2) * y);
  } else {
    static_assert(A == Act::Hardswish);
    hardswish_d1_d2(src, d1, d2);
  }
}

// Call fn(std::integral_constant<Act, A>{}) with the activation A named by a runtime Act, so that
// a generic lambda can instantiate a kernel per activation (C++17).
template <typename Fn>
void dispatch_act(Act a, Fn&& fn) {
  switch (a) {
#define HF_ACT_CASE(e, name) \
  case Act::e:               \
    return fn(std::integral_constant<Act, Act::e>{});
    HESSFAST_ACTS(HF_ACT_CASE)
#undef HF_ACT_CASE
  }
}

}  // namespace hessfast
