"""Export-equality checks that do not depend on the CPU's kernels.

Two networks that compute the same function in another order of operations (gated vs pruned,
sliced vs exported, a norm replaced by its standard twin) differ in float32 by rounding, whose size
depends on which kernels run. Both are run here in float64, and the difference is taken relative
to the output's scale: a correct export differs by at most the float32 rounding of its weights
(about 1e-7 of the scale, the same on every CPU), a wrong one by orders of magnitude more."""
from __future__ import annotations

import torch

from ganslim._utils import as_float64, first_output, in_float64, relative_difference


def rel_diff64(a, b, *inputs, a_with=(), b_with=()) -> float:
    """``max |a(x) - b(x)| / max |b(x)|`` with both networks (and the modules in ``a_with`` /
    ``b_with``, e.g. a GateSet whose hooks are on them) in float64."""
    x = as_float64(inputs)
    with torch.no_grad():
        with in_float64(b, *b_with):
            ref = first_output(b(*x)).clone()
        with in_float64(a, *a_with):
            out = first_output(a(*x)).clone()
    return relative_difference(out, ref)


def assert_same_function(a, b, *inputs, tol: float = 1e-5, a_with=(), b_with=()) -> None:
    d = rel_diff64(a, b, *inputs, a_with=a_with, b_with=b_with)
    assert d <= tol, f"outputs differ by {d:.3g} of the output's scale (float64; tolerance {tol})"


