"""User code: the implementations under test that are not the C.

* :mod:`.loader` -- the one loader of user code: kernel ports (:func:`~.loader.load_kernels`),
  torch models with their optimizers and parameter maps (:func:`~.loader.load_model`), any
  object named ``file.py:name`` or ``module:name`` (:func:`~.loader.load_object`);
* a torch model (``--model``), from the C's state to its checked step and back:
  :mod:`.torchmodel` (what to build: :class:`~.torchmodel.TorchModel`, the optimizer),
  :mod:`.families` (what the recognised families call things), :mod:`.mapping` (which C
  tensor each parameter holds), :mod:`.capture` (which activations its modules show),
  :mod:`.hygiene` (what silently differs from the C), :mod:`.torchstate`
  (:class:`~.torchstate.ModelState`: one step, read back in the C's layout).

A kernel port needs no more than its loader: :class:`pyref.model.GPT2` runs it.
"""
from __future__ import annotations

from ..errors import ModelError
from .loader import KernelLoadError, load_kernels, load_model, load_object
from .mapping import Entry, Slot, map_parameters, parse_slot
from .torchstate import ModelState
from .torchmodel import Hyper, TorchModel, build_model, build_optimizer

__all__ = ["KernelLoadError", "ModelError", "load_kernels", "load_model", "load_object", "Entry", "Slot",
           "map_parameters", "parse_slot", "ModelState", "Hyper", "TorchModel", "build_model", "build_optimizer"]
