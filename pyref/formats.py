"""llm.c's file formats: model checkpoint, debug state, token shard (read and write).

Little-endian throughout; every file starts with a header of 256 int32.

- checkpoint: [0]=20240326, [1]=3 (float32, padded vocab), [2]=maxT, [3]=V, [4]=L, [5]=NH,
  [6]=C, [7]=Vp; then every parameter as float32, in ``PARAM_NAMES`` order (wte: Vp rows).
  Version 5 (llm.c's ``*_bf16.bin``, written beside the float32 one by train_gpt2.py) is
  the same header and layout with every parameter as bfloat16 (2 bytes, the top half of
  a float32). :func:`read_checkpoint` reads both and widens bf16 to float32, exactly;
  :class:`Checkpoint` also keeps the parameters as stored. train_gpt2.c reads version 3
  only, so :func:`read_checkpoint_header`, the check before the C reads a file, refuses 5.
- debug state: [0]=20240327, [1]=2, [2]=B, [3]=T; then inputs int32[B*T], targets
  int32[B*T], logits float32[B*T*V] (V wide, not padded), the mean loss float32[1], and
  the gradients of every parameter as float32 in parameter order (wte's padded to Vp rows).
- token shard: [0]=20240520, [1]=1, [2]=number of tokens; then that many uint16.

Readers raise ``FormatError`` (a ``ValueError``) naming the file and what is wrong.
Writers never clobber an existing file unless ``overwrite=True``, and write atomically
(a temporary file in the same directory, then a rename).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from .config import GPT2Config, flat_params, param_shapes, point

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4

CHECKPOINT_MAGIC, CHECKPOINT_VERSION, CHECKPOINT_VERSION_BF16 = 20240326, 3, 5
# a checkpoint's stored parameter type -> (its version, bytes per parameter)
CHECKPOINT_DTYPES = {"float32": (CHECKPOINT_VERSION, 4), "bf16": (CHECKPOINT_VERSION_BF16, 2)}
DEBUG_STATE_MAGIC, DEBUG_STATE_VERSION = 20240327, 2
TOKENS_MAGIC, TOKENS_VERSION = 20240520, 1


class FormatError(ValueError):
    """A file that is not a valid llm.c file of the expected kind."""

    def __init__(self, path, problem):
        self.path, self.problem = os.fspath(path), problem
        super().__init__(f"{self.path}: {problem}")


# ----------------------------------------------------------------------------- low level

def _read_header(path, kind, magic, versions):
    """Read the header; check it is complete, its magic and version. -> (header, file size)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(HEADER_BYTES)
    except IsADirectoryError:
        raise FormatError(path, f"is a directory, not a {kind} file") from None
    if len(raw) < HEADER_BYTES:
        raise FormatError(path, f"truncated header: {kind} file holds {len(raw)} bytes, "
                                f"the header alone is {HEADER_BYTES}")
    header = np.frombuffer(raw, dtype="<i4").astype(np.int64)
    if header[0] != magic:
        raise FormatError(path, f"wrong magic number: found {header[0]}, expected {magic} "
                                f"(not a {kind} file)")
    if header[1] not in versions:
        raise FormatError(path, f"unsupported {kind} version {header[1]} "
                                f"(supported: {', '.join(map(str, versions))})")
    return header, size


def _check_size(path, kind, size, expected, note=""):
    if size != expected:
        raise FormatError(path, f"{kind} file holds {size} bytes, header implies {expected}{note}")


class _Body:
    """Sequential little-endian reads after the header."""

    def __init__(self, path):
        self.path, self.off = path, HEADER_BYTES

    def take(self, dtype, count, native):
        a = np.fromfile(self.path, dtype=dtype, count=count, offset=self.off)
        if a.size != count:   # the file changed under us
            raise FormatError(self.path, "truncated while reading")
        self.off += a.nbytes
        return a.astype(native, copy=False)


def _header(*values):
    h = np.zeros(HEADER_INTS, dtype="<i4")
    for i, v in enumerate(values):
        if not -2**31 <= int(v) < 2**31:
            raise ValueError(f"header value {v} does not fit in int32")
        h[i] = int(v)
    return h.tobytes()


def refuse_existing(path, overwrite: bool = False) -> None:
    """FileExistsError when ``path`` exists and may not be replaced: what :func:`write_atomic`
    checks first, and a writer that takes long to make its bytes checks before it starts."""
    if os.path.lexists(os.fspath(path)) and not overwrite:
        raise FileExistsError(f"{os.fspath(path)} exists; pass overwrite=True to replace it")


def write_atomic(path, chunks, overwrite=False):
    """Write byte chunks to ``path`` via a temporary file in the same folder, so no reader
    ever sees half a file. Without ``overwrite`` an existing file is never replaced
    (FileExistsError), also when it appears while we write (the temporary file is
    hard-linked into place). Every file the project writes goes through here."""
    path = os.fspath(path)
    refuse_existing(path, overwrite)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory")
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=d)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:                   # atomic no-clobber: link fails if path appeared meanwhile
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
            except OSError:        # filesystem without hard links
                if os.path.lexists(path):
                    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
                os.replace(tmp, path)
                return
            os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _f32(x, what):
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{what} must be a float array, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype="<f4")


def _flat_params(config, params, what):
    return _f32(flat_params(config, params, what), what)


# ----------------------------------------------------------------------------- bfloat16

def bf16_to_float32(bits) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32. Exact: a bf16 is the top 16 bits of a
    float32 (sign, the same 8-bit exponent, 7 of the 23 mantissa bits), so widening puts
    the pattern in the high half and zeros in the low half; NaN, Inf, -0 and subnormals
    come through as themselves."""
    b = np.asarray(bits)
    if b.dtype != np.uint16:
        raise ValueError(f"bf16 bits must be uint16, got dtype {b.dtype}")
    return (b.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest, ties to even, as
    torch's ``.to(torch.bfloat16)`` (what llm.c's train_gpt2.py writes version 5 with):
    add 0x7FFF plus the lowest kept bit, keep the top half. A finite value past bf16's
    largest rounds to Inf. A NaN stays a NaN of its sign, made quiet (torch's own NaN
    pattern differs between its scalar and vector paths: 0x7FC0, 0xFFFF). Other float
    input is made float32 first."""
    u = _f32(x, "float32_to_bf16's input").astype(np.float32, copy=False).view(np.uint32)
    # wraps around only for u >= 0xFFFF8000, all NaNs, which are replaced below
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (u >> 16).astype(np.uint16) | np.uint16(0x0040), rounded)


# ----------------------------------------------------------------------------- checkpoint

@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as read: ``params`` is what every implementation gets (float32; a bf16
    file's values widened exactly), ``stored`` the parameters as the file holds them
    (the same float32 array for version 3; uint16 bf16 bit patterns for version 5), so a
    port that computes in bf16 may take them as they are (:meth:`stored_torch`)."""

    config: GPT2Config
    params: np.ndarray     # (num_parameters,) float32
    dtype: str             # "float32" (version 3) or "bf16" (version 5): what the file holds
    stored: np.ndarray     # (num_parameters,) float32 or uint16 (bf16 bits)

    @property
    def version(self) -> int:
        return CHECKPOINT_DTYPES[self.dtype][0]

    @classmethod
    def read(cls, path) -> "Checkpoint":
        """Read a version-3 or version-5 checkpoint (header, size and body checked)."""
        config, dtype = _checkpoint_header(path, tuple(CHECKPOINT_DTYPES))
        n, body = config.num_parameters(), _Body(path)
        if dtype == "bf16":
            stored = body.take("<u2", n, np.uint16)
            return cls(config, bf16_to_float32(stored), dtype, stored)
        params = body.take("<f4", n, np.float32)
        return cls(config, params, dtype, params)

    def stored_torch(self):
        """The stored parameters as a flat torch tensor of the stored type (torch.float32,
        or torch.bfloat16 with the file's bits). Imports torch, which pyref does not need."""
        import torch
        if self.dtype == "float32":
            return torch.from_numpy(self.stored)
        return torch.from_numpy(self.stored.view(np.int16)).view(torch.bfloat16)


def read_checkpoint(path) -> tuple[GPT2Config, np.ndarray]:
    """``gpt2_build_from_checkpoint``'s reading: -> (config, flat float32 params). A bf16
    (version 5) file's parameters come widened, exactly; :class:`Checkpoint` says which."""
    ckpt = Checkpoint.read(path)
    return ckpt.config, ckpt.params


def read_checkpoint_header(path) -> GPT2Config:
    """Check a checkpoint's header (magic, version, config) and its size without reading
    the parameters; -> the config. What train_gpt2.c would exit() on, or read past, raises:
    this is the check before the C reads a file itself, so version 5 (bf16) is refused."""
    return _checkpoint_header(path, ("float32",))[0]


def checkpoint_dtype(path) -> str:
    """What a checkpoint's parameters are stored as, "float32" or "bf16", from its header
    (checked as :func:`read_checkpoint` checks it)."""
    return _checkpoint_header(path, tuple(CHECKPOINT_DTYPES))[1]


def checkpoint_note(path) -> str:
    """A line for a run's header where the checkpoint is not float32: that its values were
    widened exactly for the C (which reads float32 only) and for every reference. ""
    for a float32 checkpoint."""
    if checkpoint_dtype(path) == "float32":
        return ""
    return (f"checkpoint {os.fspath(path)}: bf16 parameters (version 5), widened exactly to "
            "float32 (bf16 is a float32's top half) for the C, which reads float32 only, "
            "and for every reference")


def _checkpoint_header(path, dtypes) -> tuple[GPT2Config, str]:
    """The header checks of a checkpoint whose parameters may be stored as ``dtypes``;
    -> (config, dtype). The size is checked against the dtype's bytes per parameter."""
    header, size = _read_header(path, "checkpoint", CHECKPOINT_MAGIC,
                                (CHECKPOINT_VERSION, CHECKPOINT_VERSION_BF16))
    dtype = next(d for d, (v, _) in CHECKPOINT_DTYPES.items() if v == header[1])
    if dtype not in dtypes:
        raise FormatError(path, "checkpoint version 5 holds bf16 parameters; train_gpt2.c "
                                "reads version 3 (float32) only: give the C the float32 "
                                "checkpoint llm.c writes beside the _bf16 one (or read_checkpoint, "
                                "which widens bf16 exactly, and CModel.from_params)")
    maxT, V, L, NH, C, Vp = (int(x) for x in header[2:8])
    config = GPT2Config(max_seq_len=maxT, vocab_size=V, padded_vocab_size=Vp,
                        num_layers=L, num_heads=NH, channels=C)
    try:
        config.validate()
    except ValueError as e:
        raise FormatError(path, f"invalid config in header: {e}") from None
    itemsize = CHECKPOINT_DTYPES[dtype][1]
    note = f" (version 5: bf16 parameters, {itemsize} bytes each)" if dtype == "bf16" else ""
    _check_size(path, "checkpoint", size, HEADER_BYTES + itemsize * config.num_parameters(), note)
    return config, dtype


def write_checkpoint(path, config: GPT2Config, params, overwrite=False, dtype="float32"):
    """Write a checkpoint; params flat (num_parameters) or a dict. ``dtype="float32"``:
    version 3; ``"bf16"``: version 5, each value rounded to nearest even (as llm.c's
    train_gpt2.py writes its ``_bf16.bin``)."""
    if dtype not in CHECKPOINT_DTYPES:
        raise ValueError(f"checkpoint dtype must be one of {', '.join(CHECKPOINT_DTYPES)}, got {dtype!r}")
    config.validate()
    c = config
    p = _flat_params(config, params, "params")
    body = float32_to_bf16(p).astype("<u2", copy=False) if dtype == "bf16" else p
    head = _header(CHECKPOINT_MAGIC, CHECKPOINT_DTYPES[dtype][0], c.max_seq_len, c.vocab_size,
                   c.num_layers, c.num_heads, c.channels, c.padded_vocab_size)
    write_atomic(path, [head, body.tobytes()], overwrite)


# ----------------------------------------------------------------------------- debug state

@dataclass
class DebugState:
    """What PyTorch computed for one step (llm.c's ``*_debug_state.bin``)."""

    config: GPT2Config
    B: int
    T: int
    inputs: np.ndarray     # (B, T) int32
    targets: np.ndarray    # (B, T) int32
    logits: np.ndarray     # (B, T, V) float32, not padded
    loss: np.float32
    grads: np.ndarray      # (num_parameters,) float32, wte's padded to Vp rows

    def grads_by_name(self) -> dict[str, np.ndarray]:
        """Named views of ``grads`` with the parameter shapes."""
        return point(self.grads, param_shapes(self.config))


def _debug_sizes(config, B, T):
    """Bytes after the header of a debug state for this config and B, T."""
    n_tok, n_log = B * T, B * T * config.vocab_size
    return 4 * (2 * n_tok + n_log + 1 + config.num_parameters())


def read_debug_state(path, config: GPT2Config) -> DebugState:
    """Read a debug state written for ``config`` (the file itself does not hold it)."""
    header, size = _read_header(path, "debug state", DEBUG_STATE_MAGIC, (DEBUG_STATE_VERSION,))
    B, T = int(header[2]), int(header[3])
    if B < 1 or T < 1:
        raise FormatError(path, f"invalid header: B={B}, T={T} (both must be >= 1)")
    if T > config.max_seq_len:
        raise FormatError(path, f"invalid header: T={T} exceeds the config's "
                                f"max_seq_len={config.max_seq_len}")
    _check_size(path, "debug state", size, HEADER_BYTES + _debug_sizes(config, B, T))
    V, n = config.vocab_size, config.num_parameters()
    body = _Body(path)
    inputs = body.take("<i4", B * T, np.int32).reshape(B, T)
    targets = body.take("<i4", B * T, np.int32).reshape(B, T)
    for what, ids in (("inputs", inputs), ("targets", targets)):
        bad = ids[(ids < 0) | (ids >= V)]
        if bad.size:
            raise FormatError(path, f"{what} hold token id {bad[0]}, outside [0, {V})")
    logits = body.take("<f4", B * T * V, np.float32).reshape(B, T, V)
    loss = body.take("<f4", 1, np.float32)[0]
    grads = body.take("<f4", n, np.float32)
    return DebugState(config, B, T, inputs, targets, logits, loss, grads)


def write_debug_state(path, config: GPT2Config, inputs, targets, logits, loss, grads,
                      overwrite=False):
    """Write a debug state. logits may be (B,T,V) or (B,T,Vp) (the padding is dropped);
    grads flat (num_parameters) or a dict name -> array."""
    config.validate()
    V = config.vocab_size
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    if inputs.ndim != 2 or targets.shape != inputs.shape:
        raise ValueError(f"inputs and targets must both be (B, T), got {inputs.shape} "
                         f"and {targets.shape}")
    B, T = inputs.shape
    for what, ids in (("inputs", inputs), ("targets", targets)):
        if not np.issubdtype(ids.dtype, np.integer) or (ids.size and (ids.min() < 0 or ids.max() >= V)):
            raise ValueError(f"{what} must be integer token ids in [0, {V})")
    logits = np.asarray(logits)
    if logits.shape[:2] != (B, T) or logits.ndim != 3 or logits.shape[2] not in (V, config.Vp):
        raise ValueError(f"logits must be (B, T, V) or (B, T, Vp) = ({B}, {T}, {V} or "
                         f"{config.Vp}), got {logits.shape}")
    chunks = [
        _header(DEBUG_STATE_MAGIC, DEBUG_STATE_VERSION, B, T),
        np.ascontiguousarray(inputs, dtype="<i4").tobytes(),
        np.ascontiguousarray(targets, dtype="<i4").tobytes(),
        _f32(logits[..., :V], "logits").tobytes(),
        np.asarray([loss], dtype="<f4").tobytes(),
        _flat_params(config, grads, "grads").tobytes(),
    ]
    write_atomic(path, chunks, overwrite)


# ----------------------------------------------------------------------------- tokens

def read_tokens(path) -> np.ndarray:
    """Read a token shard -> uint16 array of its tokens."""
    header, size = _read_header(path, "token shard", TOKENS_MAGIC, (TOKENS_VERSION,))
    n = int(header[2])
    if n < 0:
        raise FormatError(path, f"invalid header: token count {n} is negative")
    _check_size(path, "token shard", size, HEADER_BYTES + 2 * n)
    return _Body(path).take("<u2", n, np.uint16)


def write_tokens(path, tokens, overwrite=False):
    """Write a token shard (ids must fit in uint16)."""
    t = np.asarray(tokens)
    if t.ndim != 1 or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-d integer array, got {t.dtype} {t.shape}")
    if t.size and (t.min() < 0 or t.max() > 65535):
        raise ValueError("token ids must lie in [0, 65535] to be stored as uint16")
    if t.size >= 2**31:
        raise ValueError("too many tokens for one shard (count must fit in int32)")
    write_atomic(path, [_header(TOKENS_MAGIC, TOKENS_VERSION, t.size),
                         np.ascontiguousarray(t, dtype="<u2").tobytes()], overwrite)
