"""AdamW's changes: no bias correction, the step off by one, eps inside the square root, L2
for decoupled decay, another decay or betas, decay without the learning rate, no decay of
the 1-D parameters, two settings exchanged; and a Python port diagnosed through a training step's update.

Each test module shows, for one family of harness.diagnosis.CATALOGUE (one module of
harness/diagnosis/catalogue), that a float32 port carrying a variant's change, and an edit of
llmc/train_gpt2.c carrying it, fail their check and are diagnosed with exactly that cause;
tests/diagnosis/diagnose_common.py holds what they share.
"""
from __future__ import annotations

import numpy as np
import pytest

from diagnose_common import (F, assert_c_edit_diagnosed, assert_diagnosed,  # noqa: F401 - c_mutants is a fixture
                             c_cases, c_mutants, failures, gelu_erf_fwd, overwrite, port_cases, port_with, tiny_run)

from pyref import numpy_kernels as nk
from pyref.cases import SHAPE_BY_NAME
from pyref.config import PRESETS, param_shapes
from pyref.protocol import KernelSet
from pyref.spec import SPEC


# ----------------------------------------------------------------------------- ports

def _one_d_of_tiny():
    """Which of the tiny preset's parameters are biases or layernorm gains (by name)."""
    parts = [np.full(int(np.prod(s)), name.endswith("b") or name.startswith("ln"))
             for name, s in param_shapes(PRESETS["tiny"]).items()]
    return np.concatenate(parts)


def adamw_port(bias_correction=True, dt=0, eps_in_sqrt=False, l2=False, wd=None, betas=None,
               skip_1d=False, decay_without_lr=False, setting=None, frozen=False, power=False, eps_first=False,
               swap=None):
    """AdamW in float32 with one mistake; ``setting``: (its name, the value given, or the
    name of another setting typed in its place); ``frozen``: the tensor not stepped."""
    def adamw(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, t):
        if frozen:
            return
        if setting is not None:
            given = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
            name, x = setting
            given[name] = given[x] if isinstance(x, str) else x
            lr, beta1, beta2, eps, weight_decay = given.values()
        if swap is not None:       # two settings exchanged (given positionally in another order)
            given = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
            a, b = swap
            given[a], given[b] = given[b], given[a]
            lr, beta1, beta2, eps, weight_decay = given.values()
        b1, b2 = (F(x) for x in (betas or (beta1, beta2)))
        decay = np.full(param.shape, F(weight_decay if wd is None else wd))
        if skip_1d:
            decay[_one_d_of_tiny()] = 0
        g = grad + decay * param if l2 else grad
        m[...] = b1 * m + (F(1) - b1) * g
        v[...] = b2 * v + (F(1) - b2) * g * g
        step = t + dt
        if power:          # the precedence slip: (1 - beta1)**t
            m_hat, v_hat = m / (F(1) - b1) ** step, v / (F(1) - b2) ** step
        else:
            m_hat = m / (F(1) - b1 ** step) if bias_correction else m
            v_hat = v / (F(1) - b2 ** step) if bias_correction else v
        den = np.sqrt(v_hat + F(eps)) if eps_in_sqrt else np.sqrt(v_hat) + F(eps)
        if eps_first:      # Adam's efficient form: eps before v's correction
            den = (np.sqrt(v) + F(eps)) / np.sqrt(F(1) - b2 ** step)
        if decay_without_lr:       # param *= 1 - wd, then the step
            param *= F(1) - decay
            param -= F(lr) * (m_hat / den)
            return
        param -= F(lr) * (m_hat / den + (F(0) if l2 else decay * param))
    return adamw


# variant id -> [(kernel, port[, shape])]: every variant of the family, and every kernel it
# applies to where the per-op inputs can show it
PORTS = {
    "adamw.no-bias-correction": [("adamw", adamw_port(bias_correction=False))],
    "adamw.step+1": [("adamw", adamw_port(dt=+1))],
    "adamw.step-1": [("adamw", adamw_port(dt=-1))],
    "adamw.eps-in-sqrt": [("adamw", adamw_port(eps_in_sqrt=True))],
    "adamw.l2": [("adamw", adamw_port(l2=True))],
    "adamw.weight-decay=0.01": [("adamw", adamw_port(wd=0.01))],
    "adamw.weight-decay-without-lr": [("adamw", adamw_port(decay_without_lr=True))],     # BUGS6
    "adamw.no-decay-1d": [("adamw", adamw_port(skip_1d=True))],
    "adamw.betas=(0.9,0.95)": [("adamw", adamw_port(betas=(0.9, 0.95)))],
    "adamw.bias-correction-power": [("adamw", adamw_port(power=True))],
    "adamw.eps-before-bias-correction": [("adamw", adamw_port(eps_first=True))],
    "adamw.not-stepped": [("adamw", adamw_port(frozen=True))],       # BUGS10: the blocks alone given to AdamW
    # BUGS11: AdamW(params, lr, betas, weight_decay, eps): eps and the decay exchanged
    # (a pair with a beta: m or v shows one setting changed, named as such; the parameter both)
    "adamw.swapped": [("adamw", adamw_port(swap=("eps", "weight_decay")))],
    # one setting, fitted and named by where its value comes from
    "adamw.beta2": [("adamw", adamw_port(setting=("beta2", "beta1"))),       # BUGS10: betas=(beta1, beta1)
                    ("adamw", adamw_port(setting=("beta2", 0.98)))],
    "adamw.beta1": [("adamw", adamw_port(setting=("beta1", "beta2"))),
                    ("adamw", adamw_port(setting=("beta1", 0.8)))],
    "adamw.lr": [("adamw", adamw_port(setting=("lr", 3e-4)))],
    "adamw.eps": [("adamw", adamw_port(setting=("eps", 1e-6)))],
    "adamw.weight-decay": [("adamw", adamw_port(setting=("weight_decay", 0.0))),
                           ("adamw", adamw_port(setting=("weight_decay", "lr")))],
}


@pytest.mark.parametrize("variant_id, kernel, port, shape", port_cases(PORTS))
def test_port_with_the_change_is_diagnosed_with_it(variant_id, kernel, port, shape):
    assert_diagnosed(failures(port_with(kernel, port), kernel, SHAPE_BY_NAME[shape]), variant_id)


# ----------------------------------------------------------------------------- a training step

@pytest.mark.parametrize("adamw, cause", [(adamw_port(l2=True), "adamw.l2"),
                                          (adamw_port(skip_1d=True), "adamw.no-decay-1d")])
def test_a_python_port_is_diagnosed_in_a_training_step(adamw, cause):
    """Replay (forward and an accumulated gradient) and update of a Python model."""
    funcs = {name: getattr(nk, name) for name in SPEC}
    funcs.update(gelu_forward=gelu_erf_fwd, layernorm_backward=overwrite("layernorm_backward", "dinp"),
                 adamw=adamw)
    report = tiny_run(impls={"port": KernelSet(funcs, name="port")})
    failed = [c for s in report.steps for c in s.checks if c.impl == "port" and not c.passed
              and c.kind in ("replay", "update")]
    assert {c.diagnosis.ids for c in failed} == {("gelu.erf",), ("backward.overwrite",), (cause,)}
    assert all(c.diagnosis is None for s in report.steps for c in s.checks if c.impl == "C")
    over = next(c for c in failed if c.diagnosis.ids == ("backward.overwrite",))
    assert "layernorm_backward" in over.diagnosis.causes[0].where
    if cause == "adamw.no-decay-1d":     # only the biases and gains are off
        shapes = param_shapes(PRESETS["tiny"])
        off = {c.tensor.split(".")[1].split(" ")[0] for c in failed if c.kind == "update"}
        assert off == {n for n in shapes if n.endswith("b") or n.startswith("ln")}


# ----------------------------------------------------------------------------- the C, edited

@pytest.mark.parametrize("variant_id, func", c_cases("adamw"))
def test_edited_c_is_diagnosed_with_the_edit(c_mutants, variant_id, func):
    assert_c_edit_diagnosed(c_mutants, variant_id, func)


def test_a_beta_pair_exchanged_names_each_moment_by_its_setting_and_the_parameter_by_the_swap():
    """beta2 and eps exchanged: v (beta2's alone) names beta2's value, the parameter (both
    settings') the exchange."""
    failed = {c.name: c.diagnosis for c in failures(port_with("adamw", adamw_port(swap=("beta2", "eps"))), "adamw",
                                                   SHAPE_BY_NAME["base"])}
    assert failed["adamw.v"].ids[0] == "adamw.beta2"
    assert failed["adamw.param"].ids == ("adamw.swapped",), failed["adamw.param"].text()
    assert failed["adamw.param"].causes[0].choice == "beta2 and eps"


def _param_diagnosis_with_moments(port):
    """The parameter's diagnosis of ``port``'s adamw given the port's m and v after the step
    (``ctx["moments"]``): the evidence that tells a tensor not stepped from a zero learning rate."""
    from harness.diagnosis import CATALOGUE, Call
    from harness.diagnosis.engine import diagnose
    from harness import make_inputs
    args = make_inputs(SPEC["adamw"], SHAPE_BY_NAME["base"], seed=0)
    param = next(c for c in failures(port_with("adamw", port), "adamw", SHAPE_BY_NAME["base"]) if c.name == "adamw.param")
    mine = {k: (np.array(x, copy=True) if isinstance(x, np.ndarray) else x) for k, x in args.items()}
    port(*(mine[k] for k in ("param", "grad", "m", "v", "lr", "beta1", "beta2", "eps", "weight_decay", "t")))
    expected = {k: (np.array(x, np.float64) if isinstance(x, np.ndarray) else x) for k, x in args.items()}
    nk.adamw(*(expected[k] for k in ("param", "grad", "m", "v", "lr", "beta1", "beta2", "eps", "weight_decay", "t")))
    return diagnose(Call("adamw", "param", args), mine["param"], expected["param"], variants=CATALOGUE, tol=param.tol,
                    ctx={"moments": {"m": mine["m"], "v": mine["v"]}})


def test_a_zero_learning_rate_is_told_from_a_tensor_not_stepped_by_its_moments():
    """BUGS11: LambdaLR's warmup factor step/100 sets the lr to 0 at its construction: the
    parameters stay (the decay too: lr multiplies it), m and v step. Given the moments, that
    is adamw.lr at 0, not adamw.not-stepped; a tensor truly not stepped (its moments kept) is."""
    zero_lr = _param_diagnosis_with_moments(adamw_port(setting=("lr", 0.0)))
    assert zero_lr.ids == ("adamw.lr",), zero_lr.text()
    assert zero_lr.causes[0].value == 0.0 and "warmup" in zero_lr.text()
    frozen = _param_diagnosis_with_moments(adamw_port(frozen=True))
    assert frozen.ids == ("adamw.not-stepped",), frozen.text()
