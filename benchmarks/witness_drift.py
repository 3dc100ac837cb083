"""How much the witness's spread moves from step to step, and whether an end-to-end bound
made from an older step's spread keeps its margin (issue 32.2: may the witness be
re-measured every k steps instead of every step?).

    .venv/bin/python benchmarks/witness_drift.py                    # d12 (124M), B=4, T=64, 10 steps: ~15 min
    .venv/bin/python benchmarks/witness_drift.py --config tiny      # seconds

From GPT-2's initialisation (generated, ``style="gpt2"``), ``--steps`` training steps of
the C, each with a batch of its own; at each step the float64 oracle and the witness
(seeded with the step, as run_parity seeds it) from the C's pre-step state, and:

* the spread's movement: for every tensor the graph writes, the witness's ``max_rel``
  and ``norm_rel`` against the previous step's (their ratio; the e2e bounds are these
  times E2E_K, :func:`harness.arbiter.tolerances.e2e_tolerance`);
* the calibration: the C's end-to-end checks of step t under the bounds made from the
  spread of step t - j (j = 0 .. k-1: what re-measuring every k steps would use): the
  largest fraction of a bound used over all tensors (``used``; its margin 1/used) and
  the checks failed (a false alarm: the C is the reference, so none should fail).

The verdict is printed last: ``re-measuring every k steps keeps the margin`` where every
step's margin with a spread up to k-1 steps old is >= MARGIN with no check failed; the
default (every step) changes only where these figures justify it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARGIN = 1.5     # the end-to-end bounds' margin over the C's own error that must stay
AGES = 4         # spreads up to AGES - 1 steps old are tried


def _movement(now: dict, before: dict) -> dict:
    """Per tensor, the ratio of this step's spread to the previous step's (max_rel, norm_rel)."""
    out = {}
    for ref, c in now.items():
        b = before.get(ref)
        if b is None:
            continue
        out[str(ref)] = tuple(x / y if y > 0 else (1.0 if x == 0 else np.inf)
                              for x, y in ((c.max_rel, b.max_rel), (c.norm_rel, b.norm_rel)))
    return out


def _calibrate(cfg, cmodel, oracle, spread: dict, B: int, T: int, t: int) -> dict:
    """The C's end-to-end checks under the bounds of ``spread``: the largest fraction of
    a bound used, and the checks that failed."""
    from harness.arbiter.tolerances import e2e_tolerance
    from harness.checks.e2e import e2e_graph
    from harness.checks.loss import check_loss
    checks = e2e_graph(cfg, B * T, cmodel, oracle, step=t, impl="C", spread=spread)
    loss_tol = e2e_tolerance("crossentropy_forward", "losses", B * T, 1, spread["mean_loss"])
    checks.append(check_loss(t, "C", float(cmodel.mean_loss), float(oracle.mean_loss), loss_tol, B * T))
    used = [(c.comparison.used, str(c.tensor)) for c in checks]
    worst = max(used)
    return {"max_used": worst[0], "worst": worst[1], "failed": [str(c.tensor) for c in checks if not c.passed],
            "checks": len(checks)}


def _summary(ratios: list[float]) -> dict:
    r = np.abs(np.log2(np.asarray(ratios, np.float64)))
    r = r[np.isfinite(r)]
    if not r.size:
        return {}
    return {"median_factor": float(2 ** np.median(r)), "p90_factor": float(2 ** np.quantile(r, 0.9)),
            "max_factor": float(2 ** r.max())}


def measure(cfg, B: int, T: int, steps: int) -> dict:
    from harness import AdamW, CModel, ORACLE
    from harness.arbiter.oracle import WitnessRun, witness_spread
    from pyref.model import GPT2
    from pyref.synth import init_params, make_batch

    hyper = AdamW()
    params = init_params(cfg, seed=0, style="gpt2")
    cmodel = CModel.from_params(cfg, params)
    oracle = GPT2(cfg, cmodel.params_memory, kernels=ORACLE, dtype=np.float64, share_params=True)
    witness = WitnessRun(cfg, cmodel.params_memory, keep=True)
    spreads, rows = [], []
    try:
        for t in range(1, steps + 1):
            t0 = time.perf_counter()
            x, y = make_batch(cfg, B, T, seed=t)
            oracle.load_state(cmodel.params_memory)
            cmodel.forward(x, y)
            cmodel.zero_grad()
            cmodel.backward()
            oracle.forward(x, y)
            oracle.zero_grad()
            oracle.backward()
            witness.run(t, x, y)
            spreads.append(witness_spread(cfg, witness.model, oracle))
            row = {"step": t, "loss": float(cmodel.mean_loss),
                   "movement": _movement(spreads[-1], spreads[-2]) if t > 1 else {},
                   "by_age": {age: _calibrate(cfg, cmodel, oracle, spreads[-1 - age], B, T, t)
                              for age in range(min(AGES, t))}}
            cmodel.update(*hyper.args(), t)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            ages = ", ".join(f"age {a}: used {r['max_used']:.3g}{' FAILED ' + str(len(r['failed'])) if r['failed'] else ''}"
                             for a, r in row["by_age"].items())
            print(f"step {t}: loss {row['loss']:.4f}, {ages} ({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
    finally:
        witness.release()
        cmodel.close()
    return {"rows": rows, "summary": _verdicts(rows)}


def _verdicts(rows: list[dict]) -> dict:
    """The spread's movement over all steps and tensors, and for each k whether spreads up
    to k-1 steps old keep the margin at every step with no check failed."""
    move = [r for row in rows for r in row["movement"].values()]
    out = {"max_rel_movement": _summary([m[0] for m in move]), "norm_rel_movement": _summary([m[1] for m in move])}
    for k in range(1, AGES + 1):
        cal = [c for row in rows for age, c in row["by_age"].items() if age < k]
        worst = max(c["max_used"] for c in cal)
        failed = sum(len(c["failed"]) for c in cal)
        out[f"every_{k}"] = {"worst_used": worst, "margin": 1.0 / worst if worst > 0 else float("inf"),
                             "failed_checks": failed, "keeps_margin": failed == 0 and worst * MARGIN <= 1.0}
    return out


def main(argv=None) -> int:
    from pyref.config import preset
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="d12")
    ap.add_argument("-B", type=int, default=4)
    ap.add_argument("-T", type=int, default=None, help="default 64, or the config's max_seq_len if smaller")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    cfg = preset(args.config)
    T = args.T or min(64, cfg.max_seq_len)
    load = os.getloadavg()
    r = measure(cfg, args.B, T, args.steps)
    r.update(config=args.config, B=args.B, T=T, load_average_start=load, load_average_end=os.getloadavg())
    s = r["summary"]
    for key in ("max_rel_movement", "norm_rel_movement"):
        m = s[key]
        if m:
            print(f"{key.replace('_', ' ')} step to step (factor, over tensors and steps): median {m['median_factor']:.3g}, "
                  f"90% {m['p90_factor']:.3g}, max {m['max_factor']:.3g}")
    for k in range(1, AGES + 1):
        e = s[f"every_{k}"]
        print(f"re-measured every {k} step(s): the C's checks use at most {e['worst_used']:.3g} of their bounds "
              f"(margin {e['margin']:.3g}), {e['failed_checks']} failed -> "
              f"{'keeps' if e['keeps_margin'] else 'does NOT keep'} the margin >= {MARGIN}")
    print(f"load average {'/'.join(f'{x:.1f}' for x in load)} -> {'/'.join(f'{x:.1f}' for x in r['load_average_end'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
