"""A torch port's state read back without needless work (issue 32): the C's m and v loaded
into the buffers the checks read, which the optimizer then steps in place (no copy back),
and the derived activations (the oracle on the port's own inputs) computed when first read,
each giving what copying and computing every step gives."""
from __future__ import annotations

import numpy as np
import torch

from harness import AdamW, TorchModel
from harness.checks.e2e import e2e_graph
from harness.graph import Ref
from harness.ports.torchstate import ModelState
from pyref import synth
from pyref.config import PRESETS, param_shapes, point
from pyref.model import GPT2
from harness.arbiter.oracle import ORACLE, witness_spread

import model_ports as mp

TINY = PRESETS["tiny"]
HYPER = AdamW()


def _stepped(factory=mp.GPT, optimizer=None, copies: bool = False):
    """A ModelState after load_state (with m, v), forward, backward and update at t = 2;
    ``copies``: the optimizer's moments held as tensors of their own (the copying path)."""
    params = synth.init_params(TINY, seed=0)
    rng = np.random.default_rng(1)
    m = rng.standard_normal(params.size).astype(np.float32) * 1e-3
    v = rng.random(params.size).astype(np.float32) * 1e-6
    state = ModelState(TINY, params, TorchModel(factory, optimizer=optimizer), HYPER)
    if copies:
        own = state._state_tensor
        state._state_tensor = lambda e, views, dtype: own(e, views, dtype).clone()
    state.load_state(params, m, v)
    state.forward(*next(synth.batches(TINY, 2, 8)))
    state.zero_grad()
    state.backward()
    state.update(*HYPER.args(), 2)
    return state


def test_loaded_moments_are_stepped_in_the_buffers_read_back():
    """The optimizer's exp_avg and exp_avg_sq view the C-layout buffers the update check
    reads (no copy back), and hold what the copying path reads back, bit for bit."""
    state, copied = _stepped(), _stepped(copies=True)
    viewed = [e for e in state.entries
              if np.shares_memory(state.optimizer.state[e.param]["exp_avg"].numpy(), state.m_memory)]
    assert len(viewed) == len(state.entries)
    assert not any(np.shares_memory(copied.optimizer.state[e.param]["exp_avg"].numpy(), copied.m_memory)
                   for e in copied.entries)
    for name in ("m_memory", "v_memory", "params_memory", "grads_memory"):
        assert np.array_equal(getattr(state, name).view(np.uint32), getattr(copied, name).view(np.uint32)), name


class _FreshStateAdamW(torch.optim.AdamW):
    """An AdamW that replaces its moment tensors before each step (what a port's own
    optimizer may do): the buffers loaded are then not what it steps."""

    def step(self, closure=None):
        for st in self.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    st[k] = st[k].clone()
        return super().step(closure)


def test_moments_an_optimizer_replaced_are_read_back():
    """Where the optimizer steps tensors other than the loaded buffers, their values are
    read back (a read that took the buffers as stepped would keep the C's pre-step m)."""
    opt = lambda model, hyper: _FreshStateAdamW(model.parameters(), lr=hyper.learning_rate,  # noqa: E731
                                                weight_decay=hyper.weight_decay)
    state = _stepped(optimizer=opt)
    shapes = param_shapes(TINY)
    for label, key in (("m_memory", "exp_avg"), ("v_memory", "exp_avg_sq")):
        read = point(getattr(state, label), shapes)
        for e in state.entries:
            held = state.optimizer.state[e.param][key].numpy()
            assert not np.shares_memory(held, getattr(state, label))
            assert np.array_equal(e.slot.view(read)[:held.shape[0]], held), (label, e.names[0])


def _forward(factory=mp.GPT):
    params = synth.init_params(TINY, seed=0)
    state = ModelState(TINY, params, TorchModel(factory), HYPER)
    inputs, targets = next(synth.batches(TINY, 2, 8))
    state.forward(inputs, targets)
    state.zero_grad()
    state.backward()
    oracle = GPT2(TINY, params, kernels=ORACLE, dtype=np.float64)
    oracle.forward(inputs, targets)
    oracle.zero_grad()
    oracle.backward()
    return state, oracle


def test_derived_activations_are_computed_when_first_read():
    """A port's derived activations (here the probabilities and attention's softmax, which
    no module of nanoGPT's layout returns) are computed when a reader asks for them, with
    the values computing them all gives; the end-to-end checks do not ask."""
    state, oracle = _forward()
    pending = {node.arg_dict[o].name for node, outs in state.acts.pending for o in outs}
    assert {"probs", "att"} <= pending
    assert state.has(Ref("acts", "probs")) and not state.observes(Ref("acts", "probs"))
    e2e_graph(TINY, 16, state, oracle, step=1, impl="port", spread=witness_spread(TINY, oracle, oracle))
    assert {node.arg_dict[o].name for node, outs in state.acts.pending for o in outs} == pending
    att = Ref("acts", "att", 1).get(state).copy()
    assert not np.isnan(att).any()
    assert "probs" in {node.arg_dict[o].name for node, outs in state.acts.pending for o in outs}
    everything, _ = _forward()
    whole = dict(everything.acts)        # every reader of the whole dict gets them computed
    assert not everything.acts.pending
    assert np.array_equal(whole["att"][1], att)
    probs = Ref("acts", "probs").get(state)
    assert np.array_equal(probs, whole["probs"]) and not np.isnan(probs).any()
    logits = Ref("acts", "logits").get(state).astype(np.float64)
    assert np.array_equal(probs, ORACLE.softmax_forward(logits, TINY.vocab_size).astype(np.float32))

