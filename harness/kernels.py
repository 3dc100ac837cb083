"""Load the implementation under test: a user's Python port of the C's kernels.

``load_kernels("path/to/my_port.py")`` or ``load_kernels("mypkg.kernels[:attr]")`` returns
a :class:`pyref.protocol.KernelSet` over whatever protocol kernels (docs/kernels.md) the
module defines. Kernels it does not define are *not checked* (``.missing``); for the
model-level run they are filled in from the NumPy reference (``fallback=True``), and the
report says so.

Built-in names: ``numpy`` (pyref's NumPy kernels, float32), ``torch`` (pyref's torch
kernels, float32).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from pyref.protocol import KERNEL_NAMES, KernelSet

from .errors import InputError

BUILTIN = {"numpy": "pyref.numpy_kernels", "torch": "pyref.torch_kernels"}


class KernelLoadError(InputError, ValueError):
    """The implementation could not be loaded; the message says what and where."""


def _import_file(path: Path):
    name = f"llmc_parity_user_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise KernelLoadError(f"{path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: dataclasses and pickling look it up
    sys.path.insert(0, str(path.parent))  # the port may import its own helpers
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise KernelLoadError(f"{path}: importing it raised {type(e).__name__}: {e}") from e
    finally:
        if sys.path and sys.path[0] == str(path.parent):
            sys.path.pop(0)
    return module


def load_kernels(spec: str, *, fallback: bool = False, name: str | None = None) -> KernelSet:
    """The KernelSet of ``spec``: ``numpy``/``torch``, a ``.py`` file, or ``module[:attr]``."""
    if not isinstance(spec, str) or not spec:
        raise KernelLoadError(f"expected a file path or module[:attr], got {spec!r}")
    target = BUILTIN.get(spec, spec)
    attr = None
    if target.endswith(".py") or os.sep in target or os.path.exists(target):
        path = Path(target)
        if not path.is_file():
            raise KernelLoadError(f"{path}: no such file")
        obj = _import_file(path.resolve())
        label = name or path.stem
    else:
        module_name, _, attr = target.partition(":")
        try:
            obj = importlib.import_module(module_name)
        except ImportError as e:
            raise KernelLoadError(f"cannot import {module_name!r}: {e}") from e
        except Exception as e:
            raise KernelLoadError(f"importing {module_name!r} raised {type(e).__name__}: {e}") from e
        label = name or (spec if spec in BUILTIN else target)
        if attr:
            for part in attr.split("."):
                try:
                    obj = getattr(obj, part)
                except AttributeError:
                    raise KernelLoadError(f"{module_name} has no attribute {attr!r}") from None
    try:
        ks = KernelSet.from_module(obj, name=label)
    except Exception as e:
        raise KernelLoadError(f"{spec}: {e}") from e
    if not ks.provided:
        raise KernelLoadError(f"{spec} defines none of the protocol kernels "
                              f"({', '.join(KERNEL_NAMES)}); see docs/kernels.md")
    if fallback and ks.missing:
        from pyref import numpy_kernels
        ks = KernelSet(ks.raw, backend=ks.backend, name=ks.name,
                       fallback=KernelSet.from_module(numpy_kernels, name="pyref.numpy (fallback)"))
    return ks
