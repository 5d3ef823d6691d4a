"""``hessfast bench``: hessfast against what users do today, on one model, in one process.

For a workload (:mod:`hessfast.bench_models`: a built-in ``mlp`` / ``resnet18`` / ``gpt2`` at a
size preset, or a user's ``module:function``) it runs, on one device:

- ``gradient (autograd)``: the reference every time is divided by (``× gradient``);
- hessfast, for each backend that can run on the device (:func:`available_backends`: ``torch``
  everywhere; on a GPU also ``auto`` — the per-call dispatch — and ``triton`` / ``cuda`` where
  :func:`hessfast.backends` says they are available): ``grad``, exact ``hvp``, ``ggn_vp`` and
  ``hvp`` with K vectors at once, each run inside :func:`hessfast.use_backend`;
- ``torch.func jvp(grad)`` (forward-over-reverse), ``double backward``, ``torch.func`` GGN-VP
  (``jvp`` + ``vjp``) and ``torch.func vmap`` over K vectors; on a model that calls
  ``F.scaled_dot_product_attention`` these fail with the fused kernels (no forward-mode derivative,
  no double backward), so they are repeated under the math backend (``, math attention``);
- hessfast's execution modes (``modes``, :data:`hessfast.traced.MODES`): ``traced`` (the default,
  the product's traced graph replayed), ``interpret`` (the node-by-node interpreter),
  ``inductor`` (the traced graph through ``torch.compile``) and ``cudagraphs`` (CUDA only);
- with ``compile=True``: hessfast with ``compile="inductor"`` (and ``"cudagraphs"`` on CUDA) and
  ``torch.compile`` of the ``torch.func`` HVP and GGN-VP (a compile failure is a result); compile
  time is in the first calls, reported separately (``first calls``), never in the median;
- when importable: PyHessian's HVP and curvlinops' Hessian and GGN operators (else reported as
  not installed; they are not dependencies of hessfast).

Protocol: per method, one call on batch 0 is checked against the reference (max over the vectors of ``‖result − reference‖ /
‖reference‖``, the parameters flattened into one vector) before any timing; then one warm-up call
(which also measures peak memory: CUDA max allocated above what was allocated before the call);
the two are timed together as the ``first calls`` (tracing, on a signature's second product, and
compiling happen there).
Then ``repeats`` rounds, **interleaved**: every method once per round, in table order, cycling
through the other batches (inputs rotated: every call sees different data of the same shape), so
that a slow phase of the machine hits every method alike. Times are medians over the rounds, taken
with CUDA events on GPU and ``time.perf_counter`` on CPU. The garbage of the preparation is
collected once before the rounds; on CUDA also between methods, with the allocator's cache
emptied, so that one method's leftovers do not count in the next one's peak memory. The reference is ``torch.func``'s HVP / GGN-VP /
gradient of a float64 copy of the model on CPU (float32 on GPU, TF32 off), always under the math
SDPA backend. A method that raises is reported with its error, not dropped; a method whose error
exceeds the tolerance is reported as wrong (and still timed).


The package, by concern (each module imports the others' public names only):

- :mod:`~hessfast.bench.workloads`: dtypes, the workloads (:mod:`hessfast.bench_models`), the loss
  as autograd calls it, whether the forward uses SDPA;
- :mod:`~hessfast.bench.methods`: the methods, in table order, and the backends worth timing;
- :mod:`~hessfast.bench.timing`: one timed call, peak memory, TF32 and thread settings;
- :mod:`~hessfast.bench.reference`: the reference results and the relative error;
- :mod:`~hessfast.bench.run`: one workload's checked, warmed-up, interleaved run;
- :mod:`~hessfast.bench.environment`: provenance (device, versions, commit);
- :mod:`~hessfast.bench.tables`: the printed tables and the JSON record;
- :mod:`~hessfast.bench.command`: the ``hessfast bench`` options and :func:`main`.

Every public name is importable from ``hessfast.bench`` as before the split.
"""

from .command import (
    MODE_NAMES,
    add_common_arguments,
    add_parser,
    main,
    parse_backends,
    parse_modes,
    resolve_device,
)
from .environment import git_commit, provenance
from .methods import (
    Method,
    available_backends,
    backend_context,
    build_methods,
    importable,
    math_attention,
)
from .reference import (
    default_tolerance,
    reference,
    reference_dtype,
    reference_model,
    rel_error,
)
from .run import bench_workload, prepare_method, time_rounds
from .tables import default_json_path, json_safe, render
from .timing import (
    collect_garbage,
    describe_error,
    free_memory,
    measure,
    peak_call,
    sync,
    tf32,
    threads,
    timed_call,
)
from .workloads import (
    BUILTIN,
    DTYPES,
    SIZES,
    Workload,
    autograd_loss,
    build_workload,
    needs_flatten,
    probe,
)

__all__ = [
    "BUILTIN",
    "DTYPES",
    "MODE_NAMES",
    "SIZES",
    "Method",
    "Workload",
    "add_common_arguments",
    "add_parser",
    "autograd_loss",
    "available_backends",
    "backend_context",
    "bench_workload",
    "build_methods",
    "build_workload",
    "collect_garbage",
    "default_json_path",
    "default_tolerance",
    "describe_error",
    "free_memory",
    "git_commit",
    "importable",
    "json_safe",
    "main",
    "math_attention",
    "measure",
    "needs_flatten",
    "parse_backends",
    "parse_modes",
    "peak_call",
    "prepare_method",
    "probe",
    "provenance",
    "reference",
    "reference_dtype",
    "reference_model",
    "rel_error",
    "render",
    "resolve_device",
    "sync",
    "tf32",
    "threads",
    "time_rounds",
    "timed_call",
]
