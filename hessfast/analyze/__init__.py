"""Curvature analysis of a model's loss, with a report: ``hessfast analyze`` and the engine of
``hessfast demo``.

:func:`analyze` takes any curvature operator (a :class:`~hessfast.HessianOperator`,
:class:`~hessfast.GGNOperator`, :class:`~hessfast.DenseOperator`, ...) and computes, each phase
optional:

- the ``top_k`` largest eigenvalues (block Lanczos, :func:`hessfast.eigsh`, ``which="LA"``, to
  ``tol`` under ``criterion``: the residual norm by default, or the eigenvalue error bound), with
  their residual norms;
- ``λ_min`` (``eigsh(which="SA", k=1)``, capped at ``min_max_iter`` steps: the bottom of a Hessian
  lies inside a dense bulk; the Ritz value is an upper bound of ``λ_min`` and the report says
  whether it converged) and the condition number over the computed ends, ``λ_max / λ_min``
  (``None`` with a note when ``λ_min ≤ 0``, together with ``|λ_max / λ_min|``);
- the trace (Hutch++, :func:`hessfast.trace`);
- the spectral density (stochastic Lanczos quadrature, :func:`hessfast.spectral_density`);
- per-layer ``λ_max`` and trace (:func:`hessfast.layerwise`, one group per module);
- the outliers: how many of the top eigenvalues separate from the bulk of the spectrum (see
  :func:`count_outliers`), against the number of classes when it is known;
- optionally the loss landscape along the top one or two eigenvectors, beside the quadratic
  model of their eigenvalues (:func:`~hessfast.analyze.analysis.landscape_step`);
- optionally the Gauss-Newton decomposition ``H = G + R`` of a Hessian or GGN operator's model
  (:func:`~hessfast.analyze.analysis.decompose_section`, :func:`hessfast.decompose`), drawn in
  ``decomposition.png``.

It returns a JSON-ready dict (non-finite numbers become ``None``) and, given ``out``, writes
``report.json`` and ``spectrum.png`` there, and ``landscape_1d.png`` / ``landscape_2d.png`` with a
landscape (:func:`write_report`). :func:`format_summary` turns the
dict into the printed summary.

``hessfast analyze`` (:func:`main`) loads a model and data from ``module:function`` entry points
and runs the same analysis from the command line; exit codes: 0 success, 2 bad input (entry point,
checkpoint, device, shapes), 1 the analysis failed.


The package, by concern (each module imports the others' public names only):

- :mod:`~hessfast.analyze.analysis`: :func:`analyze`, :func:`count_outliers`;
- :mod:`~hessfast.analyze.report`: ``report.json``, ``spectrum.png``, the printed summary;
- :mod:`~hessfast.analyze.entry`: loading and checking what ``hessfast analyze`` is given;
- :mod:`~hessfast.analyze.command`: the ``hessfast analyze`` options and :func:`main`.

Every public name is importable from ``hessfast.analyze`` as before the split.
"""

from .analysis import analyze, count_outliers, version
from .command import add_parser, main
from .entry import (
    CLASSIFICATION,
    DTYPES,
    LOSSES,
    CastBatches,
    UsageError,
    call_entry_point,
    check_model_data,
    load_checkpoint,
    load_entry_point,
    resolve_device,
    resolve_loss,
)
from .report import (
    LANDSCAPE_FILES,
    REPORT_FILES,
    check_out_folder,
    format_summary,
    json_safe,
    plot_spectrum,
    write_report,
)

__all__ = [
    "analyze",
    "count_outliers",
    "write_report",
    "plot_spectrum",
    "format_summary",
    "UsageError",
    "main",
    "add_parser",
    "check_out_folder",
    "check_model_data",
    "load_checkpoint",
    "load_entry_point",
    "call_entry_point",
    "resolve_device",
    "resolve_loss",
    "CastBatches",
    "json_safe",
    "version",
    "LOSSES",
    "CLASSIFICATION",
    "DTYPES",
    "REPORT_FILES",
    "LANDSCAPE_FILES",
]
