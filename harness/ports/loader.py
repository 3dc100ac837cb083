"""The one loader of user code: kernel ports, torch models, their optimizers and
parameter maps, named on the command line, in pytest options or in Python.

* :func:`load_object` -- the object ``path/to/file.py:name`` or ``package.module:name``
  names (a file is imported under a private module name, its folder on ``sys.path`` while
  it runs, so that it may import its own helpers);
* :func:`load_kernels` -- a :class:`pyref.protocol.KernelSet` over whatever protocol
  kernels (docs/kernels.md) a port defines: ``numpy`` / ``torch`` (pyref's kernels), a
  ``.py`` file, or ``module[:attr]``. Kernels it does not define are *not checked*
  (``.missing``); for the model-level run they are filled in from the NumPy reference
  (``fallback=True``), and the report says so;
* :func:`load_model` -- a :class:`~.torchmodel.TorchModel` (``file.py:name`` of an
  ``nn.Module`` class or factory, its optimizer factory or ``configure_optimizers``, its
  parameter map).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from pyref.protocol import KERNEL_NAMES, KernelSet

from ..errors import InputError, ModelError
from .torchmodel import CONFIGURE_OPTIMIZERS, TorchModel

BUILTIN = {"numpy": "pyref.numpy_kernels", "torch": "pyref.torch_kernels"}
# the module name a user's file is imported under: this prefix and a digest of its path
USER_MODULE_PREFIX = "llmc_parity_user_"


class KernelLoadError(InputError, ValueError):
    """The implementation could not be loaded; the message says what and where."""


def import_file(path: Path, error: type[InputError] = KernelLoadError):
    """The module of the Python file at ``path`` (imported once per path)."""
    name = f"{USER_MODULE_PREFIX}{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise error(f"{path}: not an importable Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # as an import would: dataclasses and pickling look it up
    sys.path.insert(0, str(path.parent))  # the port may import its own helpers
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise error(f"{path}: importing it raised {type(e).__name__}: {e}") from e
    finally:
        if sys.path and sys.path[0] == str(path.parent):
            sys.path.pop(0)
    return module


def _import_module(name: str, error: type[InputError]):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise error(f"cannot import {name!r}: {e}") from e
    except Exception as e:
        raise error(f"importing {name!r} raised {type(e).__name__}: {e}") from e


def _attribute(obj, where: str, attr: str, error: type[InputError]):
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _is_file(where: str) -> bool:
    return where.endswith(".py") or os.sep in where or "/" in where


def target_file(target: str) -> str | None:
    """The file a target names (``file.py`` of ``file.py:name``, or a ``.py`` path given
    alone, as ``--impl`` takes it); None for a module, a built-in name (``numpy``) or a
    word such as ``configure_optimizers``."""
    if not isinstance(target, str) or target in BUILTIN:
        return None
    where = target.rpartition(":")[0] if ":" in target else target
    return where if where and _is_file(where) else None


def model_label(target: str) -> str:
    """The name a model is reported under: the name the user gave it in ``target``
    (``file.py:GPT`` -> ``GPT``, ``file.py:make_gpt`` -> ``make_gpt``, ``pkg.mod:Outer.GPT``
    -> ``Outer.GPT``), never a generic word for what kind of object it is."""
    name = target.rpartition(":")[2] if isinstance(target, str) else ""
    if not name:
        raise ModelError(f"expected file.py:name or module:name, got {target!r}")
    return name


def load_object(target: str, error: type[InputError] = ModelError):
    """The object ``target`` names: ``path/to/file.py:name`` or ``package.module:name``
    (``name`` may be dotted); ``error`` says what is wrong with it."""
    if not isinstance(target, str) or ":" not in target:
        raise error(f"expected file.py:name or module:name, got {target!r}")
    where, _, attr = target.rpartition(":")
    if not where or not attr:
        raise error(f"expected file.py:name or module:name, got {target!r}")
    if _is_file(where):
        path = Path(where)
        if not path.is_file():
            raise error(f"{where}: no such file")
        obj = import_file(path.resolve(), error)
    else:
        obj = _import_module(where, error)
    return _attribute(obj, where, attr, error)


def load_kernels(target: str, *, fallback: bool = False, name: str | None = None) -> KernelSet:
    """The KernelSet of ``target``: ``numpy``/``torch``, a ``.py`` file, or ``module[:attr]``."""
    if not isinstance(target, str) or not target:
        raise KernelLoadError(f"expected a file path or module[:attr], got {target!r}")
    where = BUILTIN.get(target, target)
    if _is_file(where) or os.path.exists(where):
        path = Path(where)
        if not path.is_file():
            raise KernelLoadError(f"{path}: no such file")
        obj = import_file(path.resolve())
        label = name or path.stem
    else:
        module_name, _, attr = where.partition(":")
        obj = _import_module(module_name, KernelLoadError)
        if attr:
            obj = _attribute(obj, module_name, attr, KernelLoadError)
        label = name or (target if target in BUILTIN else where)
    try:
        ks = KernelSet.from_module(obj, name=label)
    except Exception as e:
        raise KernelLoadError(f"{target}: {e}") from e
    if not ks.provided:
        raise KernelLoadError(f"{target} defines none of the protocol kernels "
                              f"({', '.join(KERNEL_NAMES)}); see docs/kernels.md")
    if fallback and ks.missing:
        from pyref import numpy_kernels
        ks = KernelSet(ks.raw, backend=ks.backend, name=ks.name,
                       fallback=KernelSet.from_module(numpy_kernels, name="pyref.numpy (fallback)"))
    return ks


def load_model(target: str, *, optimizer: str | None = None, mapping: str | None = None,
               name: str | None = None) -> TorchModel:
    """The torch model ``target`` (``file.py:name`` or ``module:name`` of an ``nn.Module``
    class or a factory taking the config), with its optimizer (``file.py:name`` of a
    factory ``(model, hyper)``, ``"configure_optimizers"`` for the model's own method, or
    None: ``torch.optim.AdamW`` with the run's settings) and its parameter map (None: the
    parameters are recognised by name). ``name`` defaults to the model's name in ``target``."""
    factory = load_object(target)
    if optimizer and optimizer != CONFIGURE_OPTIMIZERS:
        optimizer = load_object(optimizer)
    return TorchModel(factory, mapping=load_object(mapping) if mapping else None, optimizer=optimizer or None,
                      name=name or model_label(target))
