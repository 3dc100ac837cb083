"""The GPT-2 model on protocol kernels: NumPy float32, torch float32, the float64 oracle.

Tolerances, in units of float32 eps times the tensor's scale (max |oracle| over the tensor):
each kernel adds at most a few ulps of that scale (test_pyref_kernels: <= 4), and the
model chains ``depth`` kernels on its longest path (forward: encoder + 10 per layer +
lnf, matmul, softmax, crossentropy; backward about twice that). Rounding errors of
independent kernels add like a random walk, so we allow ``4 * sqrt(depth)`` eps*scale
(tiny config: 20 forward, 28 backward); the observed maxima are ~4 and ~7.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyref import numpy_kernels, torch_kernels
from pyref.config import ACT_NAMES, PARAM_NAMES, preset
from pyref.model import GPT2
from pyref.protocol import KernelNotProvided, KernelSet, as_namespace
from pyref.synth import init_params, make_batch

CFG = preset("tiny")
B, T = 3, 16
EPS32 = float(np.finfo(np.float32).eps)
L = CFG.num_layers
DEPTH_FWD = 1 + 10 * L + 4
DEPTH_BWD = 2 * DEPTH_FWD
K_FWD, K_BWD = 4 * math.sqrt(DEPTH_FWD), 4 * math.sqrt(DEPTH_BWD)
HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
KERNELS = {"numpy": None, "torch": torch_kernels}


def lower(name, a):
    """preatt's upper triangle is never written by the C: compare only t2 <= t."""
    if name == "preatt":
        return np.where(np.tril(np.ones(a.shape[-2:], dtype=bool)), a, 0)
    return a


def close(what, got, want, k):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.max(np.abs(want))), 1e-30)
    err = float(np.max(np.abs(got - want)))
    assert err <= k * EPS32 * scale, \
        f"{what}: max err {err:.3g} = {err / (EPS32 * scale):.1f} eps*scale > {k:.1f}"


def run(kernels=None, dtype=np.float32, seed=0, steps=0, targets=True):
    p = init_params(CFG, seed=seed)
    x, y = make_batch(CFG, B, T, seed=seed + 1)
    m = GPT2(CFG, p, kernels=kernels, dtype=dtype)
    m.forward(x, y if targets else None)
    if targets:
        m.zero_grad()
        m.backward()
    return m


@pytest.fixture(scope="module")
def oracle():
    return run(dtype=np.float64)


PAIRS = {"numpy32-oracle": ("numpy", "oracle", 1), "torch32-oracle": ("torch", "oracle", 1),
         "numpy32-torch32": ("numpy", "torch", 2)}


def make_model(which, p):
    if which == "oracle":
        return GPT2(CFG, p, dtype=np.float64)
    return GPT2(CFG, p, kernels=KERNELS[which])


def adam_tolerance(ref, noise, t, b1=HP["beta1"], b2=HP["beta2"]):
    """Elementwise bound on |p_a - p_b| after one AdamW step from a common state whose
    gradients differ by ``noise``. The step lr*m_hat/(sqrt(v_hat)+eps) turns a gradient error
    into an error of about lr*2*noise/((1-b1^t)(sqrt(v_hat)+eps)) (m_hat and sqrt(v_hat)
    both move), capped at 2*lr (the step is at most ~lr). Where the true gradient vanishes
    (the key bias: q.b_k is constant along the softmax axis) float32 noise is normalised
    into a step of up to lr and this allows it; elsewhere it is tight. Plus a few
    roundings of |p|."""
    v_hat = ref.v_memory / (1 - b2 ** t)
    rel = 2 * noise / ((1 - b1 ** t) * (np.sqrt(v_hat) + HP["eps"]))
    return HP["lr"] * np.minimum(2.0, rel) + 4 * EPS32 * np.abs(ref.params_memory)


@pytest.mark.parametrize("pair", PAIRS, ids=PAIRS.keys())
def test_three_training_steps_agree(pair):
    """Three training steps (forward, zero_grad, backward, update), comparing at every step
    all 23 activations, their gradients, the 16 parameter gradients, the loss, and after
    the update params, m and v; ``k`` = 2 when two float32 models are compared (each is
    within the budget of the oracle).

    Every step starts both models from the same state (``b`` loads ``a``'s params, m, v):
    Adam normalises gradients, so float32 noise on a vanishing gradient becomes a step of up
    to lr, and two trajectories legitimately drift apart by O(lr) in those directions (the
    key bias) and by more than rounding everywhere downstream. A common state per step
    keeps every comparison at the rounding level of that one step."""
    wa, wb, k = PAIRS[pair]
    p = init_params(CFG, seed=3)
    x, y = make_batch(CFG, B, T, seed=4)
    a, b = make_model(wa, p), make_model(wb, p)
    for t in (1, 2, 3):
        if t > 1:
            b.load_state(a.params_memory, m=a.m_memory, v=a.v_memory)
        for m in (a, b):
            m.forward(x, y)
            m.zero_grad()
            m.backward()
        close(f"step {t} mean_loss", a.mean_loss, b.mean_loss, k * K_FWD)
        for n in ACT_NAMES:
            close(f"step {t} acts[{n}]", lower(n, a.acts[n]), lower(n, b.acts[n]), k * K_FWD)
            close(f"step {t} grads_acts[{n}]", a.grads_acts[n], b.grads_acts[n], k * K_BWD)
        for n in PARAM_NAMES:
            close(f"step {t} grads[{n}]", a.grads[n], b.grads[n], k * K_BWD)
        noise = np.concatenate([np.full(g.size, k * K_BWD * EPS32 * max(np.abs(g).max(), 1e-30))
                                for g in b.grads.values()])
        for m in (a, b):
            m.update(t=t, **HP)
        close(f"step {t} m", a.m_memory, b.m_memory, k * K_BWD)
        close(f"step {t} v", a.v_memory, b.v_memory, 2 * k * K_BWD)   # g*g: twice g's error
        err = np.abs(a.params_memory - b.params_memory)
        tol = adam_tolerance(b, noise, t)
        assert np.all(err <= tol), \
            f"step {t}: params off by up to {err.max():.3g} (max err/tol {np.max(err / tol):.2f})"


def torch_gpt2_loss(cfg, params, inputs, targets):
    """The same forward, differentiable: torch_kernels' forward functions under autograd."""
    k = torch_kernels
    P = params
    x = k.encoder_forward(inputs, P["wte"], P["wpe"])
    for l in range(cfg.num_layers):
        ln1, _, _ = k.layernorm_forward(x, P["ln1w"][l], P["ln1b"][l])
        qkv = k.matmul_forward(ln1, P["qkvw"][l], P["qkvb"][l])
        atty, _, _ = k.attention_forward(qkv, cfg.num_heads)
        x = x + k.matmul_forward(atty, P["attprojw"][l], P["attprojb"][l])
        ln2, _, _ = k.layernorm_forward(x, P["ln2w"][l], P["ln2b"][l])
        h = k.gelu_forward(k.matmul_forward(ln2, P["fcw"][l], P["fcb"][l]))
        x = x + k.matmul_forward(h, P["fcprojw"][l], P["fcprojb"][l])
    lnf, _, _ = k.layernorm_forward(x, P["lnfw"], P["lnfb"])
    probs = k.softmax_forward(k.matmul_forward(lnf, P["wte"], None), cfg.vocab_size)
    return k.crossentropy_forward(probs, targets).mean()


def test_oracle_gradients_match_autograd(oracle):
    """The oracle's hand-written backward (the C's order, buffers and accumulation) against
    autograd of the same forward in float64. Budget: float64 eps over the longest
    reduction (V = 123 logits, 4C = 192 hidden) per kernel, times the backward depth."""
    P = {n: torch.tensor(oracle.params[n], requires_grad=True) for n in PARAM_NAMES}
    loss = torch_gpt2_loss(CFG, P, torch.tensor(oracle.inputs), torch.tensor(oracle.targets))
    loss.backward()
    assert abs(loss.item() - oracle.mean_loss) <= 1e-13 * abs(loss.item())
    eps64 = np.finfo(np.float64).eps
    for n in PARAM_NAMES:
        want = P[n].grad.numpy()
        err = np.max(np.abs(oracle.grads[n] - want))
        tol = 4 * 4 * CFG.channels * DEPTH_BWD * eps64 * np.max(np.abs(want))
        assert err <= tol, f"grads[{n}]: err {err:.3g} > {tol:.3g}"


# ----------------------------------------------------------------------------- layout facts

def test_buffers_hold_what_the_c_leaves_there(oracle):
    m, a, g = oracle, oracle.acts, oracle.grads_acts
    mask = np.tril(np.ones((T, T), dtype=bool))
    assert np.all(a["att"][..., ~mask] == 0), "att's upper triangle must be exactly 0"
    assert np.allclose(a["att"].sum(-1), 1)
    assert np.all(a["probs"][..., CFG.V:] == 0), "probs in the padded columns must be 0"
    assert np.all(a["logits"][..., CFG.V:] == 0), "padded wte rows are 0, so are their logits"
    for n in ("probs", "ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd", "lnf_mean", "lnf_rstd"):
        assert not g[n].any(), f"grads_acts[{n}] is never written by the C"
    assert not g["logits"][..., CFG.V:].any(), "dlogits' padded columns stay untouched"
    assert not g["att"][..., ~mask].any() and not g["preatt"][..., ~mask].any()
    assert not m.grads["wte"][CFG.V:].any(), "padded wte rows get no gradient"
    assert np.all(g["losses"] == np.float64(1) / (B * T))
    for name, shape in zip(ACT_NAMES, (v.shape for v in a.values())):
        assert g[name].shape == shape
    # one flat buffer each, views in the C's order
    off = 0
    for n, size in zip(ACT_NAMES, m.act_sizes):
        assert np.shares_memory(a[n], m.acts_memory[off:off + size])
        off += size
    assert off == m.num_activations == m.acts_memory.size


def test_mean_loss_is_the_sequential_float_sum():
    m = run()
    total = np.float32(0)
    for v in m.acts["losses"].reshape(-1):
        total = np.float32(total + v)
    assert m.mean_loss == np.float32(total / np.float32(B * T))
    assert m.mean_loss.dtype == np.float32


def test_forward_without_targets():
    m = run(targets=False)
    assert m.mean_loss == -1.0
    p = init_params(CFG)
    x, y = make_batch(CFG, B, T, seed=1)
    m2 = GPT2(CFG, p)
    assert m2.forward(x) is None and m2.mean_loss == -1.0
    assert m2.grads is None and m2.m_memory is None   # allocated lazily, as in the C
    np.testing.assert_array_equal(m.acts["probs"], m2.acts["probs"])


def test_params_as_dict_and_load_state():
    flat = init_params(CFG, seed=7)
    m = GPT2(CFG, flat)
    m2 = GPT2(CFG, {n: v.copy() for n, v in m.params.items()})
    np.testing.assert_array_equal(m.params_memory, m2.params_memory)
    m2.load_state(np.zeros_like(flat), m=flat, v=flat * 2)
    assert not m2.params_memory.any() and np.array_equal(m2.v_memory, 2 * flat)


def test_user_port_with_fallback():
    """A port that only defines gelu_forward runs the model with the rest from the fallback;
    without a fallback the model names the kernel it lacks."""
    port = as_namespace({"gelu_forward": numpy_kernels.gelu_forward})
    x, y = make_batch(CFG, B, T, seed=1)
    with pytest.raises(KernelNotProvided, match="encoder_forward"):
        GPT2(CFG, init_params(CFG), kernels=KernelSet.from_module(port)).forward(x, y)
    ks = KernelSet.from_module(port, fallback=numpy_kernels)
    m = GPT2(CFG, init_params(CFG), kernels=ks)
    assert m.forward(x, y) == run().mean_loss


# ----------------------------------------------------------------------------- errors

def test_bad_inputs_raise_clear_errors():
    V = CFG.vocab_size
    m = GPT2(CFG, init_params(CFG))
    x, y = make_batch(CFG, B, T)
    bad = x.copy()
    bad[1, 2] = V
    with pytest.raises(ValueError, match=rf"token id {V} at .* is outside \[0, V={V}\)"):
        m.forward(bad, y)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="token id -1"):
        m.forward(bad, y)
    with pytest.raises(ValueError, match="targets: token id"):
        m.forward(x, np.full_like(y, V + 5))
    with pytest.raises(ValueError, match="max_seq_len"):
        m.forward(np.zeros((1, CFG.max_seq_len + 1), np.int32))
    with pytest.raises(ValueError, match="integer"):
        m.forward(x.astype(np.float32))
    with pytest.raises(ValueError, match=r"a \(B, T\) array"):
        m.forward(x.reshape(-1))
    with pytest.raises(ValueError, match="targets shape"):
        m.forward(x, y[:, :-1])
    with pytest.raises(ValueError, match="backward"):
        m.backward()                      # no forward yet
    with pytest.raises(ValueError, match="backward"):
        m.update(t=1, **{k: v for k, v in HP.items()})   # no grads yet
    m.forward(x)
    with pytest.raises(ValueError, match="with targets"):
        m.backward()                      # forward without targets
    with pytest.raises(ValueError, match="B=3, T=16"):
        m.forward(x[:, :-1], y[:, :-1])   # T changed after the first forward
    with pytest.raises(ValueError, match="B=3, T=16"):
        m.forward(x[:1], y[:1])           # B changed
    m.forward(x, y)
    m.backward()
    with pytest.raises(ValueError, match="counts from 1"):
        m.update(t=0, **HP)
    with pytest.raises(ValueError, match="parameters"):
        GPT2(CFG, np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="missing tensors"):
        GPT2(CFG, {"wte": m.params["wte"]})
    with pytest.raises(ValueError, match="dtype"):
        GPT2(CFG, init_params(CFG), dtype=np.float16)
