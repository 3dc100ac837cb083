"""The protocol kernels (NumPy and torch) against PyTorch, op by op, from one table.

Every row of ``OPS`` says how to make inputs for an op, how to run its forward and
backward kernels through a ``KernelSet``, what torch's own function computes (the forward
reference) and what the differentiable formula is (the backward reference, via autograd).
Four checks run over the table, all through ``assert_close``:

- forward vs torch's module/function (``F.layer_norm``, ``F.gelu(approximate="tanh")``,
  ``F.scaled_dot_product_attention``, ``F.softmax``, ``F.cross_entropy``,
  ``torch.optim.AdamW``...), evaluated in float64 on the same inputs;
- backward vs torch autograd in float64, starting from non-zero gradient buffers that are
  views into a bigger flat buffer (so `=` instead of `+=`, or writes outside the view, fail);
- both in float32 too (the harness's dtype), against the same float64 references;
- ``MUTANTS``: deliberately wrong kernels, each of which must make its check fail.

Test ids carry the op name: ``pytest -k layernorm`` selects layernorm's tests.

Tolerances: a float computation of a length-n reduction in another order (or with another
libm) differs from the exact result by at most about n*eps*sum|terms|; we bound
``|got - want| <= k * n * eps(dtype) * scale`` with scale = max|want| over the tensor (the
size of the terms; elementwise |x| or |dout| for gelu) and k = 2 unless the table says
otherwise (a worst-case bound with a factor 2 of slack: over 20 seeds the largest observed
err / (n*eps*scale) is below 0.35 for every reduction op). The elementwise ops get k in
roundings per element (residual: 1; gelu: 8 and 16; adamw: 16 over 3 steps; observed
maxima 0.5, 1.0, 3.8 and 1.7). In float64 that is ~1e-14 relative, far below what any
mutant changes (>= 1e-6), so the checks are sharp; in float32 every mutant is caught too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyref import numpy_kernels as nk
from pyref import torch_kernels as tk
from pyref.protocol import KernelSet, as_namespace, resolve

# Small, awkward shapes: hs = 4, V < Vp, T > 1 with T < maxT.
B, T, C, NH, OC, V, Vp, maxT = 2, 5, 12, 3, 7, 10, 16, 8
hs = C // NH

BACKENDS = {"numpy": nk, "torch": tk}
DTYPES = {"f64": np.float64, "f32": np.float32}


# ----------------------------------------------------------------------------- comparing

def assert_close(what, got, want, n=1, k=4.0, scale=None, ulps=0):
    """|got - want| <= k * n * eps(got.dtype) * scale + ulps * eps * |want|, elementwise.

    ``want`` is a float64 reference; ``got`` has the kernel's dtype, whose eps sets the
    budget. ``scale`` is the size of the terms the result was computed from: by default
    max|want| over the tensor (right for reductions, whose error is relative to the terms,
    not to a result that may cancel); an array for an elementwise budget. ``ulps`` adds
    roundings of the result itself (a backward's final ``+=``). Shapes must match
    exactly and ``got`` must be finite where ``want`` is.
    """
    got = np.asarray(got)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert np.issubdtype(got.dtype, np.floating), f"{what}: dtype {got.dtype} is not float"
    eps = np.finfo(got.dtype).eps
    if scale is None:
        scale = float(np.max(np.abs(want))) if want.size else 0.0
    scale = np.maximum(scale, np.finfo(np.float64).tiny)
    assert np.all(np.isfinite(got) | ~np.isfinite(want)), f"{what}: non-finite values"
    err = np.abs(got.astype(np.float64) - want)
    tol = np.broadcast_to(k * n * eps * scale + ulps * eps * np.abs(want), err.shape)
    bad = ~(err <= tol)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err / tol, 0)), err.shape)
        raise AssertionError(
            f"{what}: |got - want| = {err[i]:.3g} > tol {tol[i]:.3g} (= {k}*{n}*eps*scale) "
            f"at {i}: got {got[i]!r}, want {want[i]!r}; {bad.sum()} of {bad.size} out")


def T64(a, grad=False):
    t = torch.tensor(np.asarray(a, dtype=np.float64))
    return t.requires_grad_(grad)


def tril(a):
    """Keep the causal lower triangle (t2 <= t) of (..., T, T)."""
    return np.where(np.tril(np.ones(a.shape[-2:], dtype=bool)), a, 0)   # keeps a's dtype


# ----------------------------------------------------------------------------- the table

@dataclass
class Op:
    name: str
    make: Callable                      # (rng, dtype) -> dict of NumPy inputs
    forward: Callable                   # (K, x) -> dict of outputs (NumPy, kernel dtype)
    torch_ref: Callable                 # (x: dict of float64/long tensors) -> dict to compare
    n_fwd: int = 1                      # reduction length of the forward
    k_fwd: float = 2.0
    backward: Callable | None = None    # (K, x, out, d, g) -> None, accumulates into g
    formula: Callable | None = None     # differentiable torch formula: x -> dict of outputs
    grads: dict = field(default_factory=dict)   # grad buffer -> input it is the gradient of
    douts: tuple = ()                   # outputs that receive a cotangent
    n_bwd: int = 1
    k_bwd: float = 2.0
    expected: Callable | None = None    # custom (x, out, d, g0) -> expected grads (float64)
    scale_fwd: Callable | None = None   # x -> elementwise scale (default: max|want|)
    scale_bwd: Callable | None = None   # (x, d) -> elementwise scale of the added gradient


def _ids(rng, shape):
    ids = rng.integers(0, V, size=shape)
    ids.flat[-1] = V - 1
    ids.flat[0] = 0                   # the edges, and (when there is room) a repeat
    if ids.size > 2:
        ids.flat[1] = 0
    return ids.astype(np.int32)


def make_encoder(rng, dt):
    return dict(inp=_ids(rng, (B, T)),
                wte=rng.standard_normal((Vp, C)).astype(dt),
                wpe=rng.standard_normal((maxT, C)).astype(dt))


def make_layernorm(rng, dt):
    inp = (rng.standard_normal((B, T, C)) + 0.5).astype(dt)
    inp[0, 0] = (1e-3 * rng.standard_normal(C)).astype(dt)   # var ~ 1e-6 < eps: eps matters
    return dict(inp=inp, weight=(1 + 0.1 * rng.standard_normal(C)).astype(dt),
                bias=(0.1 * rng.standard_normal(C)).astype(dt))


def make_matmul(rng, dt, bias=True):
    return dict(inp=rng.standard_normal((B, T, C)).astype(dt),
                weight=rng.standard_normal((OC, C)).astype(dt),
                bias=rng.standard_normal(OC).astype(dt) if bias else None)


def make_attention(rng, dt):
    return dict(inp=(1.5 * rng.standard_normal((B, T, 3 * C))).astype(dt))


def make_gelu(rng, dt):
    inp = (2 * rng.standard_normal((B, T, C))).astype(dt)
    inp[0, 0, :6] = [30, -30, 200, -200, 1e-3, 0]   # cosh(a)^2 overflows for the large ones
    return dict(inp=inp)


def make_residual(rng, dt):
    return dict(inp1=rng.standard_normal((B, T, C)).astype(dt),
                inp2=rng.standard_normal((B, T, C)).astype(dt))


def make_logits(rng, dt):
    logits = (3 * rng.standard_normal((B, T, Vp))).astype(dt)
    logits[..., V:] = 50    # garbage in the padding must be ignored
    return dict(logits=logits, targets=_ids(rng, (B, T)))


def make_adamw(rng, dt):
    n = 64
    return dict(param=rng.standard_normal(n).astype(dt),
                grads=[(rng.standard_normal(n) * 10.0 ** rng.integers(-4, 1, n)).astype(dt)
                       for _ in range(3)],
                hp=dict(lr=2.0 ** -7, beta1=0.875, beta2=0.9990234375, eps=2.0 ** -20,
                        weight_decay=0.0625))   # exactly representable in float32: see adamw


def attention_ref(x):
    inp = x["inp"]
    q, k, v = (a.reshape(B, T, NH, hs).transpose(1, 2) for a in inp.split(C, -1))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    preatt = (q @ k.transpose(-2, -1)) / np.sqrt(hs)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    att = torch.softmax(preatt.masked_fill(~mask, -torch.inf), -1)
    return {"out": out.transpose(1, 2).reshape(B, T, C), "preatt": preatt * mask, "att": att}


def attention_formula(x):
    """The C's math, differentiable: preatt = q.k*scale; att = causal softmax; out = att v."""
    inp = x["inp"]
    q, k, v = (a.reshape(B, T, NH, hs).transpose(1, 2) for a in inp.split(C, -1))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    preatt = (q @ k.transpose(-2, -1)) / np.sqrt(hs)
    att = torch.softmax(preatt.masked_fill(~mask, -torch.inf), -1)
    return {"out": (att @ v).transpose(1, 2).reshape(B, T, C), "preatt": preatt, "att": att}


def attention_expected(x, out, d, g0):
    """The C's attention_backward reads back the accumulated datt and dpreatt buffers, so
    whatever they held flows on into dinp: datt = datt0 + dout.v (lower triangle);
    dpreatt = dpreatt0 + softmax_backward(att, datt); dq, dk from that dpreatt."""
    t = {"inp": T64(x["inp"], grad=True)}
    f = attention_formula(t)
    g_att, = torch.autograd.grad(f["out"], f["att"], T64(d["out"]), retain_graph=True)
    datt = g0["datt"] + tril(g_att.numpy())
    g_pre, = torch.autograd.grad(f["att"], f["preatt"], T64(tril(datt)), retain_graph=True)
    dpreatt = g0["dpreatt"] + tril(g_pre.numpy())
    # dinp: dv from dout; dq, dk from the full lower-triangle dpreatt
    dv, = torch.autograd.grad(f["out"], t["inp"], T64(d["out"]), retain_graph=True)
    dqk, = torch.autograd.grad(f["preatt"], t["inp"], T64(tril(dpreatt)))
    dv = dv.numpy().copy()
    dv[..., :2 * C] = 0   # the v part of autograd(out) is att^T dout; q, k parts come via dpreatt
    return {"dinp": g0["dinp"] + dv + dqk.numpy(), "datt": datt, "dpreatt": dpreatt}


def _adamw_run(K, x):
    p = x["param"].copy()
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(x["grads"], start=1):
        K.adamw(p, g, m, v, t=t, **x["hp"])
    return {"param": p, "m": m, "v": v}


def adamw_ref(x):
    """torch.optim.AdamW, three steps. torch decays first (p *= 1 - lr*wd) and then takes the
    Adam step with the decayed p; the C computes lr*(m_hat/(sqrt(v_hat)+eps) + wd*p) from the
    old p in one expression. Both use the old p in the decay term, so they agree up to
    rounding (a few eps of |p|); torch's sqrt(v)/sqrt(bc2) vs the C's sqrt(v/bc2) likewise.
    The hyperparameters are exact float32 values, since the C takes them as float."""
    p = x["param"].clone().requires_grad_(True)
    hp = x["hp"]
    opt = torch.optim.AdamW([p], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"], foreach=False)
    for g in x["grads"]:
        p.grad = g.clone()
        opt.step()
    st = opt.state[p]
    return {"param": p.detach(), "m": st["exp_avg"], "v": st["exp_avg_sq"]}


def _probs(K, x):
    return K.softmax_forward(x["logits"], V)


OPS = [
    Op("encoder", make_encoder,
       forward=lambda K, x: {"out": K.encoder_forward(x["inp"], x["wte"], x["wpe"])},
       torch_ref=lambda x: {"out": F.embedding(x["inp"], x["wte"])
                            + F.embedding(torch.arange(T), x["wpe"])},
       backward=lambda K, x, o, d, g: K.encoder_backward(g["dwte"], g["dwpe"], d["out"], x["inp"]),
       formula=lambda x: {"out": x["wte"][x["inp"]] + x["wpe"][:T]},
       grads={"dwte": "wte", "dwpe": "wpe"}, douts=("out",),
       n_bwd=B * T),   # a token (and a position) sums up to B*T rows
    Op("layernorm", make_layernorm,
       forward=lambda K, x: dict(zip(("out", "mean", "rstd"),
                                     K.layernorm_forward(x["inp"], x["weight"], x["bias"]))),
       torch_ref=lambda x: {
           "out": F.layer_norm(x["inp"], (C,), x["weight"], x["bias"], eps=1e-5),
           "mean": x["inp"].mean(-1),
           "rstd": torch.rsqrt(x["inp"].var(-1, correction=0) + 1e-5)},
       n_fwd=C,
       backward=lambda K, x, o, d, g: K.layernorm_backward(
           g["dinp"], g["dweight"], g["dbias"], d["out"], x["inp"], x["weight"], o["mean"], o["rstd"]),
       formula=lambda x: {"out": F.layer_norm(x["inp"], (C,), x["weight"], x["bias"], eps=1e-5)},
       grads={"dinp": "inp", "dweight": "weight", "dbias": "bias"}, douts=("out",),
       # two chained length-C reductions per row (dnorm_mean, dnorm_norm_mean), then the
       # B*T-row sums for dweight/dbias: n = C + B*T
       n_bwd=C + B * T),
    *[Op(name, (lambda rng, dt, b=bias: make_matmul(rng, dt, b)),
         forward=lambda K, x: {"out": K.matmul_forward(x["inp"], x["weight"], x["bias"])},
         torch_ref=lambda x: {"out": F.linear(x["inp"], x["weight"], x["bias"])},
         n_fwd=C,
         backward=lambda K, x, o, d, g: K.matmul_backward(
             g["dinp"], g["dweight"], g.get("dbias"), d["out"], x["inp"], x["weight"]),
         formula=lambda x: {"out": F.linear(x["inp"], x["weight"], x["bias"])},
         grads={"dinp": "inp", "dweight": "weight", **({"dbias": "bias"} if bias else {})},
         douts=("out",), n_bwd=max(OC, B * T))
      for name, bias in (("matmul", True), ("matmul_nobias", False))],
    Op("attention", make_attention,
       forward=lambda K, x: dict(zip(("out", "preatt", "att"), K.attention_forward(x["inp"], NH))),
       torch_ref=attention_ref,
       # q.k over hs, exp, a sum over T, then att.v over T: n = hs + 2T
       n_fwd=hs + 2 * T,
       backward=lambda K, x, o, d, g: K.attention_backward(
           g["dinp"], g["dpreatt"], g["datt"], d["out"], x["inp"], o["att"], NH),
       grads={"dinp": "inp", "dpreatt": None, "datt": None}, douts=("out",),
       n_bwd=hs + 2 * T, expected=attention_expected),
    Op("gelu", make_gelu,
       forward=lambda K, x: {"out": K.gelu_forward(x["inp"])},
       torch_ref=lambda x: {"out": F.gelu(x["inp"], approximate="tanh")},
       backward=lambda K, x, o, d, g: K.gelu_backward(g["dinp"], x["inp"], d["out"]),
       formula=lambda x: {"out": F.gelu(x["inp"], approximate="tanh")},
       # elementwise, a handful of roundings (x^3, tanh/cosh in libm, the products): the
       # forward error is relative to |x| (|out| <= |x|), the backward's to |dout| (g is
       # O(1); cosh(a)'s argument rounding costs |a|*eps on sech^2, and sech^2*|a| <= 1)
       grads={"dinp": "inp"}, douts=("out",), k_fwd=8.0, k_bwd=16.0,
       scale_fwd=lambda x: np.abs(x["inp"]).astype(np.float64),
       scale_bwd=lambda x, d: np.abs(d["out"]).astype(np.float64)),
    Op("residual", make_residual,
       forward=lambda K, x: {"out": K.residual_forward(x["inp1"], x["inp2"])},
       torch_ref=lambda x: {"out": torch.add(x["inp1"], x["inp2"])},
       backward=lambda K, x, o, d, g: K.residual_backward(g["dinp1"], g["dinp2"], d["out"]),
       formula=lambda x: {"out": x["inp1"] + x["inp2"]},
       grads={"dinp1": "inp1", "dinp2": "inp2"}, douts=("out",), k_fwd=1.0, k_bwd=1.0),
    Op("softmax", make_logits,
       forward=lambda K, x: {"probs": _probs(K, x)},
       torch_ref=lambda x: {"probs": F.pad(F.softmax(x["logits"][..., :V], -1), (0, Vp - V))},
       n_fwd=V),   # exp (|logit - max| up to ~20 amplifies relative error) and a V-term sum
    Op("crossentropy", make_logits,
       forward=lambda K, x: (lambda p: {"losses": K.crossentropy_forward(p, x["targets"]),
                                        "probs": p})(_probs(K, x)),
       torch_ref=lambda x: {"losses": F.cross_entropy(
           x["logits"][..., :V].reshape(-1, V), x["targets"].reshape(-1).long(),
           reduction="none").reshape(B, T)},
       n_fwd=V,
       backward=lambda K, x, o, d, g: K.crossentropy_softmax_backward(
           g["dlogits"], d["losses"], o["probs"], x["targets"], V),
       formula=lambda x: {"losses": F.cross_entropy(
           x["logits"][..., :V].reshape(-1, V), x["targets"].reshape(-1).long(),
           reduction="none").reshape(B, T)},
       grads={"dlogits": "logits"}, douts=("losses",), n_bwd=V),
    Op("adamw", make_adamw, forward=_adamw_run, torch_ref=adamw_ref,
       # per element: ~15 roundings over 3 steps; m/(sqrt(v)+eps) is well conditioned
       k_fwd=16.0),
]
OP = {op.name: op for op in OPS}


# ----------------------------------------------------------------------------- runners

def to_torch(x):
    out = {}
    for k, v in x.items():
        if isinstance(v, np.ndarray):
            out[k] = (torch.tensor(v.astype(np.int64)) if v.dtype.kind in "iu" else T64(v))
        elif isinstance(v, list):
            out[k] = [T64(a) for a in v]
        else:
            out[k] = v
    return out


# The NumPy kernels must not trip floating-point overflow/invalid/divide warnings on these
# inputs (gelu's cosh overflow is expected and handled inside the kernel).
_FPE = dict(over="raise", invalid="raise", divide="raise")


def check_forward(op, K, dtype, seed=0):
    x = op.make(np.random.default_rng(seed), dtype)
    with np.errstate(**_FPE):
        got = op.forward(K, x)
    want = op.torch_ref(to_torch(x))
    for name, w in want.items():
        g = got[name]
        assert g.dtype == dtype, f"{op.name}.{name}: dtype {g.dtype}, expected {dtype.__name__}"
        if name == "preatt":     # the C never writes preatt's upper triangle
            g = tril(g)
        scale = op.scale_fwd(x) if op.scale_fwd else None
        assert_close(f"{op.name} forward {name}", g, w.detach().numpy(), n=op.n_fwd, k=op.k_fwd,
                     scale=scale)


def grad_buffers(rng, shapes, dtype):
    """Non-zero gradient buffers, each a view into one flat buffer with 3 guard values
    around it: accumulation must land in the view and nowhere else. -> (flat, views, guard)."""
    total = sum(int(np.prod(s)) for s in shapes.values()) + 3 * (len(shapes) + 1)
    flat = rng.standard_normal(total).astype(dtype)
    guard = np.ones(total, bool)
    views, off = {}, 3
    for name, s in shapes.items():
        n = int(np.prod(s))
        views[name] = flat[off:off + n].reshape(s)
        guard[off:off + n] = False
        off += n + 3
    return flat, views, guard


def check_backward(op, K, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = op.make(rng, dtype)
    with np.errstate(**_FPE):
        out = op.forward(K, x)
    d = {n: rng.standard_normal(out[n].shape).astype(dtype) for n in op.douts}
    shapes = {g: (x[src].shape if src else out["att"].shape) for g, src in op.grads.items()}
    flat, g, guard = grad_buffers(rng, shapes, dtype)
    flat0 = flat.copy()
    g0 = {n: v.astype(np.float64) for n, v in g.items()}
    with np.errstate(**_FPE):
        op.backward(K, x, out, d, g)
    assert np.array_equal(flat[guard], flat0[guard]), f"{op.name} backward wrote outside its buffers"
    if op.expected is not None:
        want = op.expected(x, out, d, g0)
    else:
        t = to_torch(x)
        leaves = {src: t[src].requires_grad_(True) for src in op.grads.values()}
        f = op.formula(t)
        outs = [f[n] for n in op.douts]
        gs = torch.autograd.grad(outs, list(leaves.values()), [T64(d[n]) for n in op.douts])
        by_src = dict(zip(leaves, gs))
        want = {n: g0[n] + by_src[src].numpy() for n, src in op.grads.items()}
    for n in op.grads:
        assert g[n].dtype == dtype, f"{op.name} backward {n}: dtype {g[n].dtype}"
        # scale: the size of the added gradient (or of its terms); ulps=1: the rounding of
        # the final `+=` onto the (exact, non-zero) starting buffer
        scale = op.scale_bwd(x, d) if op.scale_bwd else float(np.max(np.abs(want[n] - g0[n])))
        assert_close(f"{op.name} backward {n}", g[n], want[n], n=op.n_bwd, k=op.k_bwd,
                     scale=scale, ulps=1)


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKENDS.keys())
@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
def test_forward_matches_torch(op, backend, dtype):
    check_forward(op, KernelSet.from_module(BACKENDS[backend]), dtype)


BWD = [op for op in OPS if op.backward is not None]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKENDS.keys())
@pytest.mark.parametrize("op", BWD, ids=[op.name for op in BWD])
def test_backward_matches_autograd(op, backend, dtype):
    check_backward(op, KernelSet.from_module(BACKENDS[backend]), dtype)


# ----------------------------------------------------------------------------- mutants

def mutant(base=nk, backend="numpy", **overrides):
    """A KernelSet of ``base``'s kernels with some replaced."""
    return KernelSet.from_module(as_namespace({**resolve(base), **overrides}, backend))


def overwrite(f, i):
    """``+=`` turned into ``=`` for the i-th argument of backward kernel f."""
    def g(*args):
        args = list(args)
        dst, args[i] = args[i], np.zeros_like(args[i])
        f(*args)
        dst[...] = args[i]
    return g


def with_const(name, value):
    """The NumPy kernels with one of the C's constants changed (patched while used)."""
    def make(monkeypatch):
        monkeypatch.setattr(nk, name, value)
        return KernelSet.from_module(nk)
    return make


def _ln_unbiased(inp, weight, bias):
    out, mean, rstd = nk.layernorm_forward(inp, weight, bias)
    var = ((inp - mean[..., None]) ** 2).sum(-1) / (C - 1)
    rstd = 1 / np.sqrt(var + 1e-5)
    return (inp - mean[..., None]) * rstd[..., None] * weight + bias, mean, rstd


def _ln_bwd_no_mean_term(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    nk.layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd)
    dinp += (weight * dout).mean(-1, keepdims=True) * rstd[..., None]   # undo "- dnorm_mean"


def _enc_bwd_fancy(dwte, dwpe, dout, inp):
    dwte[inp] += dout      # buffered fancy-index add: repeated ids count once
    dwpe[:T] += dout.sum(0)


def _att_wrong_scale(inp, NH_):
    q = inp.copy()
    q[..., :C] /= np.sqrt(hs)  # scale 1/hs instead of 1/sqrt(hs)
    return nk.attention_forward(q, NH_)


def _att_no_mask(inp, NH_):
    out, preatt, att = nk.attention_forward(inp, NH_)
    return out, preatt, att + np.triu(np.ones((T, T)), 1) * 1e-3   # upper triangle not 0


def _att_bwd_no_dv(dinp, dpreatt, datt, dout, inp, att, NH_):
    tmp = np.zeros_like(dinp)
    nk.attention_backward(tmp, dpreatt, datt, dout, inp, att, NH_)
    tmp[..., 2 * C:] = 0       # the value path dropped
    dinp += tmp


def _att_bwd_local(dinp, dpreatt, datt, dout, inp, att, NH_):
    """A natural port that does not read the accumulated datt/dpreatt back (the C does)."""
    dp, da = np.zeros_like(dpreatt), np.zeros_like(datt)
    nk.attention_backward(dinp, dp, da, dout, inp, att, NH_)
    dpreatt += dp
    datt += da


def _gelu_bwd_no_sech(dinp, inp, dout):
    s = np.sqrt(2 / np.pi)
    dinp += 0.5 * (1 + np.tanh(s * (inp + 0.044715 * inp ** 3))) * dout   # sech^2 term dropped


def _softmax_over_vp(logits, V_):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _ce_bwd_full_row(dlogits, dlosses, probs, targets, V_):
    nk.crossentropy_softmax_backward(dlogits, dlosses, probs, targets, V_)
    dlogits[..., V_:] = 0      # writes the padded columns


def _ce_bwd_no_dloss(dlogits, dlosses, probs, targets, V_):
    nk.crossentropy_softmax_backward(dlogits, np.ones_like(dlosses), probs, targets, V_)


def _adamw_coupled(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, t):
    # L2 regularisation (Adam) instead of decoupled weight decay (AdamW)
    nk.adamw(param, grad + weight_decay * param, m, v, lr, beta1, beta2, eps, 0.0, t)


def _adamw_no_bias_correction(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, t):
    nk.adamw(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, 10 ** 6)


def _t_residual_bwd_rebind(dinp1, dinp2, dout):
    dinp1 = dinp1 + dout       # rebinding, not in place: the caller's buffer never changes
    dinp2.add_(dout)


def _t_gelu_bwd_copy(dinp, inp, dout):
    tmp = torch.zeros_like(dinp)
    tk.gelu_backward(tmp, inp, dout)
    dinp.copy_(tmp)            # `=` instead of `+=`


# (op, check, mutant name, factory(monkeypatch) -> KernelSet)
MUTANTS = [
    ("encoder", "forward", "no_wpe",
     lambda mp: mutant(encoder_forward=lambda inp, wte, wpe: wte[inp])),
    ("encoder", "backward", "fancy_index_add", lambda mp: mutant(encoder_backward=_enc_bwd_fancy)),
    ("encoder", "backward", "overwrite_dwpe",
     lambda mp: mutant(encoder_backward=overwrite(nk.encoder_backward, 1))),
    ("layernorm", "forward", "eps_1e-6", with_const("LN_EPS", 1e-6)),
    ("layernorm", "forward", "eps_1e-4", with_const("LN_EPS", 1e-4)),
    ("layernorm", "forward", "unbiased_var", lambda mp: mutant(layernorm_forward=_ln_unbiased)),
    ("layernorm", "backward", "overwrite_dinp",
     lambda mp: mutant(layernorm_backward=overwrite(nk.layernorm_backward, 0))),
    ("layernorm", "backward", "overwrite_dweight",
     lambda mp: mutant(layernorm_backward=overwrite(nk.layernorm_backward, 1))),
    ("layernorm", "backward", "no_dnorm_mean", lambda mp: mutant(layernorm_backward=_ln_bwd_no_mean_term)),
    ("matmul", "forward", "no_bias",
     lambda mp: mutant(matmul_forward=lambda inp, w, b: nk.matmul_forward(inp, w, None))),
    ("matmul", "backward", "overwrite_dweight",
     lambda mp: mutant(matmul_backward=overwrite(nk.matmul_backward, 1))),
    ("matmul", "backward", "overwrite_dbias",
     lambda mp: mutant(matmul_backward=overwrite(nk.matmul_backward, 2))),
    ("matmul", "backward", "overwrite_dinp",
     lambda mp: mutant(matmul_backward=overwrite(nk.matmul_backward, 0))),
    ("attention", "forward", "scale_1_over_hs", lambda mp: mutant(attention_forward=_att_wrong_scale)),
    ("attention", "forward", "upper_triangle", lambda mp: mutant(attention_forward=_att_no_mask)),
    ("attention", "backward", "overwrite_datt",
     lambda mp: mutant(attention_backward=overwrite(nk.attention_backward, 2))),
    ("attention", "backward", "no_dv", lambda mp: mutant(attention_backward=_att_bwd_no_dv)),
    ("attention", "backward", "no_readback", lambda mp: mutant(attention_backward=_att_bwd_local)),
    ("gelu", "forward", "coef_0.0447", with_const("GELU_COEF", 0.0447)),
    ("gelu", "backward", "no_sech2_term", lambda mp: mutant(gelu_backward=_gelu_bwd_no_sech)),
    ("gelu", "backward", "overwrite",
     lambda mp: mutant(gelu_backward=overwrite(nk.gelu_backward, 0))),
    ("gelu", "backward", "torch_copy", lambda mp: mutant(tk, "torch", gelu_backward=_t_gelu_bwd_copy)),
    ("residual", "forward", "minus",
     lambda mp: mutant(residual_forward=lambda a, b: a - b)),
    ("residual", "backward", "overwrite_dinp2",
     lambda mp: mutant(residual_backward=overwrite(nk.residual_backward, 1))),
    ("residual", "backward", "torch_rebind",
     lambda mp: mutant(tk, "torch", residual_backward=_t_residual_bwd_rebind)),
    ("softmax", "forward", "over_vp", lambda mp: mutant(softmax_forward=_softmax_over_vp)),
    ("crossentropy", "forward", "log_not_negated",
     lambda mp: mutant(crossentropy_forward=lambda p, t: -nk.crossentropy_forward(p, t))),
    ("crossentropy", "backward", "writes_padding",
     lambda mp: mutant(crossentropy_softmax_backward=_ce_bwd_full_row)),
    ("crossentropy", "backward", "no_dloss", lambda mp: mutant(crossentropy_softmax_backward=_ce_bwd_no_dloss)),
    ("crossentropy", "backward", "overwrite",
     lambda mp: mutant(crossentropy_softmax_backward=overwrite(nk.crossentropy_softmax_backward, 0))),
    ("adamw", "forward", "coupled_weight_decay", lambda mp: mutant(adamw=_adamw_coupled)),
    ("adamw", "forward", "no_bias_correction", lambda mp: mutant(adamw=_adamw_no_bias_correction)),
]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("op_name, check, name, factory", MUTANTS,
                         ids=[f"{o}-{c}-{n}" for o, c, n, _ in MUTANTS])
def test_mutant_is_caught(op_name, check, name, factory, dtype, monkeypatch):
    K = factory(monkeypatch)
    run = check_forward if check == "forward" else check_backward
    with pytest.raises(AssertionError):
        run(OP[op_name], K, dtype)


def test_table_covers_every_kernel():
    """Adding a kernel to the protocol without a row here fails."""
    from pyref.protocol import KERNEL_NAMES
    names = {op.name for op in OPS}
    for kernel in KERNEL_NAMES:
        op = kernel.split("_")[0]
        assert op in names, f"{kernel} has no row in OPS"
        tested = {c for o, c, *_ in MUTANTS if o == op}
        kind = "backward" if "backward" in kernel else "forward"
        assert kind in tested, f"{kernel}: no mutant exercises its {kind} check"


# Edge shapes, run through the same table by rebinding this module's shape constants:
# T = 1 (a single causal position), hs = 1, NH = 1, B = 1, T = maxT.
EDGE_SHAPES = {"T1_NH1": (1, 1, 4, 1), "hs1": (1, 2, 3, 3), "Tmax": (3, maxT, 8, 2)}
EDGE_OPS = [OP[n] for n in ("encoder", "layernorm", "matmul", "attention", "crossentropy")]


@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=EDGE_SHAPES.keys())
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKENDS.keys())
@pytest.mark.parametrize("op", EDGE_OPS, ids=[f"{op.name}-edge" for op in EDGE_OPS])
def test_edge_shapes(op, backend, shape, monkeypatch):
    b, t, c, nh = EDGE_SHAPES[shape]
    for name, value in dict(B=b, T=t, C=c, NH=nh, hs=c // nh).items():
        monkeypatch.setitem(globals(), name, value)
    K = KernelSet.from_module(BACKENDS[backend])
    check_forward(op, K, np.float64)
    check_backward(op, K, np.float64)
