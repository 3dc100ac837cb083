"""What the families share: the oracle run with some arguments or module constants changed, and
how constants are printed."""
from __future__ import annotations

import importlib.util
import threading

import numpy as np

from pyref import numpy_kernels
from pyref.protocol import FORWARD_OUTPUTS, run_kernel


def _oracle_copy():
    """A private instance of pyref.numpy_kernels whose constants (LN_EPS, GELU_COEF) the
    variants may set without touching the shared module."""
    module_spec = importlib.util.spec_from_file_location("_llmc_diagnose_kernels", numpy_kernels.__file__)
    mod = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(mod)
    return mod


_PRIVATE = None
_PRIVATE_LOCK = threading.Lock()


def _with_constants(kernel: str, args: dict, **constants) -> dict:
    """The oracle's ``kernel`` on ``args`` with module constants changed (float64)."""
    global _PRIVATE
    with _PRIVATE_LOCK:
        if _PRIVATE is None:
            _PRIVATE = _oracle_copy()
        return _run_with(_PRIVATE, kernel, args, constants)


def _run_with(mod, kernel: str, args: dict, constants: dict) -> dict:
    saved = {k: getattr(mod, k) for k in constants}
    try:
        for k, x in constants.items():
            setattr(mod, k, x)
        return run_kernel(mod, kernel, args, np.float64)
    finally:
        for k, x in saved.items():
            setattr(mod, k, x)


def _oracle(kernel: str, args: dict, **changed) -> dict:
    """The oracle's ``kernel`` with some arguments replaced."""
    return run_kernel(numpy_kernels, kernel, dict(args, **changed), np.float64)


def _forward(kernel: str, outputs: tuple) -> dict:
    return dict(zip(FORWARD_OUTPUTS[kernel], outputs))
