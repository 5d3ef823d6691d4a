"""``operator.getitem`` on a multi-output op's tuple: pick one output and its tangent.

Forward: ``y = x[i]``, ``ẏ = ẋ[i]``. Backward: the cotangent of the tuple is ``None`` everywhere but
slot ``i``, which gets ``(ḡ_y, ġ_y)``; the producing rule sees ``None`` for outputs that no
consumer differentiated.
"""

from __future__ import annotations

import operator

from .base import Call, Rule


class GetItem(Rule):
    ops = (operator.getitem,)
    name = "getitem"

    def fwd_jvp(self, call: Call):
        x, i = call.args
        y = x[i]
        tx = call.tangents[0]
        ydot = tx[i] if tx is not None else None
        return y, ydot, (len(x), i)

    def bwd_jvp(self, res, g, gdot):
        n, i = res

        def slot(c):
            if c is None:
                return None
            out = [None] * n
            out[i] = c
            return tuple(out)

        return (slot(g), None), (slot(gdot), None)


RULES = [GetItem()]
