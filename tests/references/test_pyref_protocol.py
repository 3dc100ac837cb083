"""The kernel-protocol adapter: names, missing kernels, output checks, torch zero-copy."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyref import numpy_kernels as nk
from pyref import torch_kernels as tk
from pyref.protocol import (KERNEL_NAMES, SIGNATURES, KernelNotProvided, KernelSet,
                            as_namespace, missing, resolve)

DOC = Path(__file__).resolve().parents[2] / "docs" / "kernels.md"


def test_names_and_signatures_match_the_docs():
    rows = re.findall(r"^\| `(\w+)\(([^)]*)\)` \|", DOC.read_text(), flags=re.M)
    documented = {name: tuple(a.strip() for a in args.split(",")) for name, args in rows}
    assert documented == SIGNATURES
    assert set(documented) == set(KERNEL_NAMES)


@pytest.mark.parametrize("module", [nk, tk], ids=["numpy", "torch"])
def test_builtin_modules_are_complete(module):
    assert missing(module) == []
    ks = KernelSet.from_module(module)
    assert ks.missing == [] and ks.backend == module.BACKEND


def test_missing_and_alias():
    ns = as_namespace({"gelu_forward": nk.gelu_forward, "gpt2_update": nk.adamw})
    assert "adamw" not in missing(ns) and "gelu_forward" not in missing(ns)
    assert len(missing(ns)) == len(KERNEL_NAMES) - 2
    assert missing({"gelu_forward": nk.gelu_forward})[0] == "encoder_forward"   # dicts too
    ks = KernelSet.from_module(ns)
    with pytest.raises(KernelNotProvided, match="encoder_forward"):
        ks.encoder_forward
    assert ks.gpt2_update is ks.adamw
    assert KernelSet.from_module(ns, fallback=nk).source("encoder_forward") == "pyref.numpy_kernels"


def test_wrong_outputs_are_named():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    w, b = np.ones(8, np.float32), np.zeros(8, np.float32)
    ks = KernelSet.from_module(as_namespace({
        "layernorm_forward": lambda inp, weight, bias: (inp, inp.mean(-1)),       # 2 of 3
        "gelu_forward": lambda inp: inp[..., :-1],                                # bad shape
        "residual_forward": lambda a, b: None,                                    # nothing
        "matmul_forward": lambda inp, weight, bias: [[1.0]],                      # a list
    }), name="port")
    with pytest.raises(TypeError, match=r"port\.layernorm_forward returned 2 output\(s\), expected 3"):
        ks.layernorm_forward(x, w, b)
    with pytest.raises(ValueError, match=r"port\.gelu_forward output has shape \(2, 3, 7\), "
                                         r"expected \(2, 3, 8\)"):
        ks.gelu_forward(x)
    with pytest.raises(TypeError, match="residual_forward returned None"):
        ks.residual_forward(x, x)
    with pytest.raises(ValueError, match="matmul_forward output has shape"):
        ks.matmul_forward(x, np.ones((4, 8), np.float32), None)


def test_torch_backend_is_zero_copy():
    """A torch module's in-place add_ lands in the NumPy buffers, views of a flat one too."""
    ks = KernelSet.from_module(tk)
    flat = np.zeros(100, np.float32)
    d1, d2 = flat[10:34].reshape(2, 3, 4), flat[50:74].reshape(2, 3, 4)
    dout = np.ones((2, 3, 4), np.float32)
    ks.residual_backward(d1, d2, dout)
    ks.residual_backward(d1, d2, dout)
    assert np.all(d1 == 2) and np.all(d2 == 2) and flat.sum() == 96
    out = ks.gelu_forward(dout)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    ro = dout.copy()
    ro.flags.writeable = False                      # read-only inputs are fine (copied)
    assert np.array_equal(ks.gelu_forward(ro), out)
    with pytest.raises(ValueError, match="in-place argument dinp1"):
        ks.residual_backward(ro, d2, dout)          # a read-only gradient buffer is not


def test_torch_tensors_reach_a_torch_port():
    seen = {}

    def gelu_forward(inp):
        seen["type"] = type(inp)
        return torch.zeros_like(inp)

    ks = KernelSet.from_module(as_namespace({"gelu_forward": gelu_forward}, backend="torch"))
    ks.gelu_forward(np.ones(3, np.float64))
    assert seen["type"] is torch.Tensor


def test_import_pyref_does_not_import_torch():
    code = "import pyref, sys; assert 'torch' not in sys.modules, 'torch imported'"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_resolve_ignores_non_callables():
    assert resolve({"gelu_forward": 3}) == {}
