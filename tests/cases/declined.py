"""Calls an op family's implementations refuse, as data shared by the case tables: each
:class:`Declined` names the reason every refusing backend must give."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hessfast.rules.base import Call


@dataclass(frozen=True)
class Declined:
    """A call ``op(*args)`` (tangents ``tangents``, the first argument active) that the
    implementations of ``reasons``' backends refuse, each with a reason containing
    ``reasons[backend]``."""

    op: object
    args: tuple
    reasons: dict
    tangents: tuple | None = None

    def call(self) -> Call:
        n = len(self.args)
        tangents = self.tangents or (None,) * n
        tangents = tuple(tangents) + (None,) * (n - len(tangents))
        k = next((t.shape[0] for t in tangents if isinstance(t, torch.Tensor)), 0)
        return Call(self.op, self.args, (True,) + (False,) * (n - 1), tangents, k)


def refused_by(table: dict[str, Declined], backend: str) -> list[str]:
    """The ids of ``table`` that ``backend`` refuses."""
    return [name for name, d in table.items() if backend in d.reasons]
