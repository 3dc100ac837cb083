"""llm.c's file formats: model checkpoint, debug state, token shard (read and write).

Little-endian throughout; every file starts with a header of 256 int32.

- checkpoint: [0]=20240326, [1]=3 (float32, padded vocab), [2]=maxT, [3]=V, [4]=L, [5]=NH,
  [6]=C, [7]=Vp; then every parameter as float32, in ``PARAM_NAMES`` order (wte: Vp rows).
  Version 5 is llm.c's bf16 variant, which the float32 trainer refuses (so do we).
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


def _check_size(path, kind, size, expected):
    if size != expected:
        raise FormatError(path, f"{kind} file holds {size} bytes, header implies {expected}")


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


# ----------------------------------------------------------------------------- checkpoint

def read_checkpoint(path) -> tuple[GPT2Config, np.ndarray]:
    """``gpt2_build_from_checkpoint``'s reading: -> (config, flat float32 params)."""
    config = read_checkpoint_header(path)
    return config, _Body(path).take("<f4", config.num_parameters(), np.float32)


def read_checkpoint_header(path) -> GPT2Config:
    """Check a checkpoint's header (magic, version, config) and its size without reading
    the parameters; -> the config. What the C would exit() on, or read past, raises."""
    header, size = _read_header(path, "checkpoint", CHECKPOINT_MAGIC,
                                (CHECKPOINT_VERSION, CHECKPOINT_VERSION_BF16))
    if header[1] == CHECKPOINT_VERSION_BF16:
        raise FormatError(path, "checkpoint version 5 holds bf16 parameters; the float32 "
                                "trainer (train_gpt2.c) needs version 3 (a float32 checkpoint)")
    maxT, V, L, NH, C, Vp = (int(x) for x in header[2:8])
    config = GPT2Config(max_seq_len=maxT, vocab_size=V, padded_vocab_size=Vp,
                        num_layers=L, num_heads=NH, channels=C)
    try:
        config.validate()
    except ValueError as e:
        raise FormatError(path, f"invalid config in header: {e}") from None
    n = config.num_parameters()
    _check_size(path, "checkpoint", size, HEADER_BYTES + 4 * n)
    return config


def write_checkpoint(path, config: GPT2Config, params, overwrite=False):
    """Write a version-3 (float32) checkpoint; params flat (num_parameters) or a dict."""
    config.validate()
    c = config
    p = _flat_params(config, params, "params")
    head = _header(CHECKPOINT_MAGIC, CHECKPOINT_VERSION, c.max_seq_len, c.vocab_size,
                   c.num_layers, c.num_heads, c.channels, c.padded_vocab_size)
    write_atomic(path, [head, p.tobytes()], overwrite)


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
