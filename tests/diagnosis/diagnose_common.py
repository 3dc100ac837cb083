"""What the diagnosis tests (tests/diagnosis/test_diagnose*.py, one module per family of
harness/diagnosis/catalogue and test_diagnose.py for what is no family's) share: a port
with one kernel changed and its failing checks, the assertion that each failure names
exactly the planted cause, the tiny model's run, the ports that tests outside their own
family use, and the edits of llmc/train_gpt2.c with the libraries built from them (once
per process: every family's tests share the three builds).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import edit_function, pristine_source

from harness import (CKernels, DiagnosedComparison, build_library, check_kernel, load_library, make_inputs,
                     run_parity)
from harness.diagnosis.catalogue import FAMILIES
from pyref import numpy_kernels as nk
from pyref import synth
from pyref.cases import SHAPE_BY_NAME
from pyref.config import PRESETS
from pyref.protocol import KernelSet
from pyref.spec import SPEC

ROOT = Path(__file__).resolve().parents[2]
F = np.float32
BASE = SHAPE_BY_NAME["base"]


def port_with(kernel, fn) -> KernelSet:
    """The NumPy reference kernels with ``kernel`` replaced by ``fn`` (a port of one change)."""
    funcs = {name: getattr(nk, name) for name in SPEC}
    funcs[kernel] = fn
    return KernelSet(funcs, backend="numpy", name=f"port ({kernel} changed)")


def failures(impl, kernel, shape=BASE, seed=0):
    """The failing checks of ``kernel`` of ``impl`` on the per-op inputs of ``shape``."""
    results = check_kernel(impl, kernel, make_inputs(SPEC[kernel], shape, seed=seed))
    return [c for c in results if not c.passed]


def assert_diagnosed(failed, variant_id, also=()):
    """Each failing output is diagnosed with ``variant_id`` (and at most ``also``)."""
    assert failed, f"the port carrying {variant_id} passed its check"
    for c in failed:
        assert isinstance(c, DiagnosedComparison) and not c.passed
        ids = set(c.diagnosis.ids)
        assert variant_id in ids, f"{c.name}: {c.diagnosis.text()}"
        assert ids <= {variant_id, *also}, f"{c.name}: unrelated causes in {c.diagnosis.text()}"


def tiny_run(lib=None, impls=None, steps=1):
    """run_parity on the tiny preset (batch 4 x 16): the C of ``lib`` and ``impls``."""
    cfg = PRESETS["tiny"]
    return run_parity(cfg, synth.init_params(cfg, seed=0), synth.batches(cfg, 4, 16), lib=lib, impls=impls or {}, steps=steps)


def judge_as_replay(vid, kernel, output, actual, expected, args, call):
    """``actual`` judged against ``expected`` as a model's replay judges ``kernel``'s
    ``output``, with ``call`` (what the replay hands the diagnosis)."""
    from harness.checks.verdict import call_scale, judge
    a64 = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
           for k, v in args.items()}
    scale = call_scale(kernel, output, a64, {output: expected})
    return judge(kernel, output, actual, expected, a64, name=vid, elem_scale=scale, calls=lambda: call)


# ----------------------------------------------------------------------------- families

# a fitted variant names its cause by the constant found (attention.scale: 1/hs, 1), a
# variant with forms by the form found
CAUSE_OF = {"attention.scale=1/hs": "attention.scale", "attention.no-scale": "attention.scale",
            "embedding.positions": "embedding.position-shift", "gelu.silu": "gelu.sigmoid",
            "gelu.sigmoid-scale": "gelu.sigmoid", "gelu.square": "gelu.power", "layernorm.rms": "layernorm.form",
            "layernorm.no-sqrt": "layernorm.form", "layernorm.uncentred-variance": "layernorm.form",
            "layernorm.multiplied": "layernorm.form",
            "crossentropy.softmax-twice": "crossentropy.loss-of-probabilities",
            "crossentropy.no-log": "crossentropy.loss-of-probabilities"}
CAUSE_OF.update({"labels.time-major": "labels.permuted"})
CAUSE_OF.update({f"gelu.{f}": "gelu.activation"
                 for f in ("relu-squared", "squared", "leaky-relu", "elu", "softplus", "mish", "tanh")})
# a variant whose forms each name a cause of their own: <variant>.<form>
CAUSE_OF.update({f"attention.masking.{f}": "attention.masking"
                 for f in ("after-softmax", "transposed", "added", "inverted")})
CAUSE_OF.update({f"attention.qkv-order.{f}": "attention.qkv-order"
                 for f in ("q-k-swapped", "k-v-swapped", "q-v-swapped", "rotated", "k-is-q", "v-is-k", "v-is-q",
                           "q-is-k", "q-is-v", "k-is-v")})


# variant id -> its family's module in harness/diagnosis/catalogue (loss: softmax,
# crossentropy and labels; matmul: matmul and backward), the test module it belongs to
FAMILY_OF = {v.id: m.__name__.rsplit(".", 1)[1] for m in FAMILIES for v in m.VARIANTS}


def family_of(variant_id: str) -> str:
    """The catalogue module (and so the test module) of a port's or an edit's variant."""
    return FAMILY_OF[CAUSE_OF.get(variant_id, variant_id)]


def port_cases(ports: dict) -> list:
    """One case per (variant, kernel, port[, shape]) row of a family's PORTS table."""
    return [pytest.param(vid, row[0], row[1], row[2] if len(row) > 2 else "base", id=f"{vid}-{row[0]}-{i}")
            for vid, rows in ports.items() for i, row in enumerate(rows)]


# ----------------------------------------------------------------------------- ports used outside their family
# float32 ports, each with one change, written the way a port would carry it

def _erf32(x):
    return np.frompyfunc(math.erf, 1, 1)(x.astype(np.float64)).astype(F)


def gelu_erf_fwd(inp):
    return F(0.5) * inp * (F(1) + _erf32(inp / F(math.sqrt(2))))


def gelu_erf_bwd(dinp, inp, dout):
    cdf = F(0.5) * (F(1) + _erf32(inp / F(math.sqrt(2))))
    pdf = np.exp(F(-0.5) * inp * inp) / F(math.sqrt(2 * math.pi))
    dinp += (cdf + inp * pdf) * dout


def gelu_tanh_arg(x, coef):
    return F(math.sqrt(2 / math.pi)) * (x + F(coef) * x * x * x)


def gelu_coef_fwd(inp):
    return F(0.5) * inp * (F(1) + np.tanh(gelu_tanh_arg(inp, 0.0447)))


def gelu_coef_bwd(dinp, inp, dout):
    coef = F(0.04472)
    a = gelu_tanh_arg(inp, coef)
    sech2 = F(1) / np.cosh(a) ** 2
    g = F(0.5) * (F(1) + np.tanh(a)) + inp * F(0.5) * sech2 * F(math.sqrt(2 / math.pi)) * \
        (F(1) + F(3) * coef * inp * inp)
    dinp += g * dout


def ce_log_eps(probs, targets):
    p = np.take_along_axis(probs, targets[..., None].astype(np.intp), axis=-1)[..., 0]
    return -np.log(p + F(1e-6))


def overwrite(kernel, arg):
    from pyref.protocol import SIGNATURES
    pos = SIGNATURES[kernel].index(arg)

    def port(*args):
        args[pos][...] = 0
        getattr(nk, kernel)(*args)
    return port


# ----------------------------------------------------------------------------- the C, edited

# (variant, C function, old text, new text): each edit replaces every occurrence of `old`
# within the function's body (at least one)
C_EDITS = [
    ("gelu.erf", "gelu_forward", "tanhf(GELU_SCALING_FACTOR * (x + cube))", "erff(x / sqrtf(2.0f))"),
    ("gelu.cubic-constant", "gelu_backward", "0.044715f", "0.04471f"),
    ("layernorm.eps=1e-06", "layernorm_forward", "1e-5f", "1e-6f"),
    ("layernorm.unbiased-variance", "layernorm_forward", "v = v / C;", "v = v / (C - 1);"),
    ("attention.scale=1/hs", "attention_forward", "1.0 / sqrtf(hs)", "1.0 / hs"),
    ("attention.no-diagonal", "attention_forward", "t2 <= t", "t2 < t"),
    ("attention.no-causal-mask", "attention_forward", "t2 <= t", "t2 < T"),
    ("attention.no-scale", "attention_backward", "1.f / sqrtf(hs)", "1.f"),
    ("embedding.no-wpe", "encoder_forward", "out_bt[i] = wte_ix[i] + wpe_t[i];", "out_bt[i] = wte_ix[i];"),
    ("residual.branch-scale", "residual_forward", "out[i] = inp1[i] + inp2[i];", "out[i] = inp1[i] + 0.5f * inp2[i];"),
    ("output.scale", "layernorm_forward", "float o = n * weight[i] + bias[i];",
     "float o = (n * weight[i] + bias[i]) * 1.001f;"),
    ("softmax.padded-columns", "softmax_forward", "i < V;", "i < Vp;"),
    ("crossentropy.log-eps", "crossentropy_forward", "-logf(probs_bt[ix])", "-logf(probs_bt[ix] + 1e-6f)"),
    ("labels.next-position", "crossentropy_forward", "targets[b * T + t]", "targets[b * T + (t + 1) % T]"),
    ("labels.previous-position", "crossentropy_softmax_backward", "targets[b * T + t]",
     "targets[b * T + (t + T - 1) % T]"),
    ("matmul.no-bias", "matmul_forward", "(bias != NULL) ? bias[o] : 0.0f", "0.0f"),
    ("matmul.no-bias", "matmul_backward", "if (dbias != NULL) { dbias[o] += d; }", ""),
    ("backward.overwrite", "layernorm_backward", "dinp_bt[i] += dval;", "dinp_bt[i] = dval;"),
    ("backward.overwrite", "residual_backward", "dinp2[i] += dout[i];", "dinp2[i] = dout[i];"),
    ("backward.last-term-only", "matmul_backward", "dwrow[i] += inp_bt[i] * d;", "dwrow[i] = inp_bt[i] * d;"),
    ("backward.last-term-only", "encoder_backward", "dwte_ix[i] += d;", "dwte_ix[i] = d;"),
    ("adamw.no-bias-correction", "gpt2_update", "(1.0f - powf(beta1, t))", "1.0f"),
    ("adamw.eps-in-sqrt", "gpt2_update", "(sqrtf(v_hat) + eps)", "sqrtf(v_hat + eps)"),
    ("adamw.weight-decay=0.01", "gpt2_update", "weight_decay * param", "0.01f * param"),
    # GELU's output stored in bfloat16 (rounded to nearest even), as a port's .bfloat16() cast
    ("precision.bfloat16", "gelu_forward", "out[i] = 0.5f * x * (1.0f + tanhf(GELU_SCALING_FACTOR * (x + cube)));",
     "float y_ = 0.5f * x * (1.0f + tanhf(GELU_SCALING_FACTOR * (x + cube))); unsigned int b_; memcpy(&b_, &y_, 4); "
     "b_ = (b_ + 0x7FFFu + ((b_ >> 16) & 1u)) & 0xFFFF0000u; memcpy(&y_, &b_, 4); out[i] = y_;"),
]
# the softmax over Vp must also keep its padded probabilities (the zeroing loop goes)
EXTRA = {("softmax.padded-columns", "softmax_forward"): ("probs_bt[i] = 0.0f;", "(void)0;"),
         ("adamw.no-bias-correction", "gpt2_update"): ("(1.0f - powf(beta2, t))", "1.0f")}
KERNEL_OF = {"gpt2_update": "adamw"}


def _builds() -> list[list[tuple]]:
    """The edits grouped into as few sources as possible, one edit per function each."""
    groups: list[list[tuple]] = []
    for edit in C_EDITS:
        group = next((g for g in groups if all(e[1] != edit[1] for e in g)), None)
        if group is None:
            groups.append(group := [])
        group.append(edit)
    return groups


_C_MUTANTS: list = []       # built once per process, whichever family's test asks first


@pytest.fixture(scope="module")
def c_mutants(tmp_path_factory):
    """[(edits, Library)] for each group of edits, built in parallel; a family's test
    module imports this fixture, and every module of a process shares the libraries."""
    if _C_MUTANTS:
        return _C_MUTANTS
    src = pristine_source()
    jobs = []
    for i, group in enumerate(_builds()):
        text = src
        for vid, func, old, new in group:
            text = edit_function(text, func, old, new)
            if (vid, func) in EXTRA:
                text = edit_function(text, func, *EXTRA[vid, func])
        d = tmp_path_factory.mktemp(f"diag{i}")
        (d / "train_gpt2.c").write_text(text)
        jobs.append((group, d))
    with ThreadPoolExecutor(2) as pool:
        infos = list(pool.map(lambda j: build_library(j[1] / "train_gpt2.c", j[1] / "lib.so", quiet=True), jobs))
    _C_MUTANTS.extend((group, load_library(info.library)) for (group, _), info in zip(jobs, infos))
    return _C_MUTANTS


def c_cases(family: str) -> list:
    """The C edits of one family, as test cases."""
    return [pytest.param(vid, func, id=f"{vid}-{func}") for vid, func, _, _ in C_EDITS if family_of(vid) == family]


def assert_c_edit_diagnosed(c_mutants, variant_id, func):
    """The build carrying the edit of ``func`` fails its per-op check with the edit's cause."""
    lib = next(lib for group, lib in c_mutants if any(e[:2] == (variant_id, func) for e in group))
    kernel = KERNEL_OF.get(func, func)
    failed = failures(CKernels(lib), kernel)
    if kernel == "residual_backward":      # dinp1 is untouched: only dinp2 fails
        assert [c.name for c in failed] == ["residual_backward.dinp2"]
    assert_diagnosed(failed, variant_id)
