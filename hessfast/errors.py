"""Exceptions hessfast raises. Each message says what went wrong and what to do about it."""

from __future__ import annotations


class HessfastError(Exception):
    """Base class of hessfast's own errors."""


class CaptureError(HessfastError):
    """``torch.export`` could not capture the model (the message carries export's reason)."""


class DropoutError(HessfastError, ValueError):
    """Dropout is active in training mode: the curvature of a random loss is not well defined."""


class UnsupportedOpError(HessfastError):
    """An op on the parameter path cannot be differentiated twice."""


class NonFiniteError(HessfastError, FloatingPointError):
    """A result contains NaN or Inf (pass ``check_finite=False`` to get it anyway)."""
