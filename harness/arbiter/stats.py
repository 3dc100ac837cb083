"""The bias test's statistics: where a comparison's groups lie, the mean of the signed
errors with its standard error from the groups, and Student's t quantile it is judged by.

A comparison's compared elements are split into at most :data:`MAX_GROUPS` contiguous
groups (C order), each spanning whole *units*: runs of elements whose errors may share a
rounding (a row whose layernorm shares one rstd, a softmax row sharing one sum). Both
engines (:mod:`harness.arbiter.metrics`, :mod:`harness.arbiter.fused`) sum, per group, over its
compared elements whose values are both finite, with ``den = |e| + scale + elem_scale``
(the denominator of ``rel``):

* ``F``: the signed error in the direction of the expected value, ``(a-e) sgn(e) / den``
  (a scaling ``a = (1+d) e`` makes every term ``d |e|/den``);
* ``S``: the signed error, ``(a-e) / den`` (an offset ``a = e + c`` makes every term ``c/den``);
* ``R``: the expected value's share of the denominator, ``|e| / den``;
* ``N``: how many elements were summed.

:func:`bias_of` turns the group sums into a :class:`Bias`: ``scale = sum F / sum R`` is the
constant factor ``1 + scale`` that explains the errors' mean (a scaling by ``1 + d`` reads
``d`` in every op, whatever the share of its terms in the elements' sizes), ``shift = sum
S / sum R`` the offset that does, in units of the elements' typical size; each with the
cluster-robust (batch-means) standard error of a ratio of group totals,
``sqrt(G/(G-1) sum_g (F_g - scale R_g)^2) / sum R``, honest however the errors within a
group are correlated, provided the groups are independent. docs/statistics.md says why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

import numpy as np

#: The most groups a comparison is split into: enough degrees of freedom that Student's t
#: quantile of the test (2.5e-10 a tail) is within 20% of the Gaussian one (7.3 for 63
#: degrees of freedom against 6.2), few enough
#: that each group holds many units (its mean near Gaussian, a correlation that spans a few
#: more units than declared diluted).
MAX_GROUPS = 64

#: The group sums per group, in this order (both engines).
SUMS = ("F", "S", "R", "N")

#: The two forms of the bias: a constant factor, a constant offset.
FORMS = ("scale", "shift")


def group_bounds(n: int, unit: int, max_groups: int = MAX_GROUPS) -> np.ndarray:
    """The flat (C-order) boundaries of the groups of a tensor of ``n`` elements whose
    correlated runs are ``unit`` elements long: ``G + 1`` increasing int64 offsets from 0 to
    ``n``, G = min(n // unit, max_groups) groups of whole units (``unit`` must divide ``n``;
    one group when it is the whole tensor, none when the tensor is empty)."""
    unit = max(1, int(unit))
    if n <= 0:
        return np.zeros(1, np.int64)
    if n % unit:
        raise ValueError(f"a unit of {unit} elements does not divide {n}")
    units = n // unit
    G = max(1, min(units, max_groups))
    return unit * ((np.arange(G + 1, dtype=np.int64) * units) // G)


@dataclass(frozen=True)
class Bias:
    """The mean of a comparison's signed errors (see the module docstring).

    scale, scale_se   the constant factor ``1 + scale`` that explains the errors' mean in the
                      direction of the expected values, and its standard error
    shift, shift_se   the constant offset that explains their plain mean, in units of the
                      elements' typical size (``|e|`` weighted as above), and its standard error
    scale_t, shift_t  the quantiles each is judged by: Student's t at the test's false-alarm
                      probability, with one degree of freedom fewer than the groups that differ
                      in that form (rows that repeat, or repeat scaled by a power of two, round
                      alike; a copy of a group is not another observation); inf, and the
                      standard error NaN, where fewer than 2 differ
    groups            the groups the standard errors were estimated from (those with an
                      element compared)
    share             ``sum R / sum N``: the expected values' mean share of the elements' sizes;
                      ``scale * share`` is the mean signed error relative to the sizes
    """

    scale: float
    scale_se: float
    shift: float
    shift_se: float
    groups: int
    scale_t: float
    shift_t: float
    share: float = 1.0

    def _of(self, form: str) -> tuple[float, float, float]:
        return (self.scale, self.scale_se, self.scale_t) if form == "scale" else \
            (self.shift, self.shift_se, self.shift_t)

    def z(self, form: str) -> float | None:
        """The statistic of ``form`` ("scale" or "shift") over its standard error (None
        without one; 0 for an exact zero over a zero error, inf for a nonzero mean that
        every group shows alike)."""
        x, se, _ = self._of(form)
        if not se == se:    # NaN: fewer than 2 groups differ
            return None
        if se == 0.0:
            return 0.0 if x == 0.0 else math.copysign(math.inf, x)
        return x / se

    def excess(self, form: str) -> float:
        """How far the statistic's |value| lies beyond t standard errors: the part of it
        that is significant at the test's probability (-inf without a standard error)."""
        x, se, t = self._of(form)
        if not se == se or math.isinf(t):
            return -math.inf
        return abs(x) - t * se

    def forms(self):
        """(value, standard error, t) of each form."""
        return self._of("scale"), self._of("shift")

    @property
    def form(self) -> str:
        """The more significant of the two forms: "scale" or "shift"."""
        zs, zh = self.z("scale"), self.z("shift")
        if zs is None or zh is None:
            if zs is not None:
                return "scale"
            if zh is not None:
                return "shift"
            return "scale" if abs(self.scale) >= abs(self.shift) else "shift"
        return "scale" if abs(zs) >= abs(zh) else "shift"

    @property
    def value(self) -> float:
        return self._of(self.form)[0]

    @property
    def t(self) -> float:
        """The quantile of the more significant form."""
        return self._of(self.form)[2]


def bias_of(sums: np.ndarray, p: float) -> Bias | None:
    """The :class:`Bias` of group sums ``sums`` (shape (G, 4): F, S, R, N per group), the
    test at false-alarm probability ``p`` for the two forms together (each two-sided at
    p/2); None when no element was compared or every expected value is 0."""
    sums = np.asarray(sums, np.float64).reshape(-1, len(SUMS))
    if not sums[:, 3].min(initial=1.0) > 0:
        sums = sums[sums[:, 3] > 0]
    G = len(sums)
    if G == 0:
        return None
    F, S, R, N = sums.T
    total = float(R.sum())
    if not (total > 0.0 and math.isfinite(total)):
        return None
    share = total / float(N.sum())
    out = []
    for X in (F, S):
        x = float(X.sum()) / total
        D = distinct(X, R)
        if D < 2:
            out += [x, math.nan, math.inf]
            continue
        resid = X - x * R
        se = math.sqrt(G / (G - 1) * float(resid @ resid)) / total
        out += [x, se, t_quantile(p / 4, D - 1)]
    (scale, scale_se, scale_t), (shift, shift_se, shift_t) = out[:3], out[3:]
    return Bias(scale, scale_se, shift, shift_se, G, scale_t, shift_t, share)


def distinct(X: np.ndarray, R: np.ndarray) -> int:
    """How many groups differ in their mean error ``X / R`` (rounded to float32; ``X``
    where R is 0, and a group of expected zeros without error says nothing). Rows that
    repeat, or repeat scaled by a power of two, round alike: a copy of a group is not
    another observation, and a tensor of copies has no standard error."""
    if R.min(initial=1.0) > 0:          # the common case: every group has an expected value
        if len(X) < 2:
            return len(X)
        keys = np.sort((X / R).astype(np.float32))
        return 1 + int(np.count_nonzero(keys[1:] != keys[:-1]))
    pos, told = R > 0, (R > 0) | (X != 0)
    with np.errstate(all="ignore"):
        ratios = set((X[pos] / R[pos]).astype(np.float32).tolist())
    return len(ratios) + len(set(X[told & ~pos].astype(np.float32).tolist()))


# ----------------------------------------------------------------------------
# Student's t

def t_upper(t: float, dof: float) -> float:
    """P(T > t) for Student's t with ``dof`` degrees of freedom (t >= 0)."""
    if math.isinf(dof):
        return NormalDist().cdf(-t)
    x = dof / (dof + t * t)
    return 0.5 * _betainc(dof / 2, 0.5, x)


@lru_cache(maxsize=None)
def t_quantile(p: float, dof: int) -> float:
    """The t with P(T > t) = p (one tail) for ``dof`` degrees of freedom, found by bisection
    on the tail (to 1e-10 relative); Gaussian beyond 10^6 degrees of freedom."""
    if dof > 1_000_000:
        return NormalDist().inv_cdf(1.0 - p)
    lo, hi = 0.0, 1.0
    while t_upper(hi, dof) > p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_upper(mid, dof) > p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-10 * hi:
            break
    return hi


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        num = m * (b - m) * x / ((a + m2 - 1.0) * (a + m2))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        num = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return math.exp(ln_front) * h / a
