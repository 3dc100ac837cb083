"""A torch model to check, as the harness builds it: :class:`TorchModel` (the model, its
parameter mapping, its optimizer), :func:`build_model` (the harness's config, or the same
hyperparameters under the names ports use, :class:`Hyper`) and :func:`build_optimizer`."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from pyref.config import AdamW, GPT2Config

from ..errors import ModelError

# the optimizer "factory" that means the model's own method (nanoGPT, llm.c's train_gpt2.py)
CONFIGURE_OPTIMIZERS = "configure_optimizers"


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


def build_model(factory, cfg: GPT2Config):
    """``factory(cfg)``; if that refuses the harness's GPT2Config, ``factory(Hyper(cfg))``
    (a dict of hyperparameters, also readable as attributes). A module instance is used as is."""
    import torch
    if isinstance(factory, torch.nn.Module):
        return factory
    if not callable(factory):
        shown = repr(factory)
        shown = shown if len(shown) <= 80 else f"{shown[:60]}... ({type(factory).__name__})"
        raise ModelError(f"{shown} is neither an nn.Module nor a class or factory making one")
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


@dataclass
class TorchModel:
    """What to check: the model (a class/factory taking the config, or an instance), how
    its parameters map (None: recognised by name), and its optimizer (None: the run's
    torch.optim.AdamW; ``"configure_optimizers"``; or ``factory(model, hyper)``)."""

    factory: object
    mapping: object = None
    optimizer: object = None
    name: str = "model"
    # mixed precision asked of the run (harness.ports.precision.Mixed): the forward under
    # torch.autocast ("bf16"/"fp16"), the parameters cast ("bf16"/"fp16"), a GradScaler
    autocast: str | None = None
    param_dtype: str | None = None
    grad_scaler: bool = False


def call_model(model, idx, tgt):
    """The model's forward as a port is called: ``model(idx, targets)`` where its forward
    takes the targets and its loss is the C's, else ``model(idx)`` (Hugging Face's
    forward shifts its labels: not the C's loss)."""
    from .families import hugging_face
    params = list(inspect.signature(model.forward).parameters)
    if hugging_face(model) or len(params) < 2:
        return model(idx)
    return model(idx, tgt)


def build_optimizer(factory, model, hyper: AdamW):
    """The port's optimizer: ``torch.optim.AdamW`` with the run's settings as the C holds
    them (``factory`` None), the model's own ``configure_optimizers`` (nanoGPT's), or
    ``factory(model, hyper)``."""
    import torch
    hyper = hyper.as_float32()   # the run's settings as the C holds them (float)
    if factory is None:
        return torch.optim.AdamW(model.parameters(), lr=hyper.learning_rate, betas=(hyper.beta1, hyper.beta2),
                                 eps=hyper.eps, weight_decay=hyper.weight_decay)
    if factory == CONFIGURE_OPTIMIZERS:   # nanoGPT's / llm.c train_gpt2.py's own method
        method = getattr(model, CONFIGURE_OPTIMIZERS, None)
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
