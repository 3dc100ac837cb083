"""The model state's interface, written down once (harness.checks.modelstate): every
implementation the checks read has it, and what a state did not produce is said one way
(harness.graph.unobserved, through the state's own not_observed())."""
from __future__ import annotations

import numpy as np

from harness import CModel, load_kernels
from harness.checks.modelstate import CheckedState, KernelPort, Reference
from harness.graph import Ref, unobserved
from pyref import synth, torch_kernels
from pyref.config import PRESETS, AdamW
from pyref.model import GPT2
from pyref.protocol import FORWARD_KERNELS, KernelSet

TINY = PRESETS["tiny"]


def test_every_implementation_has_the_interface():
    params = synth.init_params(TINY, seed=0)
    inputs, targets = next(synth.batches(TINY, 2, 8))
    with CModel.from_params(TINY, params) as c:
        c.forward(inputs, targets)
        c.zero_grad()
        c.backward()
        c.update(t=1)
        assert isinstance(c, CheckedState)
        assert c.observes(Ref("acts", "ln1", 0)) and c.has(Ref("acts", "att", 1))
        assert c.module_of(Ref("acts", "ln1", 0)) is None
        assert c.not_observed() == []
    for model in (GPT2(TINY, params), KernelPort(TINY, params, load_kernels("numpy"))):
        assert isinstance(model, Reference)
        assert model.structure == [] and model.findings == [] and model.not_observed() == []


def test_a_state_without_part_of_the_interface_is_not_one():
    class Reads:   # the views, without observes/has/module_of/not_observed
        config = TINY
        params = grads = acts = grads_acts = {}
        params_memory = grads_memory = m_memory = v_memory = inputs = targets = None

    assert not isinstance(Reads(), CheckedState)
    assert isinstance(GPT2(TINY, synth.init_params(TINY, seed=0)), Reference)
    assert not isinstance(object(), Reference)


def test_a_kernel_port_does_not_observe_what_its_kernels_did_not_return():
    """Forward kernels only (torch, backward derived by autograd): attention's dpreatt and datt
    are never written, so the port observes neither, in any layer, and says so."""
    fwd = KernelSet({n: getattr(torch_kernels, n) for n in FORWARD_KERNELS}, backend="torch", name="fwd")
    port = KernelPort(TINY, synth.init_params(TINY, seed=0), fwd)
    inputs, targets = next(synth.batches(TINY, 2, 8))
    port.forward(inputs, targets)
    port.zero_grad()
    port.backward()
    assert not port.observes(Ref("grads_acts", "preatt", 0)) and port.observes(Ref("grads_acts", "qkv", 0))
    assert port.has(Ref("grads_acts", "preatt", 0))   # held (derived), not compared
    assert port.not_observed() == ["grads_acts.preatt", "grads_acts.att"]
    numpy_port = KernelPort(TINY, synth.init_params(TINY, seed=0), load_kernels("numpy"))
    numpy_port.step(inputs, targets, AdamW())
    assert numpy_port.not_observed() == []


def test_unobserved_names_the_layers_only_where_some_are_seen():
    missing = {("acts", "ln1_mean"), ("grads_acts", "att")}

    def observes(ref):
        return (ref.group, ref.name) not in missing or (ref.name == "att" and ref.layer != 0)

    assert unobserved(TINY, observes) == ["acts.ln1_mean", "grads_acts.att (layers 0)"]
    assert unobserved(TINY, lambda ref: True) == []
    assert np.all([isinstance(x, str) for x in unobserved(TINY, lambda ref: False)])
