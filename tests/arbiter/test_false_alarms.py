"""The tolerances' false-alarm claims (issue 21): each element-wise bound is built for a
stated probability of failing a correct implementation, grows with the number of elements
it is applied to, and holds in the regime of GPT-2 124M's training (long rows, many
layers, weights moved by training), where the unmodified C, NumPy and torch used to fail
the replay of attention_backward's dpreatt."""
from __future__ import annotations

from math import erfc, sqrt

import numpy as np
import pytest

from harness.calibrate import MARGIN, fold
from harness import AdamW, run_parity
from harness.arbiter.tolerances import P_FALSE_ALARM, extreme, norm_excess, op_tolerance
from pyref import numpy_kernels, synth, torch_kernels
from pyref.config import GPT2Config
from pyref.protocol import KernelSet


@pytest.mark.parametrize("size", [1, 100, 10_000, 38_633_472])
def test_extreme_is_the_union_bound_of_the_stated_probability(size):
    """The Chernoff bound of a sub-Gaussian error, P(|X| > z) <= 2 exp(-z^2/2), summed over
    N elements, is p: the largest of N errors exceeds z with probability at most p, whatever
    their correlation (for Gaussian errors, 2 N Q(z) is below it)."""
    for p in (P_FALSE_ALARM, 1e-3):
        z = extreme(size, p)
        assert 2 * size * np.exp(-z * z / 2) == pytest.approx(p, rel=1e-9)
        assert size * erfc(z / sqrt(2)) <= p


def test_extreme_holds_for_simulated_errors():
    """Simulated: the largest of N Gaussian errors exceeds extreme(N, p) in at most a
    fraction p of the trials (here p = 0.05, 4000 trials of N = 500)."""
    rng = np.random.default_rng(0)
    z = extreme(500, 0.05)
    over = (np.abs(rng.standard_normal((4000, 500))).max(1) > z).mean()
    assert over <= 0.05


def test_norm_excess_bounds_the_root_mean_square():
    """The root-mean-square of N unit Gaussians exceeds norm_excess(N, p) in at most a
    fraction p of the trials: N = 6 (a C=6 model's gains) and N = 1000."""
    rng = np.random.default_rng(1)
    for n in (6, 1000):
        rms = np.sqrt((rng.standard_normal((20000, n)) ** 2).mean(1))
        assert rms.max() <= norm_excess(n)
        assert norm_excess(n) > 1 and norm_excess(10 ** 8) == pytest.approx(1, abs=1e-3)


def test_the_element_wise_bound_grows_with_the_elements_compared():
    """The largest of N rounding errors grows with N: so does the bound, slowly (sqrt(ln N))."""
    rel = [op_tolerance("matmul_forward", "out", 768, n).rel for n in (1, 10_000, 38_633_472)]
    assert rel[0] < rel[1] < rel[2] < 1.4 * rel[0]


# ----------------------------------------------------------------------------- the regime

# GPT-2's attention (hs = 64, T = 64), 6 layers, GPT-2's initialisation and a learning rate
# that moves the weights within a few steps: with the term size before issue 21 the replay
# of dpreatt failed here for the C (step 4, 1.11x its bound) and torch (step 6, 1.03x), as it
# did at GPT-2 124M from step 3 on. About a minute on 2 cores.
REGIME = GPT2Config(max_seq_len=64, vocab_size=512, padded_vocab_size=512, num_layers=6, num_heads=4, channels=256)


@pytest.mark.slow
def test_training_at_gpt2s_attention_shape_raises_no_false_alarm(llmc_lib):
    """Six steps of the C, NumPy and torch, every op replayed every step: every check passes,
    with the calibration's margin (each bound at least 1.5x the error it judges)."""
    impls = {n: KernelSet.from_module(m, name=n) for n, m in (("numpy", numpy_kernels), ("torch", torch_kernels))}
    report = run_parity(REGIME, synth.init_params(REGIME, seed=0, style="gpt2"),
                        synth.batches(REGIME, 4, 64, seed=1000), lib=llmc_lib, impls=impls, steps=6,
                        hyper=AdamW(learning_rate=1e-3), replay=True)
    worst, tally = {}, {}
    for s in report.steps:
        fold(s.checks, worst, tally)
    failed = [f"step {s.step} {c.impl} {c.kind} {c.tensor}" for s in report.steps for c in s.checks if not c.passed]
    assert report.passed and not failed, failed[:5]
    tight = {k: round(max(w["rel"], w["norm"]), 2) for k, w in worst.items() if max(w["rel"], w["norm"]) > 1 / MARGIN}
    assert not tight, f"bounds used beyond 1/{MARGIN} of themselves: {tight}"
    assert tally["checks"] > 3000 and "replay attention_backward.dpreatt" in worst
