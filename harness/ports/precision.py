"""The precision each op of a torch port ran in, observed rather than assumed.

A mixed-precision port (``torch.autocast``, parameters held in bf16 or fp16, TF32 or a
reduced float32 matmul precision) rounds some ops more coarsely than the C. What it did is
read off the port's own run:

* :class:`Observer` -- a small ``TorchDispatchMode`` (``torch.utils._python_dispatch``)
  under which the port's first forward runs: each aten op's floating input and output
  dtypes, with the module that was running (module hooks keep the stack). It sees what
  autocast's policy did (a ``linear`` cast to bf16, a ``layer_norm`` kept in float32) and
  what a model does by itself (an autocast inside its forward, a ``.half()`` branch);
* :class:`Profile` -- those records, the dtypes of the activations the port showed (the
  dtype an op's result was stored in), its parameters' and optimizer state's dtypes and
  torch's float32 matmul precision setting, turned into one
  :class:`harness.arbiter.precision.Precision` per op of the graph (:meth:`Profile.of`),
  per gradient buffer (:meth:`Profile.of_buffer`), per update output
  (:meth:`Profile.update`), and per kernel for the witness (:meth:`Profile.witness`).

The rules (each a fact of how the op ran, not of a policy table):

* a matmul or attention (the graph's ``matmul_forward``, ``attention_forward``) computes
  in the coarsest dtype its aten matmuls (mm, addmm, bmm, baddbmm, sdpa ...) took as
  inputs, in the module that showed the op's output; computed below float32 its
  operands as the checks see them (float32 activations, the C's float32 parameters) were
  rounded to that dtype in it. Float32 matmuls under ``float32_matmul_precision`` 'high'
  round their operands to TF32 (2^-11), under 'medium' to bf16;
* any other op computes in the dtype its result was stored in (a GELU on a bf16 input is
  a bf16 GELU); it rounds its inputs only where it reads a parameter held below float32
  (the checks read the C's float32 values);
* an op's backward computes as its forward did, and its results are rounded at the
  coarser of its forward's compute and output dtypes (the gradient of a bf16 matmul's
  operand is a bf16 product, whatever dtype it is then cast to);
* accumulation is float32 (torch's CPU kernels accumulate bf16 and fp16 reductions in
  float), except where a kernel the port ran is known to hold its partial sums in its
  input's dtype (:data:`ACCUMULATES_IN_INPUT`): aten's ``native_layer_norm`` on a bf16 or
  fp16 input, whose backward sums the weight and bias gradients over the B*T rows in a
  buffer of that dtype (torch's CPU ``LayerNormBackwardKernelImplInternal``: the
  per-thread buffer is ``at::empty({0}, X.options())``; only the few per-thread partials
  are added in float). Measured on torch 2.13's CPU kernel against float64: its dgamma
  and dbeta are off by ~1 bf16 unit of their terms' size for sign-mixed terms, and by
  u_bf16 sqrt(n) for same-signed ones, as a chain of n bf16 roundings is, where float32
  accumulation would leave only the output's rounding. The aten op is what is observed
  (a port writing its layer norm from elementary ops gets autograd's float-accumulated
  sums, and float32 bounds for them).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from pyref.config import GPT2Config

from ..arbiter.precision import FLOAT32, Precision, coarser, dtype_name
from ..errors import ModelError
from ..graph import Node, backward_nodes, forward_nodes

# aten ops that are a matmul (their operands' dtype is the op's compute dtype)
MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addbmm", "dot", "mv",
              "scaled_dot_product", "flash_attention", "efficient_attention")
MATMUL_KERNELS = ("matmul_forward", "attention_forward")
# what torch's float32 matmul precision setting makes a float32 matmul's operands on the
# CPU (oneDNN: 'medium' may use bf16 internally; 'high' TF32's 10 mantissa bits)
FLOAT32_MATMUL = {"highest": "float32", "high": "tf32", "medium": "bfloat16"}
# kernel of the graph -> (the aten op of its forward, the outputs of its backward that op's
# CPU kernel accumulates in its input's dtype when that is bf16 or fp16): see the module's
# docstring
ACCUMULATES_IN_INPUT = {"layernorm_backward": ("native_layer_norm", ("dweight", "dbias"))}
# the dtypes below float32 an op may compute or store in
REDUCED = ("bfloat16", "float16")


@dataclass
class Record:
    """One aten op as the port ran it: its name, the module running it, the dtypes."""

    op: str
    module: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    # its module was entered inside a torch.autocast region (the run's or the port's own:
    # inside the dispatch mode autocast's own state reads as off, so the module's is kept)
    autocast: bool = False

    @property
    def name(self) -> str:
        """The aten op's name without namespace or overload: ``native_layer_norm``."""
        return self.op.split("::")[-1].split(".")[0]

    @property
    def matmul(self) -> bool:
        name = self.name
        return any(name == m or name.startswith(f"_{m}") or name.startswith(m) for m in MATMUL_OPS)


def _written(node: Node, ref) -> str | None:
    """The argument under which ``node`` writes ``ref`` (an output or an accumulated
    gradient), or None."""
    from pyref.protocol import FORWARD_OUTPUTS, INPLACE_ARGS
    if ref is None:
        return None
    names = INPLACE_ARGS.get(node.kernel, ()) + tuple(FORWARD_OUTPUTS.get(node.kernel, ()))
    return next((a for a in names if node.arg_dict.get(a) == ref), None)


def _floats(x) -> tuple[str, ...]:
    import torch
    from torch.utils._pytree import tree_leaves
    return tuple(dtype_name(t.dtype) for t in tree_leaves(x)
                 if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _autocasting() -> bool:
    import torch
    return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))


def observe(model, run):
    """``run()`` under the :class:`Observer`, with the module stack kept by hooks on
    ``model``'s modules; returns (what run returned, the records)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    stack: list[tuple[str, bool]] = [("", _autocasting())]
    records: list[Record] = []

    class Observer(TorchDispatchMode):
        """Notes each aten op's floating input and output dtypes, and its module."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            records.append(Record(func._schema.name, stack[-1][0], _floats((args, kwargs)), _floats(out),
                                  stack[-1][1]))
            return out

    def enter(name):
        def pre(mod, args):
            stack.append((name, _autocasting()))
        return pre

    def leave(mod, args, out):
        if len(stack) > 1:
            stack.pop()     # returns None: a forward hook's value would replace the output

    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(enter(name)))
        handles.append(m.register_forward_hook(leave))
    try:
        with Observer():
            out = run()
    finally:
        for h in handles:
            h.remove()
    return out, records


@dataclass
class Profile:
    """The precision of each op of a port's graph, from what its run showed."""

    config: GPT2Config
    records: list[Record]
    stored: dict                      # (act, layer) -> dtype name of the tensor the port showed
    points: dict                      # (act, layer) -> module name (Capture.points)
    params: str = "float32"           # the parameters' dtype
    state: dict = field(default_factory=dict)   # "m"/"v" -> the optimizer state's dtype
    stepped: str | None = None        # the dtype of what the optimizer steps: the parameters' or their masters'
    matmul_setting: str = "highest"   # torch.get_float32_matmul_precision()
    loss: str = "float32"             # the loss tensor's dtype
    declared: bool = False            # the run asked for mixed precision (--autocast, --param-dtype)
    _of: dict = field(default_factory=dict, repr=False)
    _forwards: dict = field(default_factory=dict, repr=False)   # (layer, op's first word) -> forward node

    # -------------------------------------------------------------- per op
    def of(self, node: Node, output: str | None = None) -> Precision:
        """The precision ``node`` (forward or backward) ran at; writing its ``output`` where
        named (an output its kernel accumulates in a reduced dtype, :data:`ACCUMULATES_IN_INPUT`)."""
        key = (node.kernel, node.layer, node.label)
        if key not in self._of:
            fwd = self._forward_node(node)
            p = self._forward(fwd)
            if fwd is not node:
                p = self._backward(node, p)
            self._of[key] = p
        p = self._of[key]
        held = self._accumulated_in(node, output)
        return p if held is None else replace(p, accumulate=coarser(p.accumulate, held))

    def of_buffer(self, nodes, ref=None) -> Precision:
        """A tensor (``ref``, where given) that one op wrote or several accumulated into:
        the coarsest of their precisions writing it."""
        p = FLOAT32
        for nd in nodes:
            p = p.joined(FLOAT32 if self.undeclared(nd) else self.of(nd, _written(nd, ref)))
        return p

    def update(self, label: str) -> Precision:
        """AdamW's ``params``, ``m`` or ``v``: computed in the coarsest dtype of what it reads
        (the tensors the optimizer steps -- the parameters, or their float32 master weights --
        and the value's own held dtype; the parameters also read m and v), from pre-step
        values rounded to the dtypes they are held in, stored in its held dtype. float32
        masters with float32 moments: a float32 AdamW, judged as the C's."""
        stepped = self.stepped or self.params
        held = stepped if label == "params" else self.state.get(label, stepped)
        read = [stepped, held] + ([self.state.get("m", stepped), self.state.get("v", stepped)]
                                  if label == "params" else [])
        compute = read[0]
        for d in read[1:]:
            compute = coarser(compute, d)
        return Precision(compute, held, compute != "float32")

    def witness(self) -> dict[str, Precision]:
        """Kernel -> the coarsest precision any of its calls ran at (the witness noises
        each kernel's results at it): empty for a port that computes at float32."""
        out: dict[str, Precision] = {}
        for nd in forward_nodes(self.config) + backward_nodes(self.config):
            p = FLOAT32 if self.undeclared(nd) else self.of(nd)
            out[nd.kernel] = out[nd.kernel].joined(p) if nd.kernel in out else p
        return {k: p for k, p in out.items() if not p.is_float32}

    @property
    def is_float32(self) -> bool:
        return not self.witness() and self.update("params").is_float32 and \
            self.update("m").is_float32 and self.update("v").is_float32

    def key(self) -> tuple:
        """What the witness depends on (runs of equal profiles share one)."""
        return tuple(sorted(self.witness().items()))

    def undeclared(self, node: Node) -> bool:
        """Whether ``node`` (forward or backward) is an op the port ran below float32 by a
        cast of its own (outside any ``torch.autocast`` region, its parameters float32) in
        a run that declared no mixed precision (:attr:`declared`): such an op is judged at
        the C's float32 (:meth:`of_buffer`, :meth:`witness`), not at what it ran in."""
        if self.declared or self.params != "float32":
            return False
        fwd = self._forward_node(node)
        p = self.of(fwd)
        if p.compute not in REDUCED and p.output not in REDUCED:
            return False
        return any(not r.autocast for r in self._records_of(fwd, lambda r: any(d in REDUCED for d in r.inputs
                                                                                + r.outputs)))

    def undeclared_ops(self) -> list[tuple[Node, Precision]]:
        """The forward ops :meth:`undeclared` names, with the precision each ran in."""
        return [(nd, self.of(nd)) for nd in forward_nodes(self.config) if self.undeclared(nd)]

    # -------------------------------------------------------------- the rules
    def _forward_node(self, node: Node) -> Node:
        if node.kernel.endswith("_forward"):
            return node
        if not self._forwards:      # the graph built once (a step asks for each backward node's)
            for fwd in reversed(forward_nodes(self.config)):
                self._forwards[(fwd.layer, fwd.label.split()[0])] = fwd
        return self._forwards.get((node.layer, node.label.split()[0]), node)

    def _backward(self, node: Node, fwd: Precision) -> Precision:
        """A backward computes as its forward did; its results are rounded at the coarser
        of its forward's compute and output dtypes and of the dtype of each tensor whose
        gradient it writes (a gradient has its tensor's dtype: the gradient of a bf16
        branch added to a float32 residual stream is a bf16 tensor)."""
        from pyref.protocol import INPLACE_ARGS
        out = coarser(fwd.compute, fwd.output) if fwd.rounds_inputs or fwd.compute != "float32" else fwd.output
        for a in INPLACE_ARGS.get(node.kernel, ()):
            r = node.arg_dict.get(a)
            if getattr(r, "group", None) == "grads_acts" and (r.name, r.layer) in self.stored:
                out = coarser(out, self.stored[(r.name, r.layer)])
        return Precision(fwd.compute, out, fwd.rounds_inputs, fwd.accumulate)

    def _output_dtype(self, node: Node) -> str | None:
        from pyref.protocol import FORWARD_OUTPUTS
        seen = [self.stored[(r.name, r.layer)] for o in FORWARD_OUTPUTS.get(node.kernel, ())
                if (r := node.arg_dict.get(o)) is not None and (r.name, r.layer) in self.stored]
        if not seen:
            return None
        d = seen[0]
        for x in seen[1:]:
            d = coarser(d, x)
        return d

    def _forward(self, node: Node) -> Precision:
        out = self._output_dtype(node)
        if out is None:
            out = self.loss if node.kernel.startswith(("softmax", "crossentropy")) else self.params
        reads_params = any(getattr(v, "group", None) == "params" for _, v in node.args)
        if node.kernel in MATMUL_KERNELS:
            compute = self._matmul_dtype(node)
            if compute == "float32":
                compute = FLOAT32_MATMUL.get(self.matmul_setting, "float32")
            return Precision(compute, out, compute != "float32")
        return Precision(out, out, reads_params and self.params != "float32")

    def _accumulated_in(self, node: Node, output: str | None) -> str | None:
        """The reduced dtype ``node``'s ``output`` is accumulated in by the kernel the port
        ran (:data:`ACCUMULATES_IN_INPUT`: the aten op of its forward, on an input of that
        dtype), or None (float32 accumulation)."""
        op, outputs = ACCUMULATES_IN_INPUT.get(node.kernel, (None, ()))
        if output not in outputs:
            return None
        ran = [r for r in self._records_of(self._forward_node(node), lambda r: r.name == op) if r.inputs]
        held = [r.inputs[0] for r in ran if r.inputs[0] != "float32"]
        return held[0] if held else None

    def _records_of(self, node: Node, which) -> list[Record]:
        """The records ``which`` selects in the module that showed forward ``node``'s output
        (its parent, for an output seen as a module's input), else in the whole forward."""
        from pyref.protocol import FORWARD_OUTPUTS
        modules = []
        for o in FORWARD_OUTPUTS[node.kernel]:
            r = node.arg_dict.get(o)
            point = self.points.get((r.name, r.layer)) if r is not None else None
            if point:
                modules.append(point.rsplit(".", 1)[0] if point.endswith(" input") else point)
        chosen = [r for r in self.records if which(r)]
        inside = [r for r in chosen if any(r.module == m or r.module.startswith(m + ".") for m in modules)]
        return inside or chosen

    def _matmul_dtype(self, node: Node) -> str:
        """The coarsest operand dtype of the aten matmuls in the module that showed the
        node's output, else in the whole forward (:meth:`_records_of`)."""
        dtypes = [d for r in self._records_of(node, lambda r: r.matmul) for d in r.inputs]
        if not dtypes:
            return "float32"
        d = dtypes[0]
        for x in dtypes[1:]:
            d = coarser(d, x)
        return d

    # -------------------------------------------------------------- what it says
    def lines(self) -> list[str]:
        """What the run found, one line each: the ops below float32, the parameters and
        the optimizer state, the matmul setting."""
        by: dict[str, list[str]] = {}
        for nd in forward_nodes(self.config):
            p = self.of(nd)
            if not p.is_float32:
                name = nd.label.split()[0]
                by.setdefault(f"{p.label} ({p.detail})", [])
                if name not in by[f"{p.label} ({p.detail})"]:
                    by[f"{p.label} ({p.detail})"].append(name)
        out = [f"{', '.join(names)}: {how}" for how, names in by.items()]
        stepped = self.stepped or self.params
        m, v = self.state.get("m", stepped), self.state.get("v", stepped)
        if {self.params, stepped, *self.state.values()} != {"float32"}:
            masters = f", stepped as {stepped} master weights" if stepped != self.params else ""
            held = f"; optimizer state m {m}, v {v}" if self.state else ""   # known once it stepped
            out.append(f"parameters held in {self.params}{masters}{held}")
        if self.matmul_setting != "highest":
            out.append(f"float32_matmul_precision={self.matmul_setting!r}: float32 matmuls at "
                       f"{FLOAT32_MATMUL.get(self.matmul_setting, 'float32')}")
        return out


def profile(config: GPT2Config, records: list[Record], captured: dict, points: dict, params, loss,
            declared: bool = False) -> Profile:
    """The :class:`Profile` of a port's first forward: ``records`` from :func:`observe`,
    ``captured`` its activations ((act, layer) -> tensor), ``params`` its parameters,
    ``declared`` whether the run asked for mixed precision."""
    import torch
    dtypes = {str(p.dtype) for p in params}
    param = dtype_name(next(iter(dtypes))) if len(dtypes) == 1 and next(iter(dtypes)) != "torch.float64" \
        else "float32"
    stored = {}
    for k, t in captured.items():
        try:
            stored[k] = dtype_name(t.dtype)
        except ValueError:
            continue
    return Profile(config, records, stored, dict(points), params=param,
                   matmul_setting=torch.get_float32_matmul_precision(),
                   loss=dtype_name(loss.dtype) if loss is not None and loss.dtype != torch.float64 else "float32",
                   declared=declared)


class Mixed:
    """How a port is run at the precision asked of it, and what it was seen to run at:
    ``autocast`` (``"bf16"``/``"fp16"``: its forward under ``torch.autocast('cpu', ...)``),
    ``param_dtype`` (its parameters cast to it once built), ``grad_scaler`` (its loss
    scaled by a ``torch.amp.GradScaler`` before backward, its gradients read back unscaled
    and its step taken through the scaler, as fp16 training does). A port that autocasts
    or casts by itself needs none of them: its first forward is observed either way."""

    def __init__(self, autocast: str | None = None, param_dtype: str | None = None, grad_scaler: bool = False):
        self.autocast = None if autocast is None else _torch_dtype(autocast, "autocast")
        self.param_dtype = None if param_dtype is None else _torch_dtype(param_dtype, "param dtype")
        self.grad_scaler = bool(grad_scaler)
        self.scaler = None
        self.profile: Profile | None = None
        self.records: list[Record] | None = None

    def prepare(self, model) -> None:
        """The parameters cast to ``param_dtype``; a GradScaler made where asked."""
        if self.param_dtype is not None:
            model.to(self.param_dtype)
        if self.grad_scaler:
            import torch
            self.scaler = torch.amp.GradScaler("cpu")

    def forward(self, model, call):
        """``call()`` (the port's forward) under autocast where asked; the first one
        observed (:func:`observe`)."""
        import contextlib
        import torch
        ctx = torch.autocast("cpu", dtype=self.autocast) if self.autocast is not None else contextlib.nullcontext()
        with ctx:
            if self.records is None:
                out, self.records = observe(model, call)
                return out
            return call()

    def observed(self, config: GPT2Config, capture, model, loss) -> None:
        """The profile of the first forward, once its activations are captured."""
        if self.profile is None and self.records is not None:
            self.profile = profile(config, self.records, capture.values, capture.points,
                                   list(model.parameters()), loss, declared=self.declared)

    @property
    def declared(self) -> bool:
        """Whether the run asked for mixed precision (``autocast`` or ``param_dtype``)."""
        return self.autocast is not None or self.param_dtype is not None

    @property
    def scale(self) -> float:
        """The factor the gradients carry (1 without a GradScaler)."""
        return 1.0 if self.scaler is None else float(self.scaler.get_scale())

    def backward(self, loss) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer) -> None:
        """The optimizer's step (through the scaler: it unscales the gradients, skips a
        step with non-finite ones, and updates its scale)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dtypes(self, optimizer, stepped) -> None:
        """The dtypes of what the optimizer steps (``stepped``: the parameters or their
        master weights) and of its state (m: exp_avg, v: exp_avg_sq) as the step left them."""
        if self.profile is None:
            return
        if stepped and stepped[0].dtype.is_floating_point and str(stepped[0].dtype) != "torch.float64":
            self.profile.stepped = dtype_name(stepped[0].dtype)
        for p in stepped:
            st = optimizer.state.get(p, {})
            for key, label in (("exp_avg", "m"), ("exp_avg_sq", "v")):
                if key in st and hasattr(st[key], "dtype"):
                    self.profile.state[label] = dtype_name(st[key].dtype)
            if st:
                return


def _torch_dtype(name: str, what: str):
    import torch
    try:
        d = dtype_name(name)
    except ValueError:
        raise ModelError(f"{what} {name!r}: expected bf16 or fp16") from None
    if d not in ("bfloat16", "float16"):
        raise ModelError(f"{what} {name!r}: expected bf16 or fp16")
    return getattr(torch, d)
