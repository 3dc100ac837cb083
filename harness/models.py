"""Whole PyTorch models as implementations under test: autograd, torch.optim, hooks.

A port of ``train_gpt2.c`` is usually not written to the kernel protocol: it is an
``nn.Module`` whose ``forward`` builds the graph from torch ops, ``loss.backward()`` gives
the gradients and ``torch.optim.AdamW`` the update. :class:`ModelState` runs such a model
one step at a time from the C's state and presents what it computed with the interface the
per-step checks read from any model state (``params``, ``grads``, ``acts``, ``grads_acts``,
``m_memory``, ``v_memory``, ``mean_loss``; see :mod:`harness.graph`), so a model is one
more implementation column in :func:`harness.runner.run_parity`.

Three families of parameter names are recognised (:func:`map_parameters`):

* the walkthrough's: the C's own names and stacked shapes (``wte``, ``ln1w`` (L, C),
  ``qkvw`` (L, 3C, C), ...), the head being ``wte`` itself;
* llm.c's ``train_gpt2.py`` / nanoGPT: ``transformer.h.{i}.attn.c_attn.weight``, ``nn.Linear``
  weights (out, in) as the C stores them, ``lm_head.weight`` tied to ``transformer.wte.weight``;
* Hugging Face ``GPT2LMHeadModel``: the same names, ``Conv1D`` weights stored (in, out),
  so transposed.

Anything else takes an explicit mapping: ``{model parameter name: "qkvw[3]"}`` (a ``.T``
suffix for a transposed layout), or a callable ``(name, shape) -> such a string``.

Activations are observed at module boundaries with forward hooks (and their gradients with
tensor hooks), and, for a model built from protocol-named forward kernels of its own module
(the walkthrough's ``layernorm_forward(x, w, b)`` ...), at each kernel call that follows the
C's forward order: what a model does not expose is listed as not observed, and the checks
skip it. The values an op's replay needs but no module returns (a layernorm's mean and rstd,
attention's softmax, the probabilities) are *derived*: the float64 oracle of the op applied
to the port's own observed inputs, so a replay's inputs stay the port's own.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from math import prod, sqrt

import numpy as np

from pyref.config import LAYER_PARAMS, PARAM_NAMES, GPT2Config, act_shapes, param_shapes, point
from pyref.constants import LN_EPS
from pyref.protocol import FORWARD_OUTPUTS
from pyref.spec import SPECS

from .errors import InputError
from .graph import Ref, backward_nodes, forward_nodes, writers
from pyref.protocol import run_kernel


class ModelError(InputError, ValueError):
    """The model cannot be checked as given (mapping, loading, optimizer): says what and why."""


# ----------------------------------------------------------------------------
# loading: "file.py:name" or "module:name", a class or factory taking the config

class Hyper(dict):
    """The run's GPT-2 hyperparameters under the names ports use (the harness's, nanoGPT's
    GPTConfig, Hugging Face's), readable as keys and as attributes."""

    def __init__(self, cfg: GPT2Config):
        super().__init__(
            max_seq_len=cfg.max_seq_len, vocab_size=cfg.vocab_size, padded_vocab_size=cfg.padded_vocab_size,
            num_layers=cfg.num_layers, num_heads=cfg.num_heads, channels=cfg.channels,
            block_size=cfg.max_seq_len, n_positions=cfg.max_seq_len, n_layer=cfg.num_layers,
            n_head=cfg.num_heads, n_embd=cfg.channels, maxT=cfg.max_seq_len, V=cfg.vocab_size,
            Vp=cfg.padded_vocab_size, L=cfg.num_layers, NH=cfg.num_heads, C=cfg.channels)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def resolve_spec(spec: str):
    """The object ``spec`` names: ``path/to/file.py:name`` or ``package.module:name``."""
    from .kernels import KernelLoadError, _import_file
    from pathlib import Path
    import importlib

    if not isinstance(spec, str) or ":" not in spec:
        raise ModelError(f"expected file.py:name or module:name, got {spec!r}")
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ModelError(f"expected file.py:name or module:name, got {spec!r}")
    try:
        if where.endswith(".py") or "/" in where:
            path = Path(where)
            if not path.is_file():
                raise ModelError(f"{where}: no such file")
            obj = _import_file(path.resolve())
        else:
            obj = importlib.import_module(where)
    except KernelLoadError as e:
        raise ModelError(str(e)) from e
    except ImportError as e:
        raise ModelError(f"cannot import {where!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"{where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def build_model(factory, cfg: GPT2Config):
    """``factory(cfg)``; if that refuses the harness's GPT2Config, ``factory(Hyper(cfg))``
    (a dict of hyperparameters, also readable as attributes). A module instance is used as is."""
    import torch
    if isinstance(factory, torch.nn.Module):
        return factory
    if not callable(factory):
        raise ModelError(f"{factory!r} is neither an nn.Module nor a class or factory making one")
    errors = []
    for arg in (cfg, Hyper(cfg)):
        try:
            model = factory(arg)
        except (TypeError, AttributeError, KeyError) as e:
            errors.append(f"{type(e).__name__}: {e}")
            continue
        if not isinstance(model, torch.nn.Module):
            raise ModelError(f"{getattr(factory, '__name__', factory)} returned {type(model).__name__}, "
                             "not an nn.Module")
        return model
    raise ModelError(f"{getattr(factory, '__name__', factory)} accepts neither the harness's GPT2Config "
                     f"({errors[0]}) nor a dict of hyperparameters ({errors[1]})")


# ----------------------------------------------------------------------------
# parameters: which slot of the C's ParameterTensors each model parameter holds

@dataclass(frozen=True)
class Slot:
    """One C tensor (``layer`` for the stacked (L, ...) ones), in the model's layout."""

    name: str
    layer: int | None = None
    transpose: bool = False

    def __str__(self):
        return self.name + ("" if self.layer is None else f"[{self.layer}]") + (".T" if self.transpose else "")

    def view(self, views: dict) -> np.ndarray:
        a = views[self.name]
        return a if self.layer is None else a[self.layer]


_SLOT_TEXT = re.compile(r"^(\w+)(?:\[(\d+)\])?(\.T)?$")


def parse_slot(text: str) -> Slot:
    m = _SLOT_TEXT.match(text.strip()) if isinstance(text, str) else None
    if not m or m.group(1) not in PARAM_NAMES:
        raise ModelError(f"mapping target {text!r} is not a C parameter like 'qkvw[3]', 'wte' or 'fcw[0].T' "
                         f"(names: {', '.join(PARAM_NAMES)})")
    name, layer = m.group(1), m.group(2)
    if (name in LAYER_PARAMS) != (layer is not None) and layer is not None:
        raise ModelError(f"mapping target {text!r}: {name} has no layer axis")
    return Slot(name, None if layer is None else int(layer), bool(m.group(3)))


# nanoGPT / llm.c train_gpt2.py / Hugging Face names (any prefix) -> C tensor
_BLOCK = r"(?:^|\.)h\.(\d+)\."
_TOP = {"wte.weight": "wte", "wpe.weight": "wpe", "lm_head.weight": "wte", "ln_f.weight": "lnfw",
        "ln_f.bias": "lnfb"}
_IN_BLOCK = {"ln_1": "ln1", "attn.c_attn": "qkv", "attn.c_proj": "attproj", "ln_2": "ln2",
             "mlp.c_fc": "fc", "mlp.c_proj": "fcproj"}   # + .weight / .bias -> <C name>w / b
_NAMED = [(re.compile(r"(?:^|\.)" + re.escape(k) + "$"), v) for k, v in _TOP.items()] + [
    (re.compile(_BLOCK + re.escape(f"{module}.{kind}") + "$"), c + kind[0])
    for module, c in _IN_BLOCK.items() for kind in ("weight", "bias")]
_C_NAMED = re.compile(r"(?:^|\.)(" + "|".join(PARAM_NAMES) + r")$")


def _c_shape(cfg: GPT2Config, slot: Slot) -> tuple[int, ...]:
    shape = param_shapes(cfg)[slot.name]
    return shape[1:] if slot.layer is not None else shape


def _guess_slot(model, name: str, shape: tuple[int, ...], cfg: GPT2Config) -> Slot | None:
    """The C tensor a parameter holds, by its name (and, for the weights, its module type
    and shape: Conv1D and a transposed shape mean the (in, out) layout)."""
    m = _C_NAMED.search(name)
    if m:   # the walkthrough: C names, stacked shapes
        return Slot(m.group(1))
    for pattern, cname in _NAMED:
        m = pattern.search(name)
        if not m:
            continue
        layer = int(m.group(1)) if m.groups() else None
        slot = Slot(cname, layer)
        if len(shape) == 2 and cname not in ("wte", "wpe"):
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            want = _c_shape(cfg, slot)
            if type(owner).__name__ == "Conv1D" or (shape != want and shape == want[::-1]):
                slot = Slot(cname, layer, transpose=True)
        return slot
    return None


@dataclass
class Entry:
    """One model parameter (all the names it goes by) and the C tensor it holds."""

    names: tuple[str, ...]
    param: object        # torch.nn.Parameter
    slot: Slot
    rows: int | None     # wte: the model's vocabulary rows (V or Vp)


def map_parameters(model, cfg: GPT2Config, mapping=None) -> list[Entry]:
    """Every parameter of ``model`` matched to one C tensor, every C tensor covered once,
    the head tied to ``wte``: else a :class:`ModelError` that lists what is wrong."""
    by_param: dict[int, list[str]] = {}
    params = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
        params[id(p)] = p
    if not params:
        raise ModelError(f"{type(model).__name__} has no parameters")
    problems, entries, holder = [], [], {}
    for pid, names in by_param.items():
        p = params[pid]
        shape = tuple(p.shape)
        slots = {_slot_of(model, n, shape, cfg, mapping) for n in names}
        slots.discard(None)
        if not slots:
            problems.append(f"extra parameter {names[0]} {shape}: no C tensor matches it")
            continue
        if len(slots) > 1:
            problems.append(f"{' = '.join(names)} is one tensor holding {', '.join(map(str, slots))}")
            continue
        slot = slots.pop()
        key = (slot.name, slot.layer)
        if key in holder:
            other = holder[key]
            if slot.name == "wte":
                problems.append(f"untied head: {other.names[0]} and {names[0]} are separate tensors; "
                                "the C's head is wte itself (tie them: lm_head.weight = wte.weight)")
            else:
                problems.append(f"{other.names[0]} and {names[0]} both hold {slot}")
            continue
        want = _c_shape(cfg, slot)
        want = want[::-1] if slot.transpose else want
        rows = None
        if slot.name == "wte" and shape[1:] == want[1:] and shape[0] in (cfg.vocab_size, cfg.padded_vocab_size):
            rows = shape[0]
        elif shape != want:
            problems.append(f"{names[0]} has shape {shape}, {slot} needs {want}"
                            + (f" (or {cfg.vocab_size} rows)" if slot.name == "wte" else ""))
            continue
        entry = Entry(tuple(names), p, slot, rows)
        holder[key] = entry
        entries.append(entry)
    expected = [(n, l) for n in PARAM_NAMES for l in (range(cfg.num_layers) if n in LAYER_PARAMS else [None])]
    covered = set(holder)
    # a stacked (L, ...) parameter covers every layer of its C tensor
    covered |= {(e.slot.name, l) for e in entries if e.slot.layer is None and e.slot.name in LAYER_PARAMS
                for l in range(cfg.num_layers)}
    missing = [f"{n}[{l}]" if l is not None else n for n, l in expected if (n, l) not in covered]
    if missing:
        problems.append(f"missing: no parameter holds {', '.join(missing)}")
    if problems:
        raise ModelError(f"cannot map {type(model).__name__}'s parameters onto the C's: " + "; ".join(problems))
    return entries


def _slot_of(model, name, shape, cfg, mapping) -> Slot | None:
    if mapping is None:
        return _guess_slot(model, name, shape, cfg)
    target = mapping(name, shape) if callable(mapping) else mapping.get(name)
    if target is None:
        return None
    slot = target if isinstance(target, Slot) else parse_slot(target)
    return slot


# ----------------------------------------------------------------------------
# activations: which module boundary shows which C activation

# (module name pattern, "in"/"out", C activation); a layer's number from the pattern's group
_HOOKS = [
    (re.compile(_BLOCK[:-2] + r"$"), "in", "encoded"),      # block 0's input
    (re.compile(_BLOCK[:-2] + r"$"), "out", "residual3"),
    (re.compile(_BLOCK + r"ln_1$"), "out", "ln1"),
    (re.compile(_BLOCK + r"attn\.c_attn$"), "out", "qkv"),
    (re.compile(_BLOCK + r"attn\.c_proj$"), "in", "atty"),
    (re.compile(_BLOCK + r"attn\.c_proj$"), "out", "attproj"),
    (re.compile(_BLOCK + r"ln_2$"), "in", "residual2"),
    (re.compile(_BLOCK + r"ln_2$"), "out", "ln2"),
    (re.compile(_BLOCK + r"mlp\.c_fc$"), "out", "fch"),
    (re.compile(_BLOCK + r"mlp\.c_proj$"), "in", "fch_gelu"),
    (re.compile(_BLOCK + r"mlp\.c_proj$"), "out", "fcproj"),
    (re.compile(r"(?:^|\.)ln_f$"), "out", "lnf"),
    (re.compile(r"(?:^|\.)lm_head$"), "out", "logits"),
]

# outputs no module returns but a replay needs as input: derived from the port's own inputs
# (their rows' ``derivable`` in pyref.spec)
_DERIVED = {k.name: d for k in SPECS if k.returns and (d := tuple(o.name for o in k.outputs if o.derivable))}


def _first_tensor(x):
    import torch
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    if hasattr(x, "last_hidden_state"):
        return x.last_hidden_state
    return None


class _Capture:
    """Forward hooks on the model's modules; tensor hooks for the gradients."""

    def __init__(self, model, cfg: GPT2Config):
        self.points: dict[tuple[str, int | None], str] = {}   # (act, layer) -> module name
        self.values: dict = {}
        self.grads: dict = {}
        self.handles = []
        for mname, module in model.named_modules():
            for pattern, side, act in _HOOKS:
                m = pattern.search(mname)
                if not m:
                    continue
                layer = int(m.group(1)) if m.groups() else None
                if act == "encoded":
                    if layer != 0:
                        continue
                    layer = None
                if layer is not None and layer >= cfg.num_layers:
                    continue
                key = (act, layer)
                if key in self.points:
                    continue
                self.points[key] = mname + (" input" if side == "in" else "")
                self.handles.append(self._hook(module, side, key))

    def _hook(self, module, side, key):
        def grab(t):
            if t is None:
                return
            self.values[key] = t.detach().clone()
            if t.requires_grad:
                t.register_hook(lambda g: self.grads.__setitem__(key, g.detach().clone()))

        if side == "in":
            def pre(mod, args, kwargs):
                grab(_first_tensor(args) if args else _first_tensor(next(iter(kwargs.values()), None)))
            return module.register_forward_pre_hook(pre, with_kwargs=True)

        def post(mod, args, out):
            grab(_first_tensor(out))
        return module.register_forward_hook(post)

    def clear(self):
        self.values.clear()
        self.grads.clear()

    # -- kernel calls: a model built from protocol-named functions (the walkthrough's style)
    def kernel_calls(self, model, cfg: GPT2Config):
        """A context in which the forward kernels the model's own module defines are
        recorded call by call; on exit, the calls that follow the C's forward order are
        taken as its activations (and their gradients hooked)."""
        import contextlib
        import sys
        from pyref.protocol import FORWARD_KERNELS

        module = sys.modules.get(type(model).__module__)
        names = [k for k in FORWARD_KERNELS if callable(getattr(module, k, None))] if module else []
        calls: list = []

        def recorder(kernel, f):
            def call(*args, **kwargs):
                out = f(*args, **kwargs)
                calls.append((kernel, out))
                return out
            return call

        @contextlib.contextmanager
        def ctx():
            saved = {k: getattr(module, k) for k in names}
            try:
                for k, f in saved.items():
                    setattr(module, k, recorder(k, f))
                yield
            finally:
                for k, f in saved.items():
                    setattr(module, k, f)
            # a file loaded by path has a generated module name: show the file's
            where = module.__name__ if module else ""
            if module is not None and where.startswith("llmc_parity_user_") and getattr(module, "__file__", None):
                from pathlib import Path
                where = Path(module.__file__).stem
            self._take_calls(calls, cfg, where)
        return ctx()

    def _take_calls(self, calls, cfg, where):
        for node, (kernel, out) in zip(forward_nodes(cfg), calls):
            if node.kernel != kernel:
                break   # the calls no longer follow the C's graph: the rest is not observed
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for oname, t in zip(FORWARD_OUTPUTS[kernel], outs):
                ref = node.arg_dict[oname]
                key = (ref.name, ref.layer)
                if key in self.values or _first_tensor(t) is None:
                    continue
                self.points[key] = f"{where}.{kernel} call"
                self.values[key] = t.detach().clone()
                if t.requires_grad:
                    t.register_hook(lambda g, key=key: self.grads.__setitem__(key, g.detach().clone()))


# ----------------------------------------------------------------------------
# hygiene: what silently makes a port differ from the C, said before the numbers

def hygiene(model, optimizer, hyper, cfg: GPT2Config, entries: list[Entry]) -> list[str]:
    """One line each, with the reason it matters."""
    import torch
    out = []
    if model.training:
        drops = [f"{n or type(model).__name__} (p={m.p:g})" for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Dropout) and m.p > 0]
        conf = getattr(model, "config", None)
        drops += [f"config.{k}={getattr(conf, k):g}" for k in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "dropout")
                  if isinstance(getattr(conf, k, None), float) and getattr(conf, k) > 0]
        drops += [f"{n}.dropout={m.dropout:g}" for n, m in model.named_modules()
                  if isinstance(getattr(m, "dropout", None), float) and m.dropout > 0]
        if drops:
            out.append(f"dropout in training mode: {', '.join(drops[:4])}{' ...' if len(drops) > 4 else ''} "
                       "(the C has no dropout: set p=0 or call model.eval())")
    frozen = [e.names[0] for e in entries if not e.param.requires_grad]
    if frozen:
        out.append(f"{', '.join(frozen[:3])}{' ...' if len(frozen) > 3 else ''} requires_grad=False: no gradient, "
                   "no update (the C trains every parameter)")
    odd = sorted({str(e.param.dtype) for e in entries if e.param.dtype != torch.float32})
    if odd:
        out.append(f"parameters in {', '.join(odd)}, not float32 (the C computes in float32)")
    if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
        out.append("TF32 / reduced-precision float32 matmul enabled (torch.backends.*.allow_tf32 or "
                   f"float32_matmul_precision={torch.get_float32_matmul_precision()!r}): the C's matmuls are full float32")
    eps = sorted({(n, m.eps) for n, m in model.named_modules()
                  if isinstance(m, torch.nn.LayerNorm) and m.eps != LN_EPS}, key=lambda x: x[0])
    conf = getattr(model, "config", None)
    if isinstance(getattr(conf, "layer_norm_epsilon", None), float) and conf.layer_norm_epsilon != LN_EPS:
        eps.append(("config.layer_norm_epsilon", conf.layer_norm_epsilon))
    if eps:
        out.append(f"layer norm eps {eps[0][1]:g} ({eps[0][0]}{' and others' if len(eps) > 1 else ''}), "
                   "the C uses 1e-5")
    if conf is not None:
        if getattr(conf, "scale_attn_weights", True) is False:
            out.append("attention scores not scaled (config.scale_attn_weights=False); the C scales by 1/sqrt(hs)")
        if getattr(conf, "scale_attn_by_inverse_layer_idx", False):
            out.append("attention scaled by 1/(layer+1) too (config.scale_attn_by_inverse_layer_idx); the C does not")
        act = getattr(conf, "activation_function", None)
        if isinstance(act, str) and act not in ("gelu_new", "gelu_pytorch_tanh"):
            out.append(f"activation {act!r}: the C's GELU is the tanh approximation (gelu_new)")
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.GELU) and m.approximate != "tanh":
            out.append(f"{n}: nn.GELU(approximate={m.approximate!r}); the C uses the tanh approximation")
            break
    hs = cfg.channels // cfg.num_heads
    for n, m in model.named_modules():
        scale = getattr(m, "scale", None)
        if isinstance(scale, float) and abs(scale - 1 / sqrt(hs)) > 1e-7 * (1 / sqrt(hs)) and "attn" in n:
            out.append(f"{n}.scale={scale:g}: the C scales attention scores by 1/sqrt(hs)={1 / sqrt(hs):g}")
            break
    out += _optimizer_hygiene(optimizer, hyper, entries)
    return out


def _optimizer_hygiene(opt, hyper, entries: list[Entry]) -> list[str]:
    import torch
    out = []
    if not isinstance(opt, torch.optim.AdamW):
        out.append(f"optimizer {type(opt).__name__}, not torch.optim.AdamW"
                   + (" (Adam's weight_decay is an L2 term in the gradient, not AdamW's decoupled decay)"
                      if isinstance(opt, torch.optim.Adam) else ""))
    slot_of = {id(e.param): e.slot for e in entries}
    want = dict(lr=hyper.learning_rate, beta1=hyper.beta1, beta2=hyper.beta2, eps=hyper.eps,
                weight_decay=hyper.weight_decay)
    decays: dict[float, list[str]] = {}
    for g in opt.param_groups:
        betas = g.get("betas", (None, None))
        got = dict(lr=g.get("lr"), beta1=betas[0], beta2=betas[1], eps=g.get("eps"),
                   weight_decay=g.get("weight_decay"))
        for k, v in want.items():
            x = got[k]
            if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            if float(x) == float(np.float32(v)):
                continue
            if np.float32(x) == np.float32(v) and not k.startswith("beta"):
                continue   # lr, eps, decay in double: a relative change of ~1e-8, below rounding
            if np.float32(x) == np.float32(v):
                line = (f"optimizer {k}={float(x)!r} in double; the C's is the float {float(np.float32(v))!r}"
                        + (f" (so 1 - {k} differs by {abs((1 - float(x)) / (1 - float(np.float32(v))) - 1):.2g} relative)"
                           if k.startswith("beta") else ""))
            else:
                line = f"optimizer {k}={float(x):g} where the run uses {v:g}"
            if line not in out:
                out.append(line)
        for flag in ("amsgrad", "maximize"):
            if g.get(flag):
                out.append(f"optimizer {flag}=True; the C's AdamW has no such option")
        decays.setdefault(float(g.get("weight_decay", 0.0)), []).extend(
            str(slot_of.get(id(p), "?")) for p in g["params"])
    if len(decays) > 1:
        parts = [f"{wd:g} on {', '.join(sorted(set(names))[:6])}{' ...' if len(set(names)) > 6 else ''}"
                 for wd, names in sorted(decays.items())]
        out.append("weight decay on only some parameters: " + "; ".join(parts)
                   + " (the C decays every parameter alike)")
    return out


# ----------------------------------------------------------------------------
# the step, as the port runs it, presented as a model state

def _torch_optimizer(factory, model, hyper):
    import torch
    hyper = hyper.as_float32()   # the run's settings as the C holds them (float)
    if factory is None:
        return torch.optim.AdamW(model.parameters(), lr=hyper.learning_rate, betas=(hyper.beta1, hyper.beta2),
                                 eps=hyper.eps, weight_decay=hyper.weight_decay)
    if factory == "configure_optimizers":   # nanoGPT's / llm.c train_gpt2.py's own method
        method = getattr(model, "configure_optimizers", None)
        if method is None:
            raise ModelError(f"{type(model).__name__} has no configure_optimizers method")
        given = dict(weight_decay=hyper.weight_decay, learning_rate=hyper.learning_rate,
                     betas=(hyper.beta1, hyper.beta2), device_type="cpu", eps=hyper.eps, zero_stage=0)
        wanted = inspect.signature(method).parameters
        opt = method(**{k: v for k, v in given.items() if k in wanted})
    else:
        opt = factory(model, hyper)
    if not isinstance(opt, torch.optim.Optimizer):
        raise ModelError(f"the optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer")
    return opt


@dataclass
class TorchModel:
    """What to check: the model (a class/factory taking the config, or an instance), how
    its parameters map (None: recognised by name), and its optimizer (None: the run's
    torch.optim.AdamW; ``"configure_optimizers"``; or ``factory(model, hyper)``)."""

    factory: object
    mapping: object = None
    optimizer: object = None
    name: str = "model"


class ModelState:
    """One training step of a torch model from the C's state, read back in the C's layout."""

    def __init__(self, config: GPT2Config, params, spec: TorchModel, hyper):
        import torch
        self.config = config
        self.hyper = hyper
        self.model = build_model(spec.factory, config)
        mapping = spec.mapping if spec.mapping is not None else getattr(self.model, "llmc_param_map", None)
        self.entries = map_parameters(self.model, config, mapping)
        elsewhere = sorted({str(e.param.device) for e in self.entries if e.param.device.type != "cpu"})
        if elsewhere:
            raise ModelError(f"{type(self.model).__name__} has parameters on {', '.join(elsewhere)}; "
                             "the harness compares on the CPU: move the model there (model.cpu())")
        shapes = param_shapes(config)
        n = sum(prod(s) for s in shapes.values())
        self.num_parameters = n
        self.params_memory = np.zeros(n, np.float32)
        self.params = point(self.params_memory, shapes)
        self.grads_memory = np.zeros(n, np.float32)
        self.grads = point(self.grads_memory, shapes)
        self.m_memory = self.v_memory = None
        self.acts = self.grads_acts = None
        self.inputs = self.targets = None
        self.mean_loss = np.float32(-1)
        self.capture = _Capture(self.model, config)
        self.optimizer = _torch_optimizer(spec.optimizer, self.model, hyper)
        self.findings = hygiene(self.model, self.optimizer, hyper, config, self.entries)
        self._loss = None
        self._observed: set = set()
        self._derived: set = set()
        self._own_loss = False
        self.torch = torch
        self.load_state(params)

    # ------------------------------------------------------------------ state
    def load_state(self, params, m=None, v=None):
        """The C's parameters into the model, bit for bit; m, v (None: a fresh optimizer
        state, as at step 1) into the optimizer's exp_avg, exp_avg_sq."""
        torch = self.torch
        self.params_memory[...] = np.asarray(params, np.float32).reshape(-1)
        wte = self.params["wte"]
        if any(e.rows == self.config.vocab_size for e in self.entries) and np.any(wte[self.config.vocab_size:]):
            raise ModelError("the C's padded wte rows (V..Vp) are not zero; a model with V rows cannot hold them")
        with torch.no_grad():
            for e in self.entries:
                e.param.copy_(torch.from_numpy(self._model_layout(e, self.params)))
                back = e.param.detach().to(torch.float32).numpy()
                if e.param.dtype == torch.float32 and not np.array_equal(
                        back.view(np.uint32), self._model_layout(e, self.params).view(np.uint32)):
                    raise ModelError(f"{e.names[0]} did not take the C's values bit for bit")
        self.optimizer.state.clear()
        if m is not None:
            mv = {"m": point(np.asarray(m, np.float32), param_shapes(self.config)),
                  "v": point(np.asarray(v, np.float32), param_shapes(self.config))}
            for e in self.entries:
                self.optimizer.state[e.param] = {
                    "step": torch.tensor(0.0),   # set to t - 1 by update()
                    "exp_avg": torch.from_numpy(self._model_layout(e, mv["m"]).copy()).to(e.param.dtype),
                    "exp_avg_sq": torch.from_numpy(self._model_layout(e, mv["v"]).copy()).to(e.param.dtype)}
            self._mv_loaded = True
        else:
            self._mv_loaded = False

    def _model_layout(self, e: Entry, views: dict) -> np.ndarray:
        a = e.slot.view(views)
        if e.rows is not None:
            a = a[:e.rows]
        return np.ascontiguousarray(a.T if e.slot.transpose else a)

    def _read(self, get, out: dict):
        """A per-parameter tensor (grad, exp_avg, ...) back into C-layout views ``out``."""
        for e in self.entries:
            t = get(e)
            dst = e.slot.view(out)
            if t is None:
                dst[...] = np.nan    # no gradient at all: shows up as a failure, not as zeros
                continue
            a = t.detach().to(self.torch.float32).numpy()
            a = a.T if e.slot.transpose else a
            if e.rows is not None:
                dst[:e.rows] = a
                dst[e.rows:] = 0   # the C's padded rows: zero gradient, zero moments
            else:
                dst[...] = a

    # ------------------------------------------------------------------ forward
    def forward(self, inputs, targets):
        torch = self.torch
        cfg = self.config
        B, T = inputs.shape
        self.inputs, self.targets = np.asarray(inputs, np.int32), np.asarray(targets, np.int32)
        shapes = act_shapes(cfg, B, T)
        if self.acts is None or self.acts["encoded"].shape[:2] != (B, T):
            self.acts = {k: np.full(s, np.nan, np.float32) for k, s in shapes.items()}
            self.grads_acts = {k: np.full(s, np.nan, np.float32) for k, s in shapes.items()}
        else:
            for d in (self.acts, self.grads_acts):
                for a in d.values():
                    a.fill(np.nan)
        self.capture.clear()
        idx = torch.from_numpy(self.inputs.astype(np.int64))
        tgt = torch.from_numpy(self.targets.astype(np.int64))
        with self.capture.kernel_calls(self.model, cfg):
            logits, loss = self._call(idx, tgt)
        if logits is not None and ("logits", None) not in self.capture.values:
            self.capture.values[("logits", None)] = logits.detach().clone()
            if logits.requires_grad:
                logits.register_hook(lambda g: self.capture.grads.__setitem__(("logits", None), g.detach().clone()))
        if loss is None:
            if logits is None:
                raise ModelError(f"{type(self.model).__name__}'s forward returned neither logits nor a loss")
            V = cfg.vocab_size
            loss = torch.nn.functional.cross_entropy(logits[..., :V].reshape(B * T, V).float(), tgt.reshape(-1))
        self._loss = loss
        self.mean_loss = np.float32(loss.detach().float().item())
        self._store(self.capture.values, self.acts, forward=True)
        self._derive()
        return self.mean_loss

    __call__ = forward

    def _call(self, idx, tgt):
        """The model's forward as the port calls it: with the targets where its forward
        takes them and its loss means the C's (not Hugging Face's shifted labels)."""
        model = self.model
        hf = any(type(c).__name__ == "Conv1D" for c in model.modules()) or \
            type(model).__module__.startswith("transformers.")
        params = list(inspect.signature(model.forward).parameters)
        if hf or len(params) < 2:
            out = model(idx)
        else:
            out = model(idx, tgt)
        logits = loss = None
        items = out if isinstance(out, (tuple, list)) else [out]
        if hasattr(out, "logits"):
            items = [out.logits]
        for x in items:
            if isinstance(x, self.torch.Tensor):
                if x.dim() == 0:
                    loss = x
                elif x.dim() == 3 and logits is None:
                    logits = x
        self._own_loss = loss is not None
        return logits, loss

    def _store(self, captured: dict, out: dict, forward: bool):
        cfg = self.config
        for (act, layer), t in captured.items():
            a = t.to(self.torch.float32).numpy()
            dst = out[act] if layer is None else out[act][layer]
            if act in ("logits", "probs") and a.shape[-1] == cfg.vocab_size < cfg.padded_vocab_size:
                dst[..., :cfg.vocab_size] = a
                dst[..., cfg.vocab_size:] = 0   # no padded columns: the C's are 0 (zero rows of wte)
            elif a.shape != dst.shape:
                raise ModelError(f"{self.capture.points.get((act, layer), 'the model output')} gave "
                                 f"{act} of shape {a.shape}, the C's is {dst.shape}")
            else:
                dst[...] = a
            if forward:
                self._observed.add(("acts", act, layer))
            else:
                self._observed.add(("grads_acts", act, layer))

    def _derive(self):
        """The oracle's outputs for what no module returns, from the port's own inputs."""
        from .oracle import ORACLE
        self._derived = set()
        for node in forward_nodes(self.config):
            wanted = _DERIVED.get(node.kernel)
            if not wanted:
                continue
            refs = {k: v for k, v in node.args if isinstance(v, Ref)}
            inputs = {k: r for k, r in refs.items() if k not in FORWARD_OUTPUTS[node.kernel]}
            if not all(self.has(r) for r in inputs.values()):
                continue
            outs = [o for o in wanted if not self.observes(refs[o])]
            if not outs:
                continue
            args = {k: (np.asarray(v.get(self), np.float64) if isinstance(v, Ref) and v.group != "batch"
                        else (v.get(self) if isinstance(v, Ref) else v)) for k, v in node.args
                    if k not in FORWARD_OUTPUTS[node.kernel]}
            res = run_kernel(ORACLE, node.kernel, args, np.float64)
            for o in outs:
                r = refs[o]
                dst = self.acts[r.name] if r.layer is None else self.acts[r.name][r.layer]
                dst[...] = res[o]
                self._derived.add(("acts", r.name, r.layer))

    # ------------------------------------------------------------------ backward
    def zero_grad(self):
        self.model.zero_grad(set_to_none=True)

    def backward(self):
        if self._loss is None:
            raise ModelError("backward() before forward()")
        B, T = self.inputs.shape
        self._observed = {o for o in self._observed if o[0] != "grads_acts"}
        self._loss.backward()
        self._loss = None
        self._read(lambda e: e.param.grad, self.grads)
        self._store(self.capture.grads, self.grads_acts, forward=False)
        # the C seeds dlosses with 1/(B*T): the mean over all positions
        self.grads_acts["losses"][...] = np.float32(1.0) / np.float32(B * T)
        self._derived.add(("grads_acts", "losses", None))

    # ------------------------------------------------------------------ update
    def update(self, lr, beta1, beta2, eps, weight_decay, t):
        """The port's optimizer step (its own hyperparameters: those are under test)."""
        torch = self.torch
        if self._mv_loaded:
            for e in self.entries:
                self.optimizer.state[e.param]["step"] = torch.tensor(float(t - 1))
        self.optimizer.step()
        shapes = param_shapes(self.config)
        if self.m_memory is None:
            self.m_memory = np.zeros(self.num_parameters, np.float32)
            self.v_memory = np.zeros(self.num_parameters, np.float32)
        for key, buf in (("exp_avg", self.m_memory), ("exp_avg_sq", self.v_memory)):
            missing = [e.names[0] for e in self.entries if key not in self.optimizer.state.get(e.param, {})]
            if missing:
                raise ModelError(f"{type(self.optimizer).__name__} keeps no {key!r} for {missing[0]}: "
                                 "its moments cannot be read as AdamW's m and v")
            self._read(lambda e: self.optimizer.state[e.param][key], point(buf, shapes))
        self._read(lambda e: e.param, self.params)

    def drop_activations(self):
        """Drop the activations, their gradients and the captured tensors (the next
        forward makes them again); what an update needs stays."""
        self.acts = self.grads_acts = None
        self.capture.clear()

    def release(self):
        """Drop what a step left (activations and their gradients, captured tensors, the
        autograd graph, the gradients, m, v and the optimizer's state) until the next
        ``load_state``: run_parity checks one reference at a time. The parameters (the
        model's own and the C-layout copy) stay; what was observed is kept for the report."""
        self.drop_activations()
        self.m_memory = self.v_memory = None
        self._loss = None
        self.model.zero_grad(set_to_none=True)
        self.optimizer.state.clear()

    # ------------------------------------------------------------------ what was seen
    def observes(self, ref: Ref) -> bool:
        """Whether the port itself produced ``ref`` (else the checks skip it)."""
        if ref.group in ("params", "grads", "batch"):
            return True
        return (ref.group, ref.name, ref.layer) in self._observed

    def has(self, ref: Ref) -> bool:
        """Observed, or derived from what was observed: usable as a replay's input."""
        return self.observes(ref) or (ref.group, ref.name, ref.layer) in self._derived

    def module_of(self, ref: Ref) -> str | None:
        if ref.group not in ("acts", "grads_acts"):
            return None
        return self.capture.points.get((ref.name, ref.layer))

    def not_observed(self) -> list[str]:
        """The C's activations (and gradients) this model does not show at a module boundary."""
        cfg = self.config
        refs = [r for r in writers(forward_nodes(cfg) + backward_nodes(cfg)) if r.group in ("acts", "grads_acts")]
        unseen: dict[str, list] = {}
        for r in refs:
            if not self.observes(r):
                unseen.setdefault(f"{r.group}.{r.name}", []).append(r.layer)
        out = []
        for what, layers in unseen.items():
            if layers != [None] and len(layers) < cfg.num_layers:
                what += f" (layers {', '.join(map(str, layers))})"
            out.append(what)
        return out


