"""GPT-2 as llm.c's ``train_gpt2.c`` runs it, built only from protocol kernels.

``GPT2(config, params, kernels=None, dtype=np.float32)`` mirrors the C's ``GPT2`` struct
and ``gpt2_forward`` / ``gpt2_zero_grad`` / ``gpt2_backward`` / ``gpt2_update``: one flat
buffer each for params, grads, m, v, activations and activation gradients, with named
views in the C's order, shapes and layouts (``config.param_shapes`` / ``config.act_shapes``),
so every slot can be compared element for element with the C's buffers.

The kernels are any protocol implementation (``pyref.protocol.KernelSet``): NumPy by
default, ``dtype=np.float64`` for the oracle, ``pyref.torch_kernels`` or a user's port.
Everything the C would ``exit()`` on raises ``ValueError`` here instead.
"""
from __future__ import annotations

from math import prod

import numpy as np

from .config import LLMC_MAIN, AdamW, GPT2Config, act_shapes, check_tokens, flat_params, param_shapes, point
from .protocol import KernelSet, kernel_set


class ComputesEverything:
    """What a harness reads of a model state that computes every tensor of the graph itself,
    in float32 (or float64) throughout (:class:`harness.checks.modelstate.CheckedState`):
    the C's model and :class:`GPT2` say so by inheriting this; a torch port answers these
    from what it was seen to do."""

    def observes(self, ref) -> bool:
        """Whether this model produced tensor ``ref`` itself: every one."""
        return True

    def has(self, ref) -> bool:
        """Whether it holds a value of ``ref`` (a replay's input): every one."""
        return True

    def module_of(self, ref) -> None:
        """The module that showed ``ref``: none (no modules)."""
        return None

    def not_observed(self) -> list[str]:
        """The tensors of the graph it did not produce itself: none."""
        return []

    def precision_of(self, nodes, ref=None) -> None:
        """The precision it ran ``nodes`` at below float32: none (float32 throughout)."""
        return None

    def update_precision(self, label: str) -> None:
        """The precision of its AdamW's ``params``/``m``/``v`` below float32: none."""
        return None

    def witness_precisions(self) -> dict:
        """Kernel -> a precision below float32 the witness must noise it at: none."""
        return {}

    def precision_lines(self) -> list[str]:
        """What it computed below float32, one line each: nothing."""
        return []

    def held_settings(self) -> dict:
        """The AdamW settings its optimizer holds itself: none (it takes the C's floats)."""
        return {}


class GPT2(ComputesEverything):
    """llm.c's ``GPT2`` struct and its four functions, on a protocol KernelSet.

    ``params``: a flat array of ``config.num_parameters()`` values (checkpoint order) or a
    dict name -> array. grads, m, v, activations and their gradients are allocated when
    the C allocates them (grads/grads_acts on the first backward, m/v on the first update,
    acts on the first forward) and are ``None`` before.
    """

    def __init__(self, config: GPT2Config, params, kernels=None, dtype=np.float32, *,
                 share_params: bool = False):
        self.config = config.validate()
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        self.kernels = kernels if isinstance(kernels, KernelSet) else kernel_set(kernels)
        self.param_shapes = param_shapes(config)
        self.param_sizes = [prod(s) for s in self.param_shapes.values()]
        self.num_parameters = sum(self.param_sizes)
        self.shared_params = None
        if share_params:
            self._share(params)
        else:
            self.params_memory = np.zeros(self.num_parameters, self.dtype)
            self.params = point(self.params_memory, self.param_shapes)
        self.grads_memory = self.grads = None
        self.m_memory = self.v_memory = None
        self.act_sizes = None
        self.acts_memory = self.acts = None
        self.num_activations = 0
        self.grads_acts_memory = self.grads_acts = None
        self.batch_size = self.seq_len = 0
        self.inputs = self.targets = None
        self.mean_loss = self.dtype.type(-1.0)
        self._has_targets = False
        self.t = 0   # AdamW steps taken through step()
        # what a harness asks of any model state: this model has no census and no hygiene
        # findings (it is GPT-2's graph, on the protocol's kernels)
        self.structure: list = []
        self.findings: list = []
        if not share_params:
            self.load_state(params)

    # ------------------------------------------------------------------ state
    def _flat(self, what, x):
        return flat_params(self.config, x, what)

    def _share(self, params):
        """Read the parameters from ``params`` (a flat float array the caller owns and does
        not change during a forward/backward), without a copy. A float64 model may read
        float32 parameters: every float32 is a float64, and the model hands the kernels
        float64 wherever the only operands of an operation are parameters (the encoder's
        wte + wpe), so what it computes is what it computes on float64 copies."""
        flat = self._flat("params", params)
        if flat.dtype not in (np.float32, self.dtype) or not flat.flags.c_contiguous:
            raise ValueError(f"shared parameters must be a contiguous float32 or {self.dtype} array, "
                             f"got {flat.dtype}")
        self.params_memory = flat
        self.params = point(flat, self.param_shapes)
        self.shared_params = flat

    def load_state(self, params, m=None, v=None):
        """Copy params (and optionally AdamW's m, v) into the model's buffers. A model made
        with ``share_params=True`` reads ``params`` where they are instead (no copy)."""
        if self.shared_params is not None:
            if m is not None or v is not None:
                raise ValueError("a model reading shared parameters does not update: no m, v")
            self._share(params)
            return
        if self.params_memory is None:   # after release()
            self.params_memory = np.zeros(self.num_parameters, self.dtype)
            self.params = point(self.params_memory, self.param_shapes)
        self.params_memory[...] = self._flat("params", params)
        for name, x in (("m_memory", m), ("v_memory", v)):
            if x is not None:
                if getattr(self, name) is None:
                    setattr(self, name, np.zeros(self.num_parameters, self.dtype))
                getattr(self, name)[...] = self._flat(name, x)

    # ------------------------------------------------------------------ forward
    def _take_batch(self, inputs, targets):
        """Validated (inputs, targets); the activations allocated for their (B, T) on the
        first call, as the C does, and a later change of (B, T) refused as the C refuses it."""
        c = self.config
        inputs = check_tokens("inputs", inputs, c.vocab_size)
        B, T = inputs.shape
        if targets is not None:
            targets = check_tokens("targets", targets, c.vocab_size, like=inputs)
        if T > c.max_seq_len:
            raise ValueError(f"sequence length T={T} exceeds max_seq_len={c.max_seq_len}")
        if self.acts is None:
            shapes = act_shapes(c, B, T)
            self.act_sizes = [prod(s) for s in shapes.values()]
            self.num_activations = sum(self.act_sizes)
            self.acts_memory = np.zeros(self.num_activations, self.dtype)
            self.acts = point(self.acts_memory, shapes)
            self.batch_size, self.seq_len = B, T
        elif (B, T) != (self.batch_size, self.seq_len):
            raise ValueError(f"the model was set up for B={self.batch_size}, T={self.seq_len} "
                             f"on its first forward; got B={B}, T={T} (the C refuses a change)")
        self.inputs = inputs
        if targets is not None:
            self.targets = targets
        return inputs, targets

    def forward(self, inputs, targets=None):
        """``gpt2_forward``: returns mean_loss with targets, None without (mean_loss = -1)."""
        c = self.config
        V, L, NH = c.vocab_size, c.num_layers, c.num_heads
        inputs, targets = self._take_batch(inputs, targets)
        B, T = inputs.shape
        k, p, a = self.kernels, self.params, self.acts
        # wte[ix] + wpe[t]: in the model's dtype also where it reads float32 parameters
        wpe = p["wpe"] if p["wpe"].dtype == self.dtype else p["wpe"].astype(self.dtype)
        a["encoded"][...] = k.encoder_forward(inputs, p["wte"], wpe)
        for l in range(L):
            residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
            a["ln1"][l], a["ln1_mean"][l], a["ln1_rstd"][l] = \
                k.layernorm_forward(residual, p["ln1w"][l], p["ln1b"][l])
            a["qkv"][l] = k.matmul_forward(a["ln1"][l], p["qkvw"][l], p["qkvb"][l])
            a["atty"][l], a["preatt"][l], a["att"][l] = k.attention_forward(a["qkv"][l], NH)
            a["attproj"][l] = k.matmul_forward(a["atty"][l], p["attprojw"][l], p["attprojb"][l])
            a["residual2"][l] = k.residual_forward(residual, a["attproj"][l])
            a["ln2"][l], a["ln2_mean"][l], a["ln2_rstd"][l] = \
                k.layernorm_forward(a["residual2"][l], p["ln2w"][l], p["ln2b"][l])
            a["fch"][l] = k.matmul_forward(a["ln2"][l], p["fcw"][l], p["fcb"][l])
            a["fch_gelu"][l] = k.gelu_forward(a["fch"][l])
            a["fcproj"][l] = k.matmul_forward(a["fch_gelu"][l], p["fcprojw"][l], p["fcprojb"][l])
            a["residual3"][l] = k.residual_forward(a["residual2"][l], a["fcproj"][l])
        a["lnf"][...], a["lnf_mean"][...], a["lnf_rstd"][...] = \
            k.layernorm_forward(a["residual3"][L - 1], p["lnfw"], p["lnfb"])
        a["logits"][...] = k.matmul_forward(a["lnf"], p["wte"], None)
        a["probs"][...] = k.softmax_forward(a["logits"], V)

        if targets is None:
            self.mean_loss = self.dtype.type(-1.0)
            self._has_targets = False
            return None
        a["losses"][...] = k.crossentropy_forward(a["probs"], targets)
        # the C: mean_loss += losses[i] sequentially in float, then /= B*T
        total = np.cumsum(a["losses"].reshape(-1), dtype=self.dtype)[-1]
        self.mean_loss = total / self.dtype.type(B * T)
        self._has_targets = True
        return self.mean_loss

    __call__ = forward

    def drop_activations(self):
        """Drop the activations and their gradients (the next forward allocates them
        again); what an update needs (params, grads, m, v) stays."""
        self.acts_memory = self.acts = None
        self.grads_acts_memory = self.grads_acts = None
        self.act_sizes, self.num_activations = None, 0
        self.batch_size = self.seq_len = 0
        self._has_targets = False

    def release(self):
        """Drop every buffer (parameters, gradients, m, v, activations and their
        gradients); the next ``load_state`` and forward allocate them again. What a
        harness calls between the steps it reloads the model for, so that only the
        model it checks holds memory."""
        if self.shared_params is None:
            self.params_memory = self.params = None
        self.grads_memory = self.grads = None
        self.m_memory = self.v_memory = None
        self.drop_activations()

    # ------------------------------------------------------------------ backward
    def zero_grad(self):
        """``gpt2_zero_grad``: zero grads and grads_acts where allocated."""
        if self.grads_memory is not None:
            self.grads_memory.fill(0)
        if self.grads_acts_memory is not None:
            self.grads_acts_memory.fill(0)

    def backward(self):
        """``gpt2_backward``: accumulate (+=) into grads and grads_acts, in the C's order."""
        if not self._has_targets:
            raise ValueError("backward() needs a forward(inputs, targets) with targets first "
                             "(the C refuses when mean_loss == -1)")
        if self.grads_memory is None:
            self.grads_memory = np.zeros(self.num_parameters, self.dtype)
            self.grads = point(self.grads_memory, self.param_shapes)
            self.grads_acts_memory = np.zeros(self.num_activations, self.dtype)
            self.grads_acts = point(self.grads_acts_memory,
                                     act_shapes(self.config, self.batch_size, self.seq_len))
        c = self.config
        V, L, NH = c.vocab_size, c.num_layers, c.num_heads
        B, T = self.batch_size, self.seq_len
        k, p, g, a, dl = self.kernels, self.params, self.grads, self.acts, self.grads_acts

        dl["losses"][...] = self.dtype.type(1.0) / self.dtype.type(B * T)
        k.crossentropy_softmax_backward(dl["logits"], dl["losses"], a["probs"], self.targets, V)
        k.matmul_backward(dl["lnf"], g["wte"], None, dl["logits"], a["lnf"], p["wte"])
        k.layernorm_backward(dl["residual3"][L - 1], g["lnfw"], g["lnfb"], dl["lnf"],
                             a["residual3"][L - 1], p["lnfw"], a["lnf_mean"], a["lnf_rstd"])
        for l in reversed(range(L)):
            residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
            dresidual = dl["encoded"] if l == 0 else dl["residual3"][l - 1]
            k.residual_backward(dl["residual2"][l], dl["fcproj"][l], dl["residual3"][l])
            k.matmul_backward(dl["fch_gelu"][l], g["fcprojw"][l], g["fcprojb"][l],
                              dl["fcproj"][l], a["fch_gelu"][l], p["fcprojw"][l])
            k.gelu_backward(dl["fch"][l], a["fch"][l], dl["fch_gelu"][l])
            k.matmul_backward(dl["ln2"][l], g["fcw"][l], g["fcb"][l],
                              dl["fch"][l], a["ln2"][l], p["fcw"][l])
            k.layernorm_backward(dl["residual2"][l], g["ln2w"][l], g["ln2b"][l], dl["ln2"][l],
                                 a["residual2"][l], p["ln2w"][l], a["ln2_mean"][l], a["ln2_rstd"][l])
            k.residual_backward(dresidual, dl["attproj"][l], dl["residual2"][l])
            k.matmul_backward(dl["atty"][l], g["attprojw"][l], g["attprojb"][l],
                              dl["attproj"][l], a["atty"][l], p["attprojw"][l])
            k.attention_backward(dl["qkv"][l], dl["preatt"][l], dl["att"][l], dl["atty"][l],
                                 a["qkv"][l], a["att"][l], NH)
            k.matmul_backward(dl["ln1"][l], g["qkvw"][l], g["qkvb"][l],
                              dl["qkv"][l], a["ln1"][l], p["qkvw"][l])
            k.layernorm_backward(dresidual, g["ln1w"][l], g["ln1b"][l], dl["ln1"][l],
                                 residual, p["ln1w"][l], a["ln1_mean"][l], a["ln1_rstd"][l])
        k.encoder_backward(g["wte"], g["wpe"], dl["encoded"], self.inputs)

    # ------------------------------------------------------------------ update
    def update(self, lr, beta1, beta2, eps, weight_decay, t):
        """``gpt2_update``: AdamW over all parameters; m, v start at zero; t from 1."""
        if self.grads_memory is None:
            raise ValueError("update() needs gradients: call backward() first")
        if int(t) != t or t < 1:
            raise ValueError(f"AdamW step t counts from 1, got {t!r}")
        if self.m_memory is None:
            self.m_memory = np.zeros(self.num_parameters, self.dtype)
        if self.v_memory is None:
            self.v_memory = np.zeros(self.num_parameters, self.dtype)
        self.kernels.adamw(self.params_memory, self.grads_memory, self.m_memory, self.v_memory,
                           lr, beta1, beta2, eps, weight_decay, int(t))

    def step(self, inputs, targets, hyper: AdamW = LLMC_MAIN, t=None):
        """One training step as llm.c's main loop does it: forward, zero_grad, backward,
        update with ``hyper`` (t defaults to the number of steps taken + 1). Returns the loss."""
        loss = self.forward(inputs, targets)
        self.zero_grad()
        self.backward()
        self.t = self.t + 1 if t is None else int(t)
        self.update(*hyper.args(), self.t)
        return loss
