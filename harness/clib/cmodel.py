"""The C's GPT2 model as a Python object, with every buffer as a zero-copy NumPy view.

``CModel.from_checkpoint(path)`` or ``CModel.from_params(config, params)`` builds one;
``forward``, ``zero_grad``, ``backward`` and ``update`` call the C. ``params``, ``grads``,
``acts`` and ``grads_acts`` are dicts of named views with the C's shapes, and
``params_memory``, ``grads_memory``, ``m_memory``, ``v_memory`` the flat buffers.

Memory safety: the C allocations belong to an owner object, and every view keeps that
owner alive. ``close()`` (or leaving a ``with`` block) drops the model's reference;
``gpt2_free`` runs as soon as no view is left, so a view kept past ``close()`` never
points at freed memory.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from math import prod

import numpy as np

from pyref.config import (ACT_NAMES, LLMC_MAIN, PARAM_NAMES, GPT2Config, ParamsError, act_shapes,
                          check_tokens, flat_params, layout, param_shapes)

from pyref.model import ComputesEverything

from .library import INT_MAX, Library, LlmcInputError, _fits_int, as_library, ffi


class _Owner:
    """Holds one GPT2 struct; frees its C allocations when the last reference goes."""

    __slots__ = ("lib", "struct", "__weakref__")

    def __init__(self, lib: Library):
        self.lib = lib
        self.struct = ffi.new("GPT2*")  # zeroed: every pointer NULL

    def __del__(self):
        struct = getattr(self, "struct", None)
        if struct is not None:
            self.lib.lib.gpt2_free(struct)
            self.struct = None


def _view(owner: _Owner, ptr, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array over C memory at ``ptr`` that keeps ``owner`` alive."""
    n = prod(shape)
    if n == 0:
        return np.zeros(shape, np.float32)
    keep = ffi.gc(ffi.cast("float*", ptr), lambda _p, _owner=owner: None)
    return np.frombuffer(ffi.buffer(keep, 4 * n), dtype=np.float32).reshape(shape)


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


class CModel(ComputesEverything):
    """A GPT2 struct of the bound library, driven from Python. What the checks read of it
    (:class:`pyref.model.ComputesEverything`): the C computes every tensor, in float32."""

    def __init__(self, owner: _Owner, config: GPT2Config):
        self._owner: _Owner | None = owner
        self.lib = owner.lib
        self.config = config
        self.c_log: list[str] = []  # what the C printed
        self._views: dict[str, object] = {}
        self._check_params_layout()

    # -- construction -------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, lib: Library | str | None = None) -> "CModel":
        """Build with ``gpt2_build_from_checkpoint`` after checking the file in Python
        (the C exits the process on a bad magic or version, and reads past a short file)."""
        from pyref.formats import read_checkpoint_header  # validates magic, version, sizes

        lib = as_library(lib)
        path = os.fspath(path)
        config = read_checkpoint_header(path)
        _check_alloc(4 * config.num_parameters(), "parameters")
        owner = _Owner(lib)
        with lib.captured_stdout() as log:
            lib.lib.gpt2_build_from_checkpoint(owner.struct, path.encode())
        model = cls(owner, config)
        model.c_log += log
        return model

    @classmethod
    def from_params(cls, config: GPT2Config, params, lib: Library | str | None = None) -> "CModel":
        """Build straight from a flat float32 parameter array (or a dict of named arrays),
        doing what gpt2_build_from_checkpoint does minus the file."""
        lib = as_library(lib)
        config = config.validate()
        n = config.num_parameters()
        try:
            flat = flat_params(config, params)
        except ParamsError as e:
            raise LlmcInputError(str(e)) from None
        if isinstance(params, Mapping):
            flat = flat.astype(np.float32)     # named tensors: any float dtype, as values
        elif flat.dtype != np.float32:
            raise LlmcInputError(f"params: expected float32, got {flat.dtype}")
        _check_alloc(4 * n, "parameters")
        owner = _Owner(lib)
        s = owner.struct
        for field in ("max_seq_len", "vocab_size", "padded_vocab_size", "num_layers",
                      "num_heads", "channels"):
            setattr(s.config, field, getattr(config, field))
        lib.lib.fill_in_parameter_sizes(s.param_sizes, s.config)
        s.num_parameters = sum(s.param_sizes[i] for i in range(len(PARAM_NAMES)))
        s.params_memory = lib.lib.malloc_and_point_parameters(ffi.addressof(s.params), s.param_sizes)
        s.mean_loss = -1.0
        model = cls(owner, config)
        model.params_memory[:] = flat.ravel()
        return model

    def _check_params_layout(self) -> None:
        """The C's param_sizes match our shapes, and its named pointers sit where the
        struct order says (a reordered ParameterTensors in a user's C shows here)."""
        s = self._struct
        if s.params_memory == ffi.NULL:
            raise LlmcInputError("the C built no parameters")
        base = int(ffi.cast("uintptr_t", s.params_memory))
        for i, (name, (offset, shape)) in enumerate(layout(param_shapes(self.config)).items()):
            if s.param_sizes[i] != prod(shape):
                raise LlmcInputError(f"param_sizes[{i}] ({name}) is {s.param_sizes[i]} in the C, "
                                     f"expected {prod(shape)}")
            if int(ffi.cast("uintptr_t", getattr(s.params, name))) != base + 4 * offset:
                raise LlmcInputError(f"params.{name} does not point at offset {offset}: "
                                     "struct order differs from the spec")

    # -- lifecycle ----------------------------------------------------------
    @property
    def _struct(self):
        if self._owner is None:
            raise RuntimeError("this CModel is closed")
        return self._owner.struct

    @property
    def closed(self) -> bool:
        return self._owner is None

    def close(self) -> None:
        """Release the C memory (at once, or when the last view of it goes)."""
        self._views.clear()
        self._owner = None

    def __enter__(self) -> "CModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"B={self.batch_size} T={self.seq_len}"
        return f"<CModel {self.config} {state} lib={self.lib.path}>"

    # -- the training step ----------------------------------------------------
    def forward(self, inputs, targets=None, threads: int | None = None) -> float | None:
        """gpt2_forward; returns the mean loss (None without targets)."""
        s = self._struct
        cfg = self.config
        inputs = check_tokens("inputs", inputs, cfg.vocab_size, LlmcInputError)
        B, T = inputs.shape
        if targets is not None:
            targets = check_tokens("targets", targets, cfg.vocab_size, LlmcInputError, like=inputs)
        if T > cfg.max_seq_len:
            raise LlmcInputError(f"T={T} exceeds max_seq_len={cfg.max_seq_len}")
        if s.acts_memory != ffi.NULL and (B, T) != (s.batch_size, s.seq_len):
            raise LlmcInputError(f"this model was first run with B={s.batch_size} T={s.seq_len}; "
                                 f"the C cannot change to B={B} T={T} (make a new model)")
        if s.acts_memory == ffi.NULL:
            _fits_kernels(cfg, B, T)
            n_acts = sum(prod(v) for v in act_shapes(cfg, B, T).values())
            _check_alloc(8 * n_acts + 16 * cfg.num_parameters(), "activations and gradients")
        with self.lib.num_threads(threads), self.lib.captured_stdout() as log:
            self.lib.lib.gpt2_forward(s, ffi.from_buffer("int[]", inputs),
                                      ffi.NULL if targets is None else ffi.from_buffer("int[]", targets),
                                      B, T)
        if log and log[0]:
            self.c_log += log
        return None if targets is None else float(s.mean_loss)

    def zero_grad(self) -> None:
        self.lib.lib.gpt2_zero_grad(self._struct)

    def backward(self, threads: int | None = None) -> None:
        s = self._struct
        if s.acts_memory == ffi.NULL or s.mean_loss == -1.0:
            raise LlmcInputError("backward() needs a forward() with targets first")
        loss = s.mean_loss
        if not np.isfinite(loss):
            # gpt2_backward reads mean_loss only for its guard `mean_loss == -1.0f`, and a
            # finite-math build (-Ofast) may compile that so a NaN passes as -1 and exit()s.
            # The gradients do not depend on the loss: run the guard on a finite stand-in
            # and put the loss back, so the NaNs show in the gradients, not as a dead process.
            s.mean_loss = 0.0
        try:
            with self.lib.num_threads(threads):
                self.lib.lib.gpt2_backward(s)
        finally:
            s.mean_loss = loss

    def update(self, learning_rate: float = LLMC_MAIN.learning_rate, beta1: float = LLMC_MAIN.beta1,
               beta2: float = LLMC_MAIN.beta2, eps: float = LLMC_MAIN.eps,
               weight_decay: float = LLMC_MAIN.weight_decay, t: int = 1,
               threads: int | None = None) -> None:
        """gpt2_update (AdamW); ``t`` is the step number, counting from 1; the defaults
        are train_gpt2.c's main()'s (:data:`pyref.config.LLMC_MAIN`)."""
        s = self._struct
        if s.grads_memory == ffi.NULL:
            raise LlmcInputError("update() needs gradients: call backward() first")
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 1 <= t <= INT_MAX:
            raise LlmcInputError(f"t is the AdamW step and counts from 1, got {t!r}")
        for k, v in dict(learning_rate=learning_rate, beta1=beta1, beta2=beta2, eps=eps,
                         weight_decay=weight_decay).items():
            if not np.isfinite(v):
                raise LlmcInputError(f"{k} must be finite, got {v}")
        with self.lib.num_threads(threads):
            self.lib.lib.gpt2_update(s, learning_rate, beta1, beta2, eps, weight_decay, int(t))

    # -- state ----------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self._struct.batch_size

    @property
    def seq_len(self) -> int:
        return self._struct.seq_len

    @property
    def mean_loss(self) -> float:
        return float(self._struct.mean_loss)

    @property
    def num_parameters(self) -> int:
        return self._struct.num_parameters

    def _flat(self, field: str, n: int, what: str) -> np.ndarray:
        v = self._views.get(field)
        if v is None:
            ptr = getattr(self._struct, field)
            if ptr == ffi.NULL:
                raise RuntimeError(f"no {what} yet")
            v = self._views[field] = _view(self._owner, ptr, (n,))
        return v

    def _named(self, key: str, group: str, names, shapes, what: str) -> dict[str, np.ndarray]:
        d = self._views.get(key)
        if d is None:
            s = self._struct
            if getattr(s, group + "_memory") == ffi.NULL:
                raise RuntimeError(f"no {what} yet")
            tensors = getattr(s, group)
            d = self._views[key] = {n: _view(self._owner, getattr(tensors, n), shapes[n]) for n in names}
        return d

    @property
    def params_memory(self) -> np.ndarray:
        return self._flat("params_memory", self.num_parameters, "parameters")

    grads_memory = property(lambda self: self._flat("grads_memory", self.num_parameters,
                                                    "gradients: call backward() first"))
    m_memory = property(lambda self: self._flat("m_memory", self.num_parameters, "AdamW m: call update() first"))
    v_memory = property(lambda self: self._flat("v_memory", self.num_parameters, "AdamW v: call update() first"))
    acts_memory = property(lambda self: self._flat("acts_memory", self._struct.num_activations,
                                                   "activations: call forward() first"))

    def address(self, field: str) -> int:
        """The C address a pointer field of the struct holds (``params_memory``,
        ``acts.ln1``, ...; 0 while unallocated): where a view of it starts."""
        obj = self._struct
        for part in field.split("."):
            obj = getattr(obj, part)
        return int(ffi.cast("uintptr_t", obj))

    def poison_activations(self) -> None:
        """Fill the activations with NaN before a forward: the C must overwrite every one
        (but preatt's upper triangle), so any slot it skips shows as a non-finite mismatch
        instead of passing on a value left from before."""
        if self._struct.acts_memory != ffi.NULL:
            self.acts_memory.fill(np.nan)

    @property
    def params(self) -> dict[str, np.ndarray]:
        return self._named("params", "params", PARAM_NAMES, param_shapes(self.config), "parameters")

    @property
    def grads(self) -> dict[str, np.ndarray]:
        return self._named("grads", "grads", PARAM_NAMES, param_shapes(self.config),
                           "gradients: call backward() first")

    @property
    def acts(self) -> dict[str, np.ndarray]:
        return self._named("acts", "acts", ACT_NAMES, self._act_shapes(), "activations: call forward() first")

    @property
    def grads_acts(self) -> dict[str, np.ndarray]:
        return self._named("grads_acts", "grads_acts", ACT_NAMES, self._act_shapes(),
                           "activation gradients: call backward() first")

    def _act_shapes(self):
        s = self._struct
        if s.acts_memory == ffi.NULL:
            raise RuntimeError("no activations yet: call forward() first")
        return act_shapes(self.config, s.batch_size, s.seq_len)

    def _batch(self, field: str) -> np.ndarray:
        s = self._struct
        ptr = getattr(s, field)
        if ptr == ffi.NULL:
            raise RuntimeError(f"no {field} yet: call forward() first")
        return np.frombuffer(ffi.buffer(ptr, 4 * s.batch_size * s.seq_len),
                             dtype=np.int32).reshape(s.batch_size, s.seq_len).copy()

    @property
    def inputs(self) -> np.ndarray:
        """A copy of the token ids the C cached on the last forward."""
        return self._batch("inputs")

    @property
    def targets(self) -> np.ndarray:
        """A copy of the targets the C cached on the last forward with targets."""
        return self._batch("targets")


def _fits_kernels(cfg: GPT2Config, B: int, T: int) -> None:
    """The kernels index with int: every per-layer tensor must stay below INT_MAX elements."""
    C, NH, Vp = cfg.channels, cfg.num_heads, cfg.padded_vocab_size
    _fits_int(**{"B*T*4C": B * T * 4 * C, "B*NH*T*T": B * NH * T * T, "B*T*Vp": B * T * Vp,
                 "Vp*C": Vp * C, "4C*C": 4 * C * C})


def _check_alloc(nbytes: int, what: str) -> None:
    """mallocCheck exits the process when malloc fails; refuse sizes beyond physical memory."""
    if nbytes > _physical_memory():
        raise LlmcInputError(f"{what} would need {nbytes / 2**30:.1f} GiB, more than this "
                             f"machine's {_physical_memory() / 2**30:.1f} GiB")
