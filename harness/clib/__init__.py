"""The C side: a ``train_gpt2.c`` built, declared, loaded and driven from Python.

* :mod:`.build` -- the one compile command (``make lib``, the variants, ``--src``, the
  per-user build cache);
* :mod:`.cdefs` -- the cffi declaration of the C's ABI (structs and functions);
* :mod:`.fpenv` -- the C's floating-point mode kept apart from Python's (``-Ofast``);
* :mod:`.library` -- :class:`~.library.Library`: a loaded library whose kernel calls
  check their arguments first (the C ``exit()``s where Python raises);
* :mod:`.cmodel` -- :class:`~.cmodel.CModel`: the C's ``GPT2`` with zero-copy views;
* :mod:`.kernels` -- :class:`~.kernels.CKernels`: the C's kernels under the kernel
  protocol (docs/kernels.md), one more implementation beside NumPy, torch and a port.

Nothing here knows about checks or tolerances. Another compiled helper goes beside the
reference library: its C source in ``llmc/``, built by :mod:`.build`, declared and bound
in a module of its own here.

Importing this package imports nothing: ``python -m harness.clib.build`` runs before any
virtual environment exists (standard library only).
"""
