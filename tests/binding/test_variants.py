"""Legitimate build variants pass every check; deliberately broken C sources fail.

Each library is checked in a subprocess: a library built with -Ofast sets the CPU's
flush-to-zero mode for the whole process it is loaded into, which must not leak into
the rest of the test session.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import pristine_source

from harness import build_library

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "llmc" / "train_gpt2.c"
VARIANTS = {"O2": "-O2", "O3-native": "-O3 -march=native", "Ofast-native": "-Ofast -march=native"}

MODEL_CHECK = """
import sys
from harness import load_kernels, run_parity
from pyref import synth
from pyref.config import PRESETS
cfg = PRESETS[sys.argv[2]]
B, T = int(sys.argv[3]), int(sys.argv[4])
r = run_parity(cfg, synth.init_params(cfg, seed=0), synth.batches(cfg, B, T), lib=sys.argv[1],
               impls={}, steps=2)
for s in r.steps:
    for c in s.checks:
        if not c.passed:
            print("FAIL", c.kind, c.tensor, c.where, c.comparison.max_rel, c.comparison.tol.rel,
                  c.comparison.norm_rel, c.comparison.tol.norm)
print(r.first_divergence() or "no divergence")
sys.exit(0 if r.passed else 1)
"""


def _cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def _model(lib, cfg="tiny", B=4, T=16):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", MODEL_CHECK, str(lib), cfg, str(B), str(T)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    out = ROOT / "build" / "variants" / f"lib_{request.param}.so"
    build_library(SRC, out, cflags=VARIANTS[request.param], quiet=True)
    return out


def test_variant_passes_every_op_check(variant):
    r = _cli("ops", "--lib", str(variant), "--seeds", "2", "-q")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " 0 failed" in r.stdout


@pytest.mark.parametrize("cfg, B, T", [("tiny", 4, 16), ("small", 3, 7)])
def test_variant_passes_model_checks(variant, cfg, B, T):
    r = _model(variant, cfg, B, T)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


# Deliberate numerical bugs in the C (not in the repository: made here from our source).
MUTATIONS = {
    "ln-eps": ("float eps = 1e-5f;", "float eps = 1e-6f;", "layernorm_forward"),
    "gelu-const": ("float cube = 0.044715f * x * x * x;\n        out[i]",
                   "float cube = 0.04471f * x * x * x;\n        out[i]", "gelu_forward"),
    "residual-overwrite": ("dinp2[i] += dout[i];", "dinp2[i] = dout[i];", "residual_backward"),
    "attention-scale": ("float scale = 1.0 / sqrtf(hs);", "float scale = 1.0 / sqrtf(hs + 1);",
                        "attention_forward"),
    "adamw-bias-correction": ("powf(beta1, t)", "powf(beta1, t + 1)", "gpt2_update"),
    "softmax-mask": ("for (int i = V; i < Vp; i++) {\n                probs_bt[i] = 0.0f;",
                     "for (int i = V + 1; i < Vp; i++) {\n                probs_bt[i] = 0.0f;",
                     "softmax_forward"),
    "matmul-backward-dbias-dropped": ("if (dbias != NULL) { dbias[o] += d; }", "", "matmul_backward"),
}


@pytest.fixture(scope="module")
def mutant_libs(tmp_path_factory):
    src = pristine_source()
    libs = {}
    for name, (old, new, _) in MUTATIONS.items():
        assert src.count(old) == 1, name
        d = tmp_path_factory.mktemp(name)
        (d / "train_gpt2.c").write_text(src.replace(old, new))
        libs[name] = build_library(d / "train_gpt2.c", d / f"lib_{name}.so", quiet=True).library
    return libs


# In gpt2_backward every residual_backward writes into a buffer still zero, so "+= turned
# into =" there changes no number of a training step: only the per-op check (which starts
# from non-zero gradient buffers) can see it.
INVISIBLE_IN_MODEL = {"residual-overwrite"}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutated_c_fails_the_op_checks(mutant_libs, name):
    kernel = MUTATIONS[name][2]
    r = _cli("ops", "--lib", mutant_libs[name], "-q")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    named = kernel if kernel != "gpt2_update" else "adamw"
    assert named in r.stdout, r.stdout[-2000:]


@pytest.mark.parametrize("name", [n for n in MUTATIONS if n not in INVISIBLE_IN_MODEL])
def test_mutated_c_fails_the_model_check_and_is_localised(mutant_libs, name):
    kernel = MUTATIONS[name][2]
    r = _model(mutant_libs[name])
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert kernel in r.stdout.splitlines()[-1], r.stdout[-2000:]


def test_invisible_mutation_really_is_invisible_in_a_step(mutant_libs):
    """Documents why residual-overwrite needs the per-op check."""
    assert _model(mutant_libs["residual-overwrite"]).returncode == 0


def test_mutated_c_fails_the_gate_naming_moved_tensors(mutant_libs):
    r = _cli("gate", "--lib", mutant_libs["ln-eps"], "-q", "--baseline", str(ROOT / "baselines" / "gate.json"))
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    assert "GATE FAIL" in r.stdout and "layernorm_forward" in r.stdout
    assert "llmc-parity gate --update" in r.stdout
