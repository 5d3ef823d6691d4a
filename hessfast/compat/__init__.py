"""Drop-in shims for code written against other Hessian libraries.

- :mod:`hessfast.compat.pyhessian`: ``hessian(model, criterion, data=... | dataloader=...)`` with
  PyHessian's ``eigenvalues``, ``trace`` and ``density``, same arguments, return types and
  conventions, on hessfast's exact, K-batched products. Change
  ``from pyhessian import hessian`` to ``from hessfast.compat.pyhessian import hessian``.
- SciPy and curvlinops users need no shim: ``hessfast.HessianOperator(...).to_scipy()`` is a
  ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out), usable by
  ``scipy.sparse.linalg.eigsh``, ``cg``, ``lobpcg`` and curvlinops-style code.
"""

__all__ = ["pyhessian"]
