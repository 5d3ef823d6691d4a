// The argument checks and output allocation of every hessfast op, shared by its CPU (cpu.cpp),
// CUDA (<family>.cu) and Meta (ops.cpp) implementations so that all three agree on shapes and on
// what they refuse. Shapes are handled as SymInts, so the same code serves fake tensors.
//
// Absent outputs: every op returns all of its outputs; one that the inputs do not call for is an
// empty tensor — shape [0] for a primal-shaped output, [0, *shape] for a K-stacked one — and the
// Python wrappers (hessfast/cuda/) turn it into None.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

#include "activation.cuh"

namespace hessfast {

using OptTensor = std::optional<at::Tensor>;
using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensor6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid".
Act parse_act(c10::string_view name);
bool act_curved(Act a);

// ---- act_fwd_jvp(x, tx?, act) -> (y, ẏ) and act_bwd_jvp(src, g?, gdot?, tx?, act) -> (ḡ_x, ġ_x)
void check_act_fwd(const at::Tensor& x, const OptTensor& tx);
Tensor2 alloc_act_fwd(const at::Tensor& x, const OptTensor& tx);
void check_act_bwd(const at::Tensor& src, const OptTensor& g, const OptTensor& gdot,
                   const OptTensor& tx);
// Whether ġ_x has the second-order term f'' ẋ ḡ (curved activation, ḡ and ẋ present).
bool act_second(Act a, const OptTensor& g, const OptTensor& tx);
Tensor2 alloc_act_bwd(const at::Tensor& src, const OptTensor& g, const OptTensor& gdot,
                      const OptTensor& tx, Act a);

// ---- norm_fwd_jvp / norm_bwd_jvp on rows x [M, N]
void check_norm_fwd(const at::Tensor& x, const OptTensor& w, const OptTensor& b,
                    const OptTensor& tx, const OptTensor& tw, const OptTensor& tb);
// (y [M, N], ẏ [K, M, N], stats [M, 2] = (mean, rstd), tstats [K_x, M, 2] = (tm_k, a_k)); K is
// that of any tangent given (0 without), K_x that of ẋ (0 without).
Tensor4 alloc_norm_fwd(const at::Tensor& x, const OptTensor& tx, const OptTensor& tw,
                       const OptTensor& tb);

// Which outputs of norm_bwd_jvp exist (see layer_norm.cuh for the math).
struct NormBwdPlan {
  bool gx = false;      // ḡ_x: need_x and ḡ
  bool gdx = false;     // ġ_x: need_x and (ġ, or ḡ with ẋ or γ̇)
  bool gw = false;      // ḡ_γ: need_w and ḡ
  bool gdw = false;     // ġ_γ: need_w and (ġ, or ḡ with ẋ)
  bool gb = false;      // ḡ_β: need_b and ḡ
  bool gdb = false;     // ġ_β: need_b and ġ
  bool second = false;  // ḡ and ẋ present: the second-order terms through ẋ̂
  bool wdot_g = false;  // ḡ and γ̇ present: the second-order term γ̇ ḡ of ċ
};
NormBwdPlan plan_norm_bwd(const OptTensor& tx, const OptTensor& tw, const OptTensor& g,
                          const OptTensor& gdot, bool need_x, bool need_w, bool need_b);
void check_norm_bwd(const at::Tensor& x, const OptTensor& w, const OptTensor& tx,
                    const OptTensor& tw, const at::Tensor& stats, const at::Tensor& tstats,
                    const OptTensor& g, const OptTensor& gdot, bool need_w);
// (ḡ_x [M, N], ġ_x [K, M, N], ḡ_γ [N], ġ_γ [K, N], ḡ_β [N], ġ_β [K, N]), empty where absent.
Tensor6 alloc_norm_bwd(const at::Tensor& x, const OptTensor& tx, const OptTensor& tw,
                       const OptTensor& gdot, const NormBwdPlan& plan);

// ---- cross_entropy_rows(z, zdot?, target, weight?, ignore_index, ε, scale, want_grad)
void check_ce(const at::Tensor& z, const OptTensor& zdot, const at::Tensor& target,
              const OptTensor& weight, double label_smoothing);
// (loss [M] float32, gz [M, V] or [0], gdz [K, M, V] or [0, M, V]).
Tensor3 alloc_ce(const at::Tensor& z, const OptTensor& zdot, bool want_grad);

// ---- the implementations, registered in ops.cpp: CPU (cpu.cpp, reference loops over the same
// per-element math) and CUDA (activation.cu, layer_norm.cu, cross_entropy.cu)
Tensor2 act_fwd_jvp_cpu(const at::Tensor& x, const OptTensor& tx, c10::string_view act);
Tensor2 act_bwd_jvp_cpu(const at::Tensor& src, const OptTensor& g, const OptTensor& gdot,
                         const OptTensor& tx, c10::string_view act);
Tensor4 norm_fwd_jvp_cpu(const at::Tensor& x, const OptTensor& w, const OptTensor& b,
                          const OptTensor& tx, const OptTensor& tw, const OptTensor& tb,
                          double eps, bool center);
Tensor6 norm_bwd_jvp_cpu(const at::Tensor& x, const OptTensor& w, const OptTensor& tx,
                          const OptTensor& tw, const at::Tensor& stats, const at::Tensor& tstats,
                          const OptTensor& g, const OptTensor& gdot, bool center, bool need_x,
                          bool need_w, bool need_b);
Tensor3 cross_entropy_rows_cpu(const at::Tensor& z, const OptTensor& zdot,
                                const at::Tensor& target, const OptTensor& weight,
                                int64_t ignore_index, double label_smoothing, double scale,
                                bool want_grad);

Tensor2 act_fwd_jvp_cuda(const at::Tensor& x, const OptTensor& tx, c10::string_view act);
Tensor2 act_bwd_jvp_cuda(const at::Tensor& src, const OptTensor& g, const OptTensor& gdot,
                         const OptTensor& tx, c10::string_view act);
Tensor4 norm_fwd_jvp_cuda(const at::Tensor& x, const OptTensor& w, const OptTensor& b,
                          const OptTensor& tx, const OptTensor& tw, const OptTensor& tb,
                          double eps, bool center);
Tensor6 norm_bwd_jvp_cuda(const at::Tensor& x, const OptTensor& w, const OptTensor& tx,
                          const OptTensor& tw, const at::Tensor& stats, const at::Tensor& tstats,
                          const OptTensor& g, const OptTensor& gdot, bool center, bool need_x,
                          bool need_w, bool need_b);
Tensor3 cross_entropy_rows_cuda(const at::Tensor& z, const OptTensor& zdot,
                                const at::Tensor& target, const OptTensor& weight,
                                int64_t ignore_index, double label_smoothing, double scale,
                                bool want_grad);

}  // namespace hessfast
