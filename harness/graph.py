"""The op graph of ``gpt2_forward`` and ``gpt2_backward``, as data.

Each :class:`Node` is one kernel call of the C's model code, with its arguments named as
tensor references into a model's state (``acts``, ``grads_acts``, ``params``, ``grads``,
``layer``) or literals. The replay (:mod:`harness.checks.replay`) walks this list; the
end-to-end check (:mod:`harness.checks.e2e`) uses it to know which op produced a tensor.

Any object with ``params``, ``grads``, ``acts``, ``grads_acts`` dicts of the C's names
and shapes and ``inputs``/``targets`` arrays is a model state here: a
:class:`~harness.clib.cmodel.CModel` or a :class:`pyref.model.GPT2` alike.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyref.config import GPT2Config
from pyref.protocol import FORWARD_OUTPUTS, INPLACE_ARGS



@dataclass(frozen=True)
class Ref:
    """A tensor of a model state: ``group`` in params/grads/acts/grads_acts/batch."""

    group: str
    name: str
    layer: int | None = None

    def get(self, state):
        if self.group == "batch":
            return getattr(state, self.name)
        a = getattr(state, self.group)[self.name]
        return a if self.layer is None else a[self.layer]

    def __str__(self) -> str:
        base = f"{self.group}.{self.name}"
        return base if self.layer is None else f"{base}[layer {self.layer}]"


@dataclass(frozen=True)
class Node:
    kernel: str
    layer: int | None
    args: tuple[tuple[str, object], ...]  # protocol argument name -> Ref or literal
    label: str                            # e.g. "ln1 layernorm_forward"

    @property
    def arg_dict(self) -> dict:
        return dict(self.args)

    def where(self) -> str:
        return f"layer {self.layer} {self.label}" if self.layer is not None else self.label


def _n(kernel, layer, label, **args):
    return Node(kernel, layer, tuple(args.items()), label)


def forward_nodes(cfg: GPT2Config) -> list[Node]:
    A = lambda name, l=None: Ref("acts", name, l)
    P = lambda name, l=None: Ref("params", name, l)
    nodes = [_n("encoder_forward", None, "encoder", inp=Ref("batch", "inputs"), wte=P("wte"), wpe=P("wpe"),
                out=A("encoded"))]
    for l in range(cfg.num_layers):
        res = A("encoded") if l == 0 else A("residual3", l - 1)
        nodes += [
            _n("layernorm_forward", l, "ln1", inp=res, weight=P("ln1w", l), bias=P("ln1b", l),
               out=A("ln1", l), mean=A("ln1_mean", l), rstd=A("ln1_rstd", l)),
            _n("matmul_forward", l, "qkv", inp=A("ln1", l), weight=P("qkvw", l), bias=P("qkvb", l),
               out=A("qkv", l)),
            _n("attention_forward", l, "attention", inp=A("qkv", l), NH=cfg.num_heads,
               out=A("atty", l), preatt=A("preatt", l), att=A("att", l)),
            _n("matmul_forward", l, "attproj", inp=A("atty", l), weight=P("attprojw", l),
               bias=P("attprojb", l), out=A("attproj", l)),
            _n("residual_forward", l, "residual2", inp1=res, inp2=A("attproj", l), out=A("residual2", l)),
            _n("layernorm_forward", l, "ln2", inp=A("residual2", l), weight=P("ln2w", l),
               bias=P("ln2b", l), out=A("ln2", l), mean=A("ln2_mean", l), rstd=A("ln2_rstd", l)),
            _n("matmul_forward", l, "fc", inp=A("ln2", l), weight=P("fcw", l), bias=P("fcb", l),
               out=A("fch", l)),
            _n("gelu_forward", l, "gelu", inp=A("fch", l), out=A("fch_gelu", l)),
            _n("matmul_forward", l, "fcproj", inp=A("fch_gelu", l), weight=P("fcprojw", l),
               bias=P("fcprojb", l), out=A("fcproj", l)),
            _n("residual_forward", l, "residual3", inp1=A("residual2", l), inp2=A("fcproj", l),
               out=A("residual3", l)),
        ]
    L = cfg.num_layers
    nodes += [
        _n("layernorm_forward", None, "lnf", inp=A("residual3", L - 1), weight=P("lnfw"), bias=P("lnfb"),
           out=A("lnf"), mean=A("lnf_mean"), rstd=A("lnf_rstd")),
        _n("matmul_forward", None, "lm_head", inp=A("lnf"), weight=P("wte"), bias=None, out=A("logits")),
        _n("softmax_forward", None, "softmax", logits=A("logits"), V=cfg.vocab_size, probs=A("probs")),
        _n("crossentropy_forward", None, "crossentropy", probs=A("probs"), targets=Ref("batch", "targets"),
           losses=A("losses")),
    ]
    return nodes


def backward_nodes(cfg: GPT2Config) -> list[Node]:
    A = lambda name, l=None: Ref("acts", name, l)
    G = lambda name, l=None: Ref("grads_acts", name, l)
    P = lambda name, l=None: Ref("params", name, l)
    D = lambda name, l=None: Ref("grads", name, l)
    L = cfg.num_layers
    nodes = [
        _n("crossentropy_softmax_backward", None, "crossentropy", dlogits=G("logits"), dlosses=G("losses"),
           probs=A("probs"), targets=Ref("batch", "targets"), V=cfg.vocab_size),
        _n("matmul_backward", None, "lm_head", dinp=G("lnf"), dweight=D("wte"), dbias=None,
           dout=G("logits"), inp=A("lnf"), weight=P("wte")),
        _n("layernorm_backward", None, "lnf", dinp=G("residual3", L - 1), dweight=D("lnfw"),
           dbias=D("lnfb"), dout=G("lnf"), inp=A("residual3", L - 1), weight=P("lnfw"),
           mean=A("lnf_mean"), rstd=A("lnf_rstd")),
    ]
    for l in reversed(range(L)):
        res = A("encoded") if l == 0 else A("residual3", l - 1)
        dres = G("encoded") if l == 0 else G("residual3", l - 1)
        nodes += [
            _n("residual_backward", l, "residual3", dinp1=G("residual2", l), dinp2=G("fcproj", l),
               dout=G("residual3", l)),
            _n("matmul_backward", l, "fcproj", dinp=G("fch_gelu", l), dweight=D("fcprojw", l),
               dbias=D("fcprojb", l), dout=G("fcproj", l), inp=A("fch_gelu", l), weight=P("fcprojw", l)),
            _n("gelu_backward", l, "gelu", dinp=G("fch", l), inp=A("fch", l), dout=G("fch_gelu", l)),
            _n("matmul_backward", l, "fc", dinp=G("ln2", l), dweight=D("fcw", l), dbias=D("fcb", l),
               dout=G("fch", l), inp=A("ln2", l), weight=P("fcw", l)),
            _n("layernorm_backward", l, "ln2", dinp=G("residual2", l), dweight=D("ln2w", l),
               dbias=D("ln2b", l), dout=G("ln2", l), inp=A("residual2", l), weight=P("ln2w", l),
               mean=A("ln2_mean", l), rstd=A("ln2_rstd", l)),
            _n("residual_backward", l, "residual2", dinp1=dres, dinp2=G("attproj", l), dout=G("residual2", l)),
            _n("matmul_backward", l, "attproj", dinp=G("atty", l), dweight=D("attprojw", l),
               dbias=D("attprojb", l), dout=G("attproj", l), inp=A("atty", l), weight=P("attprojw", l)),
            _n("attention_backward", l, "attention", dinp=G("qkv", l), dpreatt=G("preatt", l),
               datt=G("att", l), dout=G("atty", l), inp=A("qkv", l), att=A("att", l), NH=cfg.num_heads),
            _n("matmul_backward", l, "qkv", dinp=G("ln1", l), dweight=D("qkvw", l), dbias=D("qkvb", l),
               dout=G("qkv", l), inp=A("ln1", l), weight=P("qkvw", l)),
            _n("layernorm_backward", l, "ln1", dinp=dres, dweight=D("ln1w", l), dbias=D("ln1b", l),
               dout=G("ln1", l), inp=res, weight=P("ln1w", l), mean=A("ln1_mean", l), rstd=A("ln1_rstd", l)),
        ]
    nodes.append(_n("encoder_backward", None, "encoder", dwte=D("wte"), dwpe=D("wpe"), dout=G("encoded"),
                    inp=Ref("batch", "inputs")))
    return nodes


def writers(nodes: list[Node]) -> dict[Ref, list[tuple[Node, str]]]:
    """Every tensor ``nodes`` write -> the (node, argument) pairs that write it, in graph
    order: a forward's outputs, a backward's gradient buffers (a buffer several calls
    accumulate into is complete after its last)."""
    out: dict[Ref, list] = {}
    for node in nodes:
        names = FORWARD_OUTPUTS.get(node.kernel) or INPLACE_ARGS[node.kernel]
        for a in names:
            if isinstance(ref := node.arg_dict.get(a), Ref):
                out.setdefault(ref, []).append((node, a))
    return out


def unobserved(cfg: GPT2Config, observes) -> list[str]:
    """The tensors the graph writes that a state did not produce itself (``observes(ref)``
    false), as ``group.name``, with the layers where not every layer's is missing: what a
    state's ``not_observed()`` says, and a run's report shows."""
    unseen: dict[str, list] = {}
    for ref in writers(forward_nodes(cfg) + backward_nodes(cfg)):
        if not observes(ref):
            unseen.setdefault(f"{ref.group}.{ref.name}", []).append(ref.layer)
    return [what + (f" (layers {', '.join(map(str, layers))})" if layers != [None] and len(layers) < cfg.num_layers
                    else "") for what, layers in unseen.items()]
