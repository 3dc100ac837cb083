"""Reports: the per-step text table, the end-of-session summary, the JSON report and the plot."""
from __future__ import annotations

from .compare import Comparison


def _ratio(c: Comparison) -> float:
    """How much of its tolerance a comparison used (the larger of the two bounds)."""
    r = 0.0
    if c.tol.rel > 0:
        r = max(r, c.max_rel / c.tol.rel)
    if c.tol.norm > 0:
        r = max(r, c.norm_rel / c.tol.norm)
    return r


def worst_per_op_table(records: list[Comparison]) -> str:
    """One row per op: how many comparisons, how many failed, the worst one."""
    from pyref.protocol import KERNEL_OP

    groups: dict[str, list[Comparison]] = {}
    for c in records:
        kernel = c.name.split(".", 1)[0]
        groups.setdefault(KERNEL_OP.get(kernel, kernel), []).append(c)
    head = f"{'op':<14}{'checks':>8}{'failed':>8}  {'worst tensor':<40}{'max rel':>10}{'tol rel':>10}{'norm rel':>10}{'used':>7}"
    lines = [head, "-" * len(head)]
    for op in sorted(groups):
        cs = groups[op]
        w = max(cs, key=_ratio)
        lines.append(f"{op:<14}{len(cs):>8}{sum(not c.passed for c in cs):>8}  {w.name[:39]:<40}"
                     f"{w.max_rel:>10.2e}{w.tol.rel:>10.2e}{w.norm_rel:>10.2e}{_ratio(w):>6.0%}")
    return "\n".join(lines)
