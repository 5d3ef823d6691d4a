// hessfast._C: the op schemas (TORCH_LIBRARY(hessfast, ...): torch.ops.hessfast.*), their argument
// checks and output allocation (shared by every implementation), the Meta implementations (shapes
// only: fake tensors, torch.compile, opcheck), the registration of the CPU and CUDA
// implementations, and the Python module that importing hessfast._C loads.
//
// Every op computes one rule primitive of hessfast/rules/ for K tangents at once (see the Python
// wrappers in hessfast/cuda/ and the math in the .cuh headers); absent outputs are empty tensors
// (ops.h).
#include <Python.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/SymInt.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "ops.h"

namespace hessfast {

namespace {

using c10::SymInt;
using c10::SymIntArrayRef;

std::vector<SymInt> stacked(const SymInt& k, SymIntArrayRef inner) {
  std::vector<SymInt> out{k};
  out.insert(out.end(), inner.begin(), inner.end());
  return out;
}

at::Tensor empty_primal(const at::Tensor& like) {
  return at::empty({0}, like.options().memory_format(at::MemoryFormat::Contiguous));
}

at::Tensor empty_stacked(const SymInt& k, SymIntArrayRef inner, const at::Tensor& like) {
  return at::empty_symint(stacked(k, inner), like.options());
}

// float32 statistics, float64 for float64 inputs.
at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_float(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": argument '", name,
              "' must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": argument '", name,
              "' must be contiguous (call .contiguous() first)");
}

// t is on ref's device, has ref's dtype (unless dtype is given) and is contiguous.
void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                const char* op, std::optional<at::ScalarType> dtype = std::nullopt) {
  TORCH_CHECK(t.device() == ref.device(), op, ": argument '", name, "' is on ", t.device(),
              " but '", ref_name, "' is on ", ref.device());
  at::ScalarType want = dtype.value_or(ref.scalar_type());
  TORCH_CHECK(t.scalar_type() == want, op, ": argument '", name, "' must have dtype ", want,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": argument '", name,
              "' must be contiguous (call .contiguous() first)");
}

void check_shape(const at::Tensor& t, const char* name, SymIntArrayRef want, const char* what,
                 const char* op) {
  TORCH_CHECK(t.sym_sizes() == want, op, ": argument '", name, "' must have shape ", want, " (",
              what, "), got ", t.sym_sizes());
}

// t is [K, *inner]; returns K.
SymInt check_stacked(const at::Tensor& t, const char* name, SymIntArrayRef inner, const char* what,
                     const char* op) {
  TORCH_CHECK(t.dim() == static_cast<int64_t>(inner.size()) + 1 && t.sym_sizes().slice(1) == inner,
              op, ": argument '", name, "' must have shape [K, *", what, "] (K tangents, ", what,
              " = ", inner, "), got ", t.sym_sizes());
  return t.sym_size(0);
}

// Every tangent-stacked argument has the same K.
void check_same_k(std::initializer_list<std::pair<const char*, const OptTensor*>> ts,
                  const char* op) {
  const char* first = nullptr;
  SymInt k;
  for (const auto& [name, t] : ts) {
    if (!t->has_value()) continue;
    if (first == nullptr) {
      first = name;
      k = (*t)->sym_size(0);
    } else {
      TORCH_CHECK((*t)->sym_size(0) == k, op, ": arguments '", first, "' and '", name,
                  "' carry different numbers of tangents K (", k, " and ", (*t)->sym_size(0),
                  ")");
    }
  }
}

SymInt first_k(std::initializer_list<const OptTensor*> ts) {
  for (const OptTensor* t : ts)
    if (t->has_value()) return (*t)->sym_size(0);
  return SymInt(0);
}

}  // namespace

// ---- activations ------------------------------------------------------------------------------

Act parse_act(c10::string_view name) {
  std::string choices;
  for (int i = 0; i < kNumActs; ++i) {
    if (name == kActNames[i]) return kActs[i];
    choices += (i ? ", " : "") + std::string(kActNames[i]);
  }
  TORCH_CHECK(false, "hessfast: unknown activation '", std::string(name.data(), name.size()),
              "' (argument 'act'); choose one of ", choices);
}

bool act_curved(Act a) { return a != Act::Relu; }

void check_act_fwd(const at::Tensor& x, const OptTensor& tx) {
  const char* op = "hessfast::act_fwd_jvp";
  check_float(x, "x", op);
  if (tx) {
    check_like(*tx, "tx", x, "x", op);
    check_stacked(*tx, "tx", x.sym_sizes(), "x.shape", op);
  }
}

Tensor2 alloc_act_fwd(const at::Tensor& x, const OptTensor& tx) {
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor ydot = tx ? at::empty_like(*tx, at::MemoryFormat::Contiguous)
                       : empty_stacked(0, x.sym_sizes(), x);
  return {y, ydot};
}

void check_act_bwd(const at::Tensor& src, const OptTensor& g, const OptTensor& gdot,
                   const OptTensor& tx) {
  const char* op = "hessfast::act_bwd_jvp";
  check_float(src, "src", op);
  if (g) {
    check_like(*g, "g", src, "src", op);
    check_shape(*g, "g", src.sym_sizes(), "src.shape", op);
  }
  if (gdot) {
    check_like(*gdot, "gdot", src, "src", op);
    check_stacked(*gdot, "gdot", src.sym_sizes(), "src.shape", op);
  }
  if (tx) {
    check_like(*tx, "tx", src, "src", op);
    check_stacked(*tx, "tx", src.sym_sizes(), "src.shape", op);
  }
  check_same_k({{"gdot", &gdot}, {"tx", &tx}}, op);
}

bool act_second(Act a, const OptTensor& g, const OptTensor& tx) {
  return act_curved(a) && g.has_value() && tx.has_value();
}

Tensor2 alloc_act_bwd(const at::Tensor& src, const OptTensor& g, const OptTensor& gdot,
                      const OptTensor& tx, Act a) {
  at::Tensor gx = g ? at::empty_like(src, at::MemoryFormat::Contiguous) : empty_primal(src);
  SymInt k = gdot ? gdot->sym_size(0) : (act_second(a, g, tx) ? tx->sym_size(0) : SymInt(0));
  return {gx, empty_stacked(k, src.sym_sizes(), src)};
}

// ---- layer / RMS norm -------------------------------------------------------------------------

void check_norm_fwd(const at::Tensor& x, const OptTensor& w, const OptTensor& b,
                    const OptTensor& tx, const OptTensor& tw, const OptTensor& tb) {
  const char* op = "hessfast::norm_fwd_jvp";
  check_float(x, "x", op);
  TORCH_CHECK(x.dim() == 2, op, ": argument 'x' must be 2-D rows [M, N], got shape ",
              x.sym_sizes());
  TORCH_CHECK(x.sym_size(1) >= 1, op, ": argument 'x' has no columns (N = 0)");
  SymIntArrayRef n = x.sym_sizes().slice(1);
  if (w) {
    check_like(*w, "weight", x, "x", op);
    check_shape(*w, "weight", n, "[N]", op);
  }
  if (b) {
    check_like(*b, "bias", x, "x", op);
    check_shape(*b, "bias", n, "[N]", op);
  }
  if (tx) {
    check_like(*tx, "tx", x, "x", op);
    check_stacked(*tx, "tx", x.sym_sizes(), "x.shape", op);
  }
  if (tw) {
    TORCH_CHECK(w.has_value(), op, ": 'tweight' is given without 'weight'");
    check_like(*tw, "tweight", x, "x", op);
    check_stacked(*tw, "tweight", n, "weight.shape", op);
  }
  if (tb) {
    TORCH_CHECK(b.has_value(), op, ": 'tbias' is given without 'bias'");
    check_like(*tb, "tbias", x, "x", op);
    check_stacked(*tb, "tbias", n, "bias.shape", op);
  }
  check_same_k({{"tx", &tx}, {"tweight", &tw}, {"tbias", &tb}}, op);
}

Tensor4 alloc_norm_fwd(const at::Tensor& x, const OptTensor& tx, const OptTensor& tw,
                       const OptTensor& tb) {
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor ydot = empty_stacked(first_k({&tx, &tw, &tb}), x.sym_sizes(), x);
  auto st = x.options().dtype(acc_type(x));
  SymInt m = x.sym_size(0);
  at::Tensor stats = at::empty_symint({m, SymInt(2)}, st);
  at::Tensor tstats = at::empty_symint({first_k({&tx}), m, SymInt(2)}, st);
  return {y, ydot, stats, tstats};
}

NormBwdPlan plan_norm_bwd(const OptTensor& tx, const OptTensor& tw, const OptTensor& g,
                          const OptTensor& gdot, bool need_x, bool need_w, bool need_b) {
  NormBwdPlan p;
  bool hg = g.has_value(), hgd = gdot.has_value();
  p.second = hg && tx.has_value();
  p.wdot_g = hg && tw.has_value();
  p.gx = need_x && hg;
  p.gdx = need_x && (hgd || p.second || p.wdot_g);
  p.gw = need_w && hg;
  p.gdw = need_w && (hgd || p.second);
  p.gb = need_b && hg;
  p.gdb = need_b && hgd;
  return p;
}

void check_norm_bwd(const at::Tensor& x, const OptTensor& w, const OptTensor& tx,
                    const OptTensor& tw, const at::Tensor& stats, const at::Tensor& tstats,
                    const OptTensor& g, const OptTensor& gdot, bool need_w) {
  const char* op = "hessfast::norm_bwd_jvp";
  check_float(x, "x", op);
  TORCH_CHECK(x.dim() == 2, op, ": argument 'x' must be 2-D rows [M, N], got shape ",
              x.sym_sizes());
  SymIntArrayRef n = x.sym_sizes().slice(1);
  SymInt m = x.sym_size(0);
  if (w) {
    check_like(*w, "weight", x, "x", op);
    check_shape(*w, "weight", n, "[N]", op);
  }
  TORCH_CHECK(!need_w || w.has_value(), op, ": need_weight is true but 'weight' is None");
  if (tx) {
    check_like(*tx, "tx", x, "x", op);
    check_stacked(*tx, "tx", x.sym_sizes(), "x.shape", op);
  }
  if (tw) {
    TORCH_CHECK(w.has_value(), op, ": 'tweight' is given without 'weight'");
    check_like(*tw, "tweight", x, "x", op);
    check_stacked(*tw, "tweight", n, "weight.shape", op);
  }
  check_like(stats, "stats", x, "x", op, acc_type(x));
  check_shape(stats, "stats", {m, SymInt(2)}, "[M, 2] from norm_fwd_jvp", op);
  check_like(tstats, "tstats", x, "x", op, acc_type(x));
  check_shape(tstats, "tstats", {first_k({&tx}), m, SymInt(2)},
              "[K, M, 2] from norm_fwd_jvp with the same tx", op);
  if (g) {
    check_like(*g, "g", x, "x", op);
    check_shape(*g, "g", x.sym_sizes(), "x.shape", op);
  }
  if (gdot) {
    check_like(*gdot, "gdot", x, "x", op);
    check_stacked(*gdot, "gdot", x.sym_sizes(), "x.shape", op);
  }
  check_same_k({{"tx", &tx}, {"tweight", &tw}, {"gdot", &gdot}}, op);
}

Tensor6 alloc_norm_bwd(const at::Tensor& x, const OptTensor& tx, const OptTensor& tw,
                       const OptTensor& gdot, const NormBwdPlan& p) {
  SymInt k = first_k({&gdot, &tx, &tw});
  SymIntArrayRef n = x.sym_sizes().slice(1);
  auto primal = [&](bool on, SymIntArrayRef shape) {
    return on ? at::empty_symint(shape, x.options()) : empty_primal(x);
  };
  auto tangent = [&](bool on, SymIntArrayRef shape) {
    return empty_stacked(on ? k : SymInt(0), shape, x);
  };
  return {primal(p.gx, x.sym_sizes()), tangent(p.gdx, x.sym_sizes()), primal(p.gw, n),
          tangent(p.gdw, n),           primal(p.gb, n),               tangent(p.gdb, n)};
}

// ---- cross-entropy rows -----------------------------------------------------------------------

void check_ce(const at::Tensor& z, const OptTensor& zdot, const at::Tensor& target,
              const OptTensor& weight, double label_smoothing) {
  const char* op = "hessfast::cross_entropy_rows";
  check_float(z, "z", op);
  TORCH_CHECK(z.dim() == 2, op, ": argument 'z' must be 2-D logits [M, V], got shape ",
              z.sym_sizes());
  TORCH_CHECK(z.sym_size(1) >= 1, op, ": argument 'z' has no classes (V = 0)");
  if (zdot) {
    check_like(*zdot, "zdot", z, "z", op);
    check_stacked(*zdot, "zdot", z.sym_sizes(), "z.shape", op);
  }
  check_like(target, "target", z, "z", op, at::kLong);
  check_shape(target, "target", z.sym_sizes().slice(0, 1), "[M] class indices", op);
  if (weight) {
    check_like(*weight, "weight", z, "z", op, acc_type(z));
    check_shape(*weight, "weight", z.sym_sizes().slice(1), "[V] class weights", op);
  }
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must lie in [0, 1], got ", label_smoothing);
}

Tensor3 alloc_ce(const at::Tensor& z, const OptTensor& zdot, bool want_grad) {
  at::Tensor loss = at::empty_symint(z.sym_sizes().slice(0, 1), z.options().dtype(acc_type(z)));
  at::Tensor gz = want_grad ? at::empty_like(z, at::MemoryFormat::Contiguous) : empty_primal(z);
  at::Tensor gdz = zdot ? at::empty_like(*zdot, at::MemoryFormat::Contiguous)
                        : empty_stacked(0, z.sym_sizes(), z);
  return {loss, gz, gdz};
}

// ---- Meta implementations: checks and shapes only ---------------------------------------------

namespace {

Tensor2 act_fwd_jvp_meta(const at::Tensor& x, const OptTensor& tx, c10::string_view act) {
  parse_act(act);
  check_act_fwd(x, tx);
  return alloc_act_fwd(x, tx);
}

Tensor2 act_bwd_jvp_meta(const at::Tensor& src, const OptTensor& g, const OptTensor& gdot,
                         const OptTensor& tx, c10::string_view act) {
  Act a = parse_act(act);
  check_act_bwd(src, g, gdot, tx);
  return alloc_act_bwd(src, g, gdot, tx, a);
}

Tensor4 norm_fwd_jvp_meta(const at::Tensor& x, const OptTensor& w, const OptTensor& b,
                          const OptTensor& tx, const OptTensor& tw, const OptTensor& tb,
                          double eps, bool center) {
  check_norm_fwd(x, w, b, tx, tw, tb);
  return alloc_norm_fwd(x, tx, tw, tb);
}

Tensor6 norm_bwd_jvp_meta(const at::Tensor& x, const OptTensor& w, const OptTensor& tx,
                          const OptTensor& tw, const at::Tensor& stats, const at::Tensor& tstats,
                          const OptTensor& g, const OptTensor& gdot, bool center, bool need_x,
                          bool need_w, bool need_b) {
  check_norm_bwd(x, w, tx, tw, stats, tstats, g, gdot, need_w);
  return alloc_norm_bwd(x, tx, tw, gdot, plan_norm_bwd(tx, tw, g, gdot, need_x, need_w, need_b));
}

Tensor3 cross_entropy_rows_meta(const at::Tensor& z, const OptTensor& zdot,
                                const at::Tensor& target, const OptTensor& weight,
                                int64_t ignore_index, double label_smoothing, double scale,
                                bool want_grad) {
  check_ce(z, zdot, target, weight, label_smoothing);
  return alloc_ce(z, zdot, want_grad);
}

}  // namespace

}  // namespace hessfast

// Every op of the table HESSFAST_OPS (ops.h): its schema, its CPU, CUDA and Meta implementations
// (name_cpu, name_cuda, name_meta), and the Autograd fallback: the ops compute derivatives
// themselves and are not differentiable, so differentiating through one raises instead of silently
// returning a zero gradient.
#define HF_DEF(name, schema) m.def(schema);
#define HF_IMPL(key)                                                  \
  TORCH_LIBRARY_IMPL(hessfast, key, m) {                              \
    HESSFAST_OPS(HF_IMPL_##key)                                       \
  }
#define HF_IMPL_CPU(name, schema) m.impl(#name, &hessfast::name##_cpu);
#define HF_IMPL_CUDA(name, schema) m.impl(#name, &hessfast::name##_cuda);
#define HF_IMPL_Meta(name, schema) m.impl(#name, &hessfast::name##_meta);
#define HF_IMPL_Autograd(name, schema) \
  m.impl(#name, torch::autograd::autogradNotImplementedFallback());

TORCH_LIBRARY(hessfast, m) { HESSFAST_OPS(HF_DEF) }
HF_IMPL(CPU)
HF_IMPL(CUDA)
HF_IMPL(Meta)
HF_IMPL(Autograd)

// The architectures setup.py compiled for (TORCH_CUDA_ARCH_LIST, with ',' between entries), as
// hessfast._C.BUILT_ARCHS.
#define HF_STR(...) #__VA_ARGS__
#define HF_XSTR(...) HF_STR(__VA_ARGS__)
#ifdef HESSFAST_CUDA_ARCHS
#define HF_BUILT_ARCHS HF_XSTR(HESSFAST_CUDA_ARCHS)
#else
#define HF_BUILT_ARCHS ""
#endif

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "hessfast._C",
      "hessfast's C++/CUDA kernels; importing this module registers torch.ops.hessfast.*", -1,
      nullptr};
  PyObject* mod = PyModule_Create(&module);
  if (mod == nullptr) return nullptr;
#define HF_PAIR(name, schema) Py_BuildValue("(ss)", #name, schema),
  PyObject* pairs[] = {HESSFAST_OPS(HF_PAIR)};
  const Py_ssize_t n = sizeof(pairs) / sizeof(pairs[0]);
  PyObject* ops = PyTuple_New(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (ops == nullptr || pairs[i] == nullptr) {
      Py_XDECREF(ops);
      Py_DECREF(mod);
      return nullptr;
    }
    PyTuple_SET_ITEM(ops, i, pairs[i]);  // steals the reference
  }
  if (PyModule_AddObject(mod, "OPS", ops) < 0 ||
      PyModule_AddStringConstant(mod, "BUILT_ARCHS", HF_BUILT_ARCHS) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
