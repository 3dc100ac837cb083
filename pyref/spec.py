"""What each kernel is: one row per kernel of the protocol, and nothing about a kernel
anywhere else.

A row (:class:`KernelSpec`) holds the kernel's signature, the outputs it returns (a
forward) or accumulates into in place (a backward, AdamW), and for each output
(:class:`Output`): its shape, the axes its elements are labelled by, which elements are
compared, the reduction length its float32 rounding grows with, the tolerance rule with
its reason, and the size of the terms it is summed from. The row also names how to make
inputs for a per-op case (:mod:`pyref.cases`).

Everything else is read from here: the protocol and its adapter (:mod:`pyref.protocol`),
the op table and the per-op checks (:mod:`harness.checks.perop`), the replay and the
witness (:mod:`harness.checks.replay`, :mod:`harness.arbiter.oracle`), the tolerance policy
(:mod:`harness.arbiter.tolerances`) and the tables of docs/kernels.md (:func:`markdown`, kept in
sync by a test). docs/kernels.md, "Adding a kernel or an output", shows what a change
touches: one row.

Shapes and reduction lengths are Python expressions over the call's dimensions
(:func:`dims`: ``B T C NH hs OC V Vp``, from the arguments themselves), so that the same
text is evaluated for a check and printed in the docs.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from . import cases, terms


@dataclass(frozen=True)
class Rule:
    """Tolerance constants of an output, in units of u·sqrt(n) (harness.arbiter.tolerances), and
    the bias test's minimum effect, in units of u.

    sigma:  the scale of one element's error (relative to its size): the element-wise
            bound is sigma times the quantile that the largest of the tensor's errors
            exceeds with probability harness.arbiter.tolerances.P_FALSE_ALARM (7.8 for 1e4
            elements, 8.8 for 4e7);
    k_norm: the norm-wise bound, the error's root-mean-square over the tensor;
    bias:   the minimum effect of the bias test (harness.arbiter.stats): the largest mean signed
            error, as a constant factor (or offset) relative to the elements' values, that
            a correct implementation may show, in units of u = 2^-24 (half an ulp at 1):
            not u·sqrt(n), since rounding to nearest averages to zero over any reduction
            and what is left is a constant's rounding or a libm's lean, the same at any n;
    bias_size: a minimum effect relative to the elements' sizes (the terms they are summed
            from) rather than their values, in units of u, for an output whose legitimate lean
            scales a term rather than the value (0: none; harness.arbiter.compare.Tolerance);
    bias_why: why that much (what legitimate builds showed: harness.calibrate)."""

    sigma: float
    k_norm: float
    why: str
    bias: float = 1.0
    bias_size: float = 0.0
    bias_why: str = ("rounding averages to zero; a constant rounded differently, or repeated values "
                     "rounding alike, leans up to u")


DEFAULT = Rule(0.5, 1.5, "float32 rounding, random-walk growth over the reduction")


def with_bias(rule: Rule, bias: float, why: str, size: float = 0.0) -> Rule:
    """``rule`` with another minimum effect for the bias test, and its reason."""
    return replace(rule, bias=bias, bias_size=size, bias_why=why)


@dataclass(frozen=True)
class Output:
    """One output of a kernel."""

    name: str
    shape: str                          # an expression over dims() and the arguments
    axes: tuple[str, ...]               # labels of its axes, for "worst at b=1 t=3 c=7"
    n: str = "1"                        # reduction length: an expression over dims()
    rule: Rule = DEFAULT
    terms: Callable | None = None       # pyref.terms function; None: judged by its own size
    causal: bool = False                # only the lower triangle (t2 <= t) is ever written
    span: int = 1                       # the bias test's correlated run: how many trailing axes
                                        # share a rounding (1: a row shares a layernorm's rstd, a
                                        # softmax's sum; 0: every element rounds on its own)
    derivable: bool = False             # a port may not give it (a forward's statistics, a fused
                                        # loss's intermediates): then the float64 reference derives
                                        # it from the port's own inputs, and it is never compared


@dataclass(frozen=True)
class KernelSpec:
    """One kernel of the protocol."""

    name: str
    op: str                             # its op: `pytest -k <op>` selects its tests
    signature: tuple[str, ...]
    outputs: tuple[Output, ...]         # returned (a forward), else written in place, in order
    returns: bool                       # a forward: returns its outputs; else accumulates
    make: Callable                      # (cases.Shape, rng) -> named arguments of a case
    note: str = ""                      # for the docs table
    shapes: tuple[str, ...] | None = None   # per-op cases on these shapes only (None: all)
    updates: bool = False               # an optimizer step: in place, but no backward (AdamW)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    @property
    def backward(self) -> bool:
        """A backward kernel: it accumulates gradients into the buffers it is given."""
        return not self.returns and not self.updates

    @property
    def omissible(self) -> tuple[str, ...]:
        """The outputs a forward may leave out when it returns its main output alone."""
        return tuple(o.name for o in self.outputs[1:] if o.derivable) if self.returns else ()

    @property
    def inplace(self) -> tuple[str, ...]:
        """The arguments it writes in place (they must reach it zero-copy)."""
        return () if self.returns else self.output_names

    def output(self, name: str) -> Output:
        for o in self.outputs:
            if o.name == name:
                return o
        raise KeyError(f"{self.name} has no output {name!r} (it has {', '.join(self.output_names)})")

    def n(self, output: str, args: dict) -> int:
        """The reduction length of ``output`` for a call on ``args``."""
        return max(1, int(_eval(self.output(output).n, dims(args))))

    def expected_shapes(self, args: dict) -> list[tuple[int, ...]]:
        """The shapes a forward must return for ``args``, in order."""
        env = {**args, **dims(args), "broadcast": np.broadcast_shapes}
        return [tuple(int(d) for d in _eval(o.shape, env)) for o in self.outputs]

    def unit(self, output: str, shape: tuple[int, ...]) -> int:
        """The bias test's correlated run of ``output`` (of ``shape``): the number of
        elements of its last ``span`` axes (:func:`harness.arbiter.compare.compare`'s ``unit``)."""
        span = self.output(output).span
        return 1 if span <= 0 else int(np.prod(shape[len(shape) - min(span, len(shape)):], dtype=np.int64))

    def mask(self, output: str, args: dict) -> np.ndarray | None:
        """Elements of ``output`` to compare (None: all): a causal output's upper triangle
        is never written by the C."""
        if not self.output(output).causal:
            return None
        T = dims(args)["T"]
        return np.tril(np.ones((T, T), bool))


def dims(args: dict) -> dict[str, int]:
    """The dimensions of a call, read from its arguments: B, T from the first activation
    (inp, dout, probs, logits, inp1); C from a weight, wte, or the activation's width
    (attention's input is 3C wide); NH, hs; OC from matmul's weight; V; Vp from the logits."""
    d: dict[str, int] = {}
    shape = {k: tuple(v.shape) for k, v in args.items() if hasattr(v, "shape")}   # NumPy or torch
    x = next((shape[k] for k in ("inp", "dout", "probs", "logits", "dlogits", "inp1")
              if len(shape.get(k, ())) >= 2), None)
    if x is not None:
        d["B"], d["T"] = int(x[0]), int(x[1])
    w = shape.get("weight")
    if args.get("NH") is not None:
        d["NH"] = int(args["NH"])
        d["C"] = int(shape["inp"][-1]) // 3
        d["hs"] = d["C"] // max(1, d["NH"])
    elif w is not None:
        d["C"] = int(w[-1])
        if len(w) == 2:
            d["OC"] = int(w[0])
    elif "wte" in shape:
        d["C"] = int(shape["wte"][-1])
    elif x is not None and len(x) == 3:
        d["C"] = int(x[-1])
    if args.get("V") is not None:
        d["V"] = int(args["V"])
    p = next((shape[k] for k in ("logits", "probs", "dlogits") if k in shape), None)
    if p is not None:
        d["Vp"] = int(p[-1])
    return d


_CODE: dict[str, object] = {}


def _eval(expr: str, env: dict):
    """An expression of a row (checked at import: names, arithmetic, tuples, attributes)."""
    code = _CODE.get(expr)
    if code is None:
        code = _CODE[expr] = compile(expr, f"<spec {expr}>", "eval")
    try:
        return eval(code, {"__builtins__": {}}, env)   # noqa: S307 -- the rows' own text
    except NameError as e:
        raise ValueError(f"{expr!r}: {e} among the call's dimensions {sorted(k for k in env if len(k) < 3)}") from None


_ALLOWED = (ast.Expression, ast.Name, ast.Load, ast.BinOp, ast.Add, ast.Mult, ast.FloorDiv, ast.Sub,
            ast.Constant, ast.Tuple, ast.Attribute, ast.Call)


def _validate(spec: KernelSpec) -> None:
    for o in spec.outputs:
        for expr in (o.shape, o.n):
            bad = [type(n).__name__ for n in ast.walk(ast.parse(expr, mode="eval")) if not isinstance(n, _ALLOWED)]
            if bad:
                raise ValueError(f"{spec.name}.{o.name}: {expr!r} uses {bad}")
    if not spec.returns and not set(spec.inplace) <= set(spec.signature):
        raise ValueError(f"{spec.name}: writes {spec.inplace}, not all in its signature")


# ----------------------------------------------------------------------------
# the rows

BTC = ("b", "t", "c")
BT = ("b", "t")
BHTT = ("b", "h", "t", "t2")

_GELU_OUT = Rule(0.65, 2.0, "tanhf is a few ulp off in libm and in -Ofast's vector libm")
_GELU_DINP = Rule(0.75, 2.0, "tanhf and coshf are each a few ulp off; sech^2 = 1/cosh^2 doubles coshf's")
_EXPF_ATT = Rule(0.65, 1.5, "expf's ulp error on top of the softmax's row sum")
_EXPF_PROBS = Rule(0.65, 1.5, "expf's ulp error on top of the row sum over V")
_DPREATT = Rule(0.5, 1.5, "the softmax Jacobian of datt, a dot product over hs of the same call: each datt "
                           "counted with the size of its products, since in a trained model datt cancels "
                           "(~1/30 of its terms at GPT-2 124M) and its rounding error, carried by att, dominates")
_ATT_DINP = Rule(0.5, 1.5, "dq, dk from dpreatt (counted with its own terms' size) and dv, summed over T: a "
                           "chain of hs + T + T roundings")
_OVER_BATCH = Rule(0.75, 1.5, "a sum over the B*T positions, whose terms are correlated across positions (a batch "
                              "shares its gradient's direction): the partial sums outgrow a random walk, and the "
                              "C's sequential sum reaches 0.5 u sqrt(n) per element at GPT-2 124M (calibrate --scale)")
_LOGF = Rule(0.65, 2.0, "logf of a probability: an absolute error of u*|p| becomes ~u in the loss")
_PREATT = with_bias(DEFAULT, 7.0, "the scale 1/sqrt(hs) is a float32 constant, each implementation's computed its "
                                  "own way: the C's (float)(1.0 / sqrtf(hs)) and torch's float(1 / math.sqrt(hs)) "
                                  "are rounded, up to u off (0.61u at hs = 6 and 24); under -ffast-math (-Ofast) gcc "
                                  "computes it as rsqrtss, whose estimate Intel and AMD document to within 1.5*2^-12, "
                                  "and one Newton step with an fma: 1.5e^2 + three roundings, -5.9u to +2.5u (-5.48u "
                                  "to +2.22u over every estimate allowed and hs <= 4096; -u on a Xeon at hs = 16); "
                                  "and the product with it leans up to u more where it sits just off a power of two "
                                  "(-1.5u in all on that Xeon)")
_LN_MEAN = with_bias(DEFAULT, 2.0, "a row's sum over C, divided by C: under -ffast-math (-Ofast) gcc multiplies by "
                                   "1.0f / C instead (-freciprocal-math), a constant rounded up to u off, whose product "
                                   "leans up to u more: +1.23u for a constant row at C = 7 (-3.25 -> -3.2500002)")
_UPDATE = with_bias(DEFAULT, 1.5, "parameters that start equal (the gains at initialisation) move by the same "
                                  "update and round alike, up to u; torch.optim.AdamW's decay multiplies by "
                                  "float32(1 - lr*wd), up to u/2 more (-0.23u at lr 1e-4, wd 0.1); and the C's "
                                  "float32 bias corrections 1 - beta^t (powf, then a cancellation) scale every "
                                  "update alike, by up to u/(1 - beta2^t): -20u of a bias's value at step 2, "
                                  "0.15u of its size (its terms count the update that many times), hence 0.5u "
                                  "of the sizes", size=0.5)

SPECS = (
    KernelSpec("encoder_forward", "encoder", ("inp", "wte", "wpe"), (
        Output("out", "(B, T, C)", BTC, span=0),
    ), True, cases.encoder_forward),
    KernelSpec("encoder_backward", "encoder", ("dwte", "dwpe", "dout", "inp"), (
        Output("dwte", "(Vp, C)", ("token", "c"), "B*T", terms=terms.encoder_backward_dwte, span=0),
        Output("dwpe", "(maxT, C)", ("t", "c"), "B", terms=terms.encoder_backward_dwpe, span=0),
    ), False, cases.encoder_backward),
    KernelSpec("layernorm_forward", "layernorm", ("inp", "weight", "bias"), (
        Output("out", "(B, T, C)", BTC, "C", terms=terms.layernorm_forward_out),
        Output("mean", "(B, T)", BT, "C", _LN_MEAN, terms.layernorm_forward_mean, derivable=True, span=0),
        Output("rstd", "(B, T)", BT, "C", terms=terms.layernorm_forward_rstd, derivable=True, span=0),
    ), True, cases.layernorm_forward, note="eps = 1e-5"),
    KernelSpec("layernorm_backward", "layernorm",
               ("dinp", "dweight", "dbias", "dout", "inp", "weight", "mean", "rstd"), (
        Output("dinp", "(B, T, C)", BTC, "C", terms=terms.layernorm_backward_dinp),
        Output("dweight", "(C,)", ("c",), "B*T", terms=terms.layernorm_backward_dweight, span=0),
        Output("dbias", "(C,)", ("c",), "B*T", terms=terms.layernorm_backward_dbias, span=0),
    ), False, cases.layernorm_backward),
    KernelSpec("matmul_forward", "matmul", ("inp", "weight", "bias"), (
        Output("out", "(B, T, OC)", ("b", "t", "oc"), "C", terms=terms.matmul_forward_out, span=0),
    ), True, cases.matmul_forward, note="out = inp @ weight.T + bias; `bias` may be `None`"),
    KernelSpec("matmul_backward", "matmul", ("dinp", "dweight", "dbias", "dout", "inp", "weight"), (
        Output("dinp", "(B, T, C)", BTC, "OC", terms=terms.matmul_backward_dinp, span=0),
        Output("dweight", "(OC, C)", ("oc", "c"), "B*T", _OVER_BATCH, terms.matmul_backward_dweight, span=0),
        Output("dbias", "(OC,)", ("oc",), "B*T", _OVER_BATCH, terms.matmul_backward_dbias, span=0),
    ), False, cases.matmul_backward, note="`dbias` may be `None`"),
    KernelSpec("attention_forward", "attention", ("inp", "NH"), (
        Output("out", "(B, T, C)", BTC, "T + hs", terms=terms.attention_forward_out),
        Output("preatt", "(B, NH, T, T)", BHTT, "hs", _PREATT, terms.attention_forward_preatt, causal=True,
               derivable=True, span=0),
        Output("att", "(B, NH, T, T)", BHTT, "T + hs", _EXPF_ATT, terms.attention_forward_att, derivable=True),
    ), True, cases.attention_forward,
        note="inp is qkv (B,T,3C); preatt's upper triangle is ignored, att's must be 0"),
    KernelSpec("attention_backward", "attention", ("dinp", "dpreatt", "datt", "dout", "inp", "att", "NH"), (
        Output("dinp", "(B, T, 3*C)", ("b", "t", "c3"), "2*T + hs", _ATT_DINP, terms.attention_backward_dinp),
        Output("dpreatt", "(B, NH, T, T)", BHTT, "T + hs", _DPREATT, terms.attention_backward_dpreatt),
        Output("datt", "(B, NH, T, T)", BHTT, "hs", terms=terms.attention_backward_datt, span=0),
    ), False, cases.attention_backward, note="dpreatt and datt are scratch buffers, passed zeroed"),
    KernelSpec("gelu_forward", "gelu", ("inp",), (
        Output("out", "inp.shape", BTC, rule=_GELU_OUT, terms=terms.gelu_forward_out, span=0),
    ), True, cases.gelu_forward, note="the tanh approximation"),
    KernelSpec("gelu_backward", "gelu", ("dinp", "inp", "dout"), (
        Output("dinp", "inp.shape", BTC, rule=_GELU_DINP, terms=terms.gelu_backward_dinp, span=0),
    ), False, cases.gelu_backward),
    KernelSpec("residual_forward", "residual", ("inp1", "inp2"), (
        Output("out", "broadcast(inp1.shape, inp2.shape)", BTC, span=0),
    ), True, cases.residual_forward),
    KernelSpec("residual_backward", "residual", ("dinp1", "dinp2", "dout"), (
        Output("dinp1", "dout.shape", BTC, span=0),
        Output("dinp2", "dout.shape", BTC, span=0),
    ), False, cases.residual_backward),
    KernelSpec("softmax_forward", "softmax", ("logits", "V"), (
        Output("probs", "logits.shape", ("b", "t", "v"), "V", _EXPF_PROBS, derivable=True),
    ), True, cases.softmax_forward, note="over the first V of Vp columns, 0 in the padding"),
    KernelSpec("crossentropy_forward", "crossentropy", ("probs", "targets"), (
        Output("losses", "(B, T)", BT, rule=_LOGF, derivable=True, span=0),
    ), True, cases.crossentropy_forward),
    KernelSpec("crossentropy_softmax_backward", "crossentropy", ("dlogits", "dlosses", "probs", "targets", "V"), (
        Output("dlogits", "probs.shape", ("b", "t", "v"), span=0),
    ), False, cases.crossentropy_softmax_backward, note="padded columns untouched"),
    KernelSpec("adamw", "adamw", ("param", "grad", "m", "v", "lr", "beta1", "beta2", "eps", "weight_decay", "t"), (
        Output("param", "param.shape", ("i",), "1", _UPDATE, terms.adamw_param, span=0),
        Output("m", "param.shape", ("i",), terms=terms.adamw_m, span=0),
        Output("v", "param.shape", ("i",), span=0),
    ), False, cases.adamw, note="any shape (flat is fine); `t` counts from 1", shapes=("base", "odd"),
        updates=True),
)
SPEC = {s.name: s for s in SPECS}
for _s in SPECS:
    _validate(_s)


# ----------------------------------------------------------------------------
# docs/kernels.md's tables

def markdown() -> str:
    """The protocol table, the table of how each output is judged and that of its bias test,
    as docs/kernels.md shows them (tests/ops/test_spec.py keeps them in sync)."""
    lines = ["| function | returns / accumulates into | notes |", "|---|---|---|"]
    for s in SPECS:
        outs = ", ".join(f"`{o.name}` {o.shape}" for o in s.outputs)
        verb = "returns" if s.returns else "updates in place" if s.updates else "accumulates into"
        lines.append(f"| `{s.name}({', '.join(s.signature)})` | {verb} {outs} | {s.note} |")
    lines += ["", "| output | reduction length n | sigma | k_norm | why | term size |", "|---|---|---:|---:|---|---|"]
    for s in SPECS:
        for o in s.outputs:
            t = f"`terms.{o.terms.__name__}`" if o.terms else "its own size"
            lines.append(f"| `{s.name}.{o.name}` | {o.n} | {o.rule.sigma:g} | {o.rule.k_norm:g} | {o.rule.why} | {t} |")
    lines += ["", "| output | a group spans | bias (u) | why |", "|---|---|---:|---|"]
    for s in SPECS:
        for o in s.outputs:
            span = "elements" if o.span <= 0 else "rows" if o.span == 1 else f"the last {o.span} axes"
            bias = f"{o.rule.bias:g}" + (f" (or {o.rule.bias_size:g} of the sizes)" if o.rule.bias_size else "")
            lines.append(f"| `{s.name}.{o.name}` | {span} | {bias} | {o.rule.bias_why} |")
    return "\n".join(lines) + "\n"
