// CPU implementations of every hessfast op: plain loops over the same host/device per-element math
// as the CUDA kernels (activation.cuh, layer_norm.cuh, cross_entropy.cuh), accumulating in float
// (double for float64 inputs). They are not dispatched to by the rules (the CUDA rules run on CUDA
// tensors); they let tests check the header math, and the wrappers around the ops, against the
// float64 oracle on a machine without a GPU.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "activation.cuh"
#include "cross_entropy.cuh"
#include "layer_norm.cuh"
#include "ops.h"

namespace hessfast {

namespace {

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

template <typename T>
T* out_ptr(at::Tensor& t) {
  return t.numel() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

// ---- activations ------------------------------------------------------------------------------

Tensor2 act_fwd_jvp_cpu(const at::Tensor& x, const OptTensor& tx, c10::string_view act) {
  Act a = parse_act(act);
  check_act_fwd(x, tx);
  at::Tensor y, ydot;
  std::tie(y, ydot) = alloc_act_fwd(x, tx);
  const int64_t n = x.numel(), K = tx ? tx->size(0) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "act_fwd_jvp_cpu",
                                  [&] {
    using acc = typename Acc<scalar_t>::type;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* tp = ptr_or_null<scalar_t>(tx);
    scalar_t* yp = out_ptr<scalar_t>(y);
    scalar_t* dp = out_ptr<scalar_t>(ydot);
    dispatch_act(a, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          acc yv, d1;
          act_value_d1<A>(static_cast<acc>(xp[i]), yv, d1);
          yp[i] = static_cast<scalar_t>(yv);
          for (int64_t k = 0; k < K; ++k)
            dp[k * n + i] = static_cast<scalar_t>(d1 * static_cast<acc>(tp[k * n + i]));
        }
      });
    });
  });
  return {y, ydot};
}

Tensor2 act_bwd_jvp_cpu(const at::Tensor& src, const OptTensor& g, const OptTensor& gdot,
                        const OptTensor& tx, c10::string_view act) {
  Act a = parse_act(act);
  check_act_bwd(src, g, gdot, tx);
  at::Tensor gx, gdx;
  std::tie(gx, gdx) = alloc_act_bwd(src, g, gdot, tx, a);
  const bool second = act_second(a, g, tx);
  const int64_t n = src.numel(), K = gdx.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "act_bwd_jvp_cpu",
                                  [&] {
    using acc = typename Acc<scalar_t>::type;
    const scalar_t* sp = src.data_ptr<scalar_t>();
    const scalar_t* gp = ptr_or_null<scalar_t>(g);
    const scalar_t* gdp = ptr_or_null<scalar_t>(gdot);
    const scalar_t* tp = ptr_or_null<scalar_t>(tx);
    scalar_t* gxp = out_ptr<scalar_t>(gx);
    scalar_t* gdxp = out_ptr<scalar_t>(gdx);
    dispatch_act(a, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          acc d1, d2;
          act_d1_d2<A>(static_cast<acc>(sp[i]), d1, d2);
          acc gv = gp ? static_cast<acc>(gp[i]) : acc(0);
          if (gxp) gxp[i] = static_cast<scalar_t>(d1 * gv);
          for (int64_t k = 0; k < K; ++k) {
            acc o = gdp ? d1 * static_cast<acc>(gdp[k * n + i]) : acc(0);
            if (second) o += d2 * gv * static_cast<acc>(tp[k * n + i]);
            gdxp[k * n + i] = static_cast<scalar_t>(o);
          }
        }
      });
    });
  });
  return {gx, gdx};
}

// ---- layer / RMS norm -------------------------------------------------------------------------

Tensor4 norm_fwd_jvp_cpu(const at::Tensor& x, const OptTensor& w, const OptTensor& b,
                         const OptTensor& tx, const OptTensor& tw, const OptTensor& tb,
                         double eps, bool center) {
  check_norm_fwd(x, w, b, tx, tw, tb);
  at::Tensor y, ydot, stats, tstats;
  std::tie(y, ydot, stats, tstats) = alloc_norm_fwd(x, tx, tw, tb);
  const int64_t M = x.size(0), N = x.size(1), K = ydot.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_fwd_jvp_cpu",
                                  [&] {
    using acc = typename Acc<scalar_t>::type;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t *wp = ptr_or_null<scalar_t>(w), *bp = ptr_or_null<scalar_t>(b);
    const scalar_t *txp = ptr_or_null<scalar_t>(tx), *twp = ptr_or_null<scalar_t>(tw),
                   *tbp = ptr_or_null<scalar_t>(tb);
    scalar_t *yp = out_ptr<scalar_t>(y), *ydp = out_ptr<scalar_t>(ydot);
    acc *sp = stats.data_ptr<acc>(), *tsp = out_ptr<acc>(tstats);
    auto W = [&](int64_t j) { return wp ? static_cast<acc>(wp[j]) : acc(1); };
    at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc> xhat(N);
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* xr = xp + n * N;
        acc mean = 0;
        if (center) {
          for (int64_t j = 0; j < N; ++j) mean += static_cast<acc>(xr[j]);
          mean /= acc(N);
        }
        acc ms = 0;
        for (int64_t j = 0; j < N; ++j) {
          acc d = static_cast<acc>(xr[j]) - mean;
          ms += d * d;
        }
        acc r = norm_rstd(ms / acc(N), static_cast<acc>(eps));
        sp[2 * n] = mean;
        sp[2 * n + 1] = r;
        for (int64_t j = 0; j < N; ++j) {
          xhat[j] = norm_xhat(static_cast<acc>(xr[j]), mean, r);
          acc o = W(j) * xhat[j] + (bp ? static_cast<acc>(bp[j]) : acc(0));
          yp[n * N + j] = static_cast<scalar_t>(o);
        }
        for (int64_t k = 0; k < K; ++k) {
          const int64_t row = (k * M + n) * N;
          acc tm = 0, a = 0;
          if (txp) {
            for (int64_t j = 0; j < N; ++j) {
              acc t = static_cast<acc>(txp[row + j]);
              tm += t;
              a += xhat[j] * t;
            }
            tm = center ? tm / acc(N) : acc(0);
            a /= acc(N);
            tsp[2 * (k * M + n)] = tm;
            tsp[2 * (k * M + n) + 1] = a;
          }
          for (int64_t j = 0; j < N; ++j) {
            acc p = txp ? norm_project(static_cast<acc>(txp[row + j]), tm, xhat[j], a) : acc(0);
            acc wd = twp ? static_cast<acc>(twp[k * N + j]) : acc(0);
            acc bd = tbp ? static_cast<acc>(tbp[k * N + j]) : acc(0);
            ydp[row + j] = static_cast<scalar_t>(norm_tangent_out(W(j), r, p, wd, xhat[j], bd));
          }
        }
      }
    });
  });
  return {y, ydot, stats, tstats};
}

Tensor6 norm_bwd_jvp_cpu(const at::Tensor& x, const OptTensor& w, const OptTensor& tx,
                         const OptTensor& tw, const at::Tensor& stats, const at::Tensor& tstats,
                         const OptTensor& g, const OptTensor& gdot, bool center, bool need_x,
                         bool need_w, bool need_b) {
  check_norm_bwd(x, w, tx, tw, stats, tstats, g, gdot, need_w);
  const NormBwdPlan p = plan_norm_bwd(tx, tw, g, gdot, need_x, need_w, need_b);
  at::Tensor gx, gdx, gw, gdw, gb, gdb;
  std::tie(gx, gdx, gw, gdw, gb, gdb) = alloc_norm_bwd(x, tx, tw, gdot, p);
  const int64_t M = x.size(0), N = x.size(1);
  const int64_t K = std::max({gdx.size(0), gdw.size(0), gdb.size(0)});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_bwd_jvp_cpu",
                                  [&] {
    using acc = typename Acc<scalar_t>::type;
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = ptr_or_null<scalar_t>(w);
    const scalar_t *txp = ptr_or_null<scalar_t>(tx), *twp = ptr_or_null<scalar_t>(tw);
    const scalar_t *gp = ptr_or_null<scalar_t>(g), *gdp = ptr_or_null<scalar_t>(gdot);
    const acc *sp = stats.data_ptr<acc>(), *tsp = p.second ? tstats.data_ptr<acc>() : nullptr;
    auto W = [&](int64_t j) { return wp ? static_cast<acc>(wp[j]) : acc(1); };
    auto xhat_at = [&](int64_t n, int64_t j) {
      return norm_xhat(static_cast<acc>(xp[n * N + j]), sp[2 * n], sp[2 * n + 1]);
    };
    // ẋ̂_k at (n, j): r (ẋ − tm − x̂ a)
    auto xhat_dot_at = [&](int64_t k, int64_t n, int64_t j, acc xh) {
      const int64_t s = 2 * (k * M + n);
      return sp[2 * n + 1] *
             norm_project(static_cast<acc>(txp[(k * M + n) * N + j]), tsp[s], xh, tsp[s + 1]);
    };
    if (p.gx || p.gdx) {
      scalar_t *gxp = out_ptr<scalar_t>(gx), *gdxp = out_ptr<scalar_t>(gdx);
      const int64_t Kx = gdx.size(0);
      at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc> xh(N), c(N), cd(N), xd(N);
        for (int64_t n = begin; n < end; ++n) {
          const acc r = sp[2 * n + 1];
          acc s1 = 0, s2 = 0;
          for (int64_t j = 0; j < N; ++j) {
            xh[j] = xhat_at(n, j);
            c[j] = gp ? W(j) * static_cast<acc>(gp[n * N + j]) : acc(0);
            s1 += c[j];
            s2 += xh[j] * c[j];
          }
          s1 = center ? s1 / acc(N) : acc(0);
          s2 /= acc(N);
          if (p.gx)
            for (int64_t j = 0; j < N; ++j)
              gxp[n * N + j] = static_cast<scalar_t>(r * norm_project(c[j], s1, xh[j], s2));
          for (int64_t k = 0; k < Kx; ++k) {
            const int64_t row = (k * M + n) * N;
            acc t1 = 0, t2 = 0, t3 = 0;
            for (int64_t j = 0; j < N; ++j) {
              cd[j] = gdp ? W(j) * static_cast<acc>(gdp[row + j]) : acc(0);
              if (p.wdot_g) cd[j] += static_cast<acc>(twp[k * N + j]) * static_cast<acc>(gp[n * N + j]);
              xd[j] = p.second ? xhat_dot_at(k, n, j, xh[j]) : acc(0);
              t1 += cd[j];
              t2 += xh[j] * cd[j];
              t3 += xd[j] * c[j];
            }
            t1 = center ? t1 / acc(N) : acc(0);
            t2 /= acc(N);
            t3 /= acc(N);
            const acc a = p.second ? tsp[2 * (k * M + n) + 1] : acc(0);
            for (int64_t j = 0; j < N; ++j) {
              acc o = r * norm_project(cd[j], t1, xh[j], t2);
              if (p.second)
                o += norm_second_order(r, a, norm_project(c[j], s1, xh[j], s2), xd[j], s2, xh[j],
                                       t3);
              gdxp[row + j] = static_cast<scalar_t>(o);
            }
          }
        }
      });
    }
    if (p.gw || p.gdw || p.gb || p.gdb) {
      scalar_t *gwp = out_ptr<scalar_t>(gw), *gdwp = out_ptr<scalar_t>(gdw);
      scalar_t *gbp = out_ptr<scalar_t>(gb), *gdbp = out_ptr<scalar_t>(gdb);
      at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
        std::vector<acc> sw(K), sb(K);
        for (int64_t j = begin; j < end; ++j) {
          acc aw = 0, ab = 0;
          std::fill(sw.begin(), sw.end(), acc(0));
          std::fill(sb.begin(), sb.end(), acc(0));
          for (int64_t n = 0; n < M; ++n) {
            const acc xh = xhat_at(n, j);
            const acc gv = gp ? static_cast<acc>(gp[n * N + j]) : acc(0);
            aw += gv * xh;
            ab += gv;
            for (int64_t k = 0; k < K; ++k) {
              const acc gd = gdp ? static_cast<acc>(gdp[(k * M + n) * N + j]) : acc(0);
              sw[k] += gd * xh + (p.second ? gv * xhat_dot_at(k, n, j, xh) : acc(0));
              sb[k] += gd;
            }
          }
          if (gwp) gwp[j] = static_cast<scalar_t>(aw);
          if (gbp) gbp[j] = static_cast<scalar_t>(ab);
          for (int64_t k = 0; k < K; ++k) {
            if (p.gdw) gdwp[k * N + j] = static_cast<scalar_t>(sw[k]);
            if (p.gdb) gdbp[k * N + j] = static_cast<scalar_t>(sb[k]);
          }
        }
      });
    }
  });
  return {gx, gdx, gw, gdw, gb, gdb};
}

// ---- cross-entropy rows -----------------------------------------------------------------------

Tensor3 cross_entropy_rows_cpu(const at::Tensor& z, const OptTensor& zdot,
                               const at::Tensor& target, const OptTensor& weight,
                               int64_t ignore_index, double label_smoothing, double scale,
                               bool want_grad) {
  check_ce(z, zdot, target, weight, label_smoothing);
  at::Tensor loss, gz, gdz;
  std::tie(loss, gz, gdz) = alloc_ce(z, zdot, want_grad);
  const int64_t M = z.size(0), V = z.size(1), K = gdz.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(),
                                  "cross_entropy_rows_cpu", [&] {
    using acc = typename Acc<scalar_t>::type;
    const scalar_t *zp = z.data_ptr<scalar_t>(), *up = ptr_or_null<scalar_t>(zdot);
    const int64_t* yp = target.data_ptr<int64_t>();
    const acc* wp = ptr_or_null<acc>(weight);
    acc* lp = loss.data_ptr<acc>();
    scalar_t *gzp = out_ptr<scalar_t>(gz), *gdzp = out_ptr<scalar_t>(gdz);
    const acc eps = static_cast<acc>(label_smoothing), sc = static_cast<acc>(scale);
    at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc> t(K);
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* zr = zp + n * V;
        const int64_t y = yp[n];
        if (y == ignore_index) {
          lp[n] = 0;
          if (gzp) std::fill(gzp + n * V, gzp + (n + 1) * V, scalar_t(0));
          for (int64_t k = 0; k < K; ++k)
            std::fill(gdzp + (k * M + n) * V, gdzp + (k * M + n + 1) * V, scalar_t(0));
          continue;
        }
        const bool valid = y >= 0 && y < V;
        // one sweep: the online softmax state and Σ e^{z−m} u_k, rescaled as the max grows
        acc m = hf_neg_inf<acc>(), s = 0, sum_wz = 0, Wsum = 0;
        std::fill(t.begin(), t.end(), acc(0));
        for (int64_t c = 0; c < V; ++c) {
          const acc zc = static_cast<acc>(zr[c]);
          if (zc > m) {
            const acc f = rescale_factor(m, zc);
            s *= f;
            for (auto& tk : t) tk *= f;
            m = zc;
          }
          const acc e = softmax_term(zc, m);
          s += e;
          for (int64_t k = 0; k < K; ++k) t[k] += e * static_cast<acc>(up[(k * M + n) * V + c]);
          const acc wc = wp ? wp[c] : acc(1);
          if (eps != acc(0)) sum_wz += wc * zc;
          Wsum += wc;
        }
        const acc wy = valid ? (wp ? wp[y] : acc(1)) : hf_nan<acc>();
        const acc zy = valid ? static_cast<acc>(zr[y]) : hf_nan<acc>();
        const CeCoeffs<acc> co = ce_coeffs(wy, Wsum, eps, V);
        lp[n] = ce_loss(co, sc, zy, sum_wz, Wsum, m, hf_log(s));
        for (int64_t c = 0; c < V; ++c) {
          const acc pc = softmax_term(static_cast<acc>(zr[c]), m) / s;
          if (gzp) {
            const acc ac = ce_coeff(co, wp ? wp[c] : acc(1), c == y);
            gzp[n * V + c] = static_cast<scalar_t>(ce_grad(sc, co.A, pc, ac));
          }
          for (int64_t k = 0; k < K; ++k) {
            const int64_t i = (k * M + n) * V + c;
            gdzp[i] = static_cast<scalar_t>(ce_hvp(sc, co.A, pc, static_cast<acc>(up[i]), t[k] / s));
          }
        }
      }
    });
  });
  return {loss, gz, gdz};
}

}  // namespace hessfast
