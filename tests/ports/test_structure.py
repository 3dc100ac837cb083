"""Ports whose module names are not nanoGPT's (tests/ports/qkv_split_ports.py): separate q,
k, v projections and the OPT/Llama-style names, and a port with names of its own. Their
parameters are placed by name, by shape, or by a map that slices the C's qkv and adds to
the recognition; their activations are seen at the modules holding the mapped parameters
and, for what no module shows, found by value; a planted bug is localised at its op."""
from __future__ import annotations

import pytest
import torch.nn.functional as F

from harness import ModelError, TorchModel, map_parameters, run_parity
from harness.ports import parse_slot
from harness.checks.results import first_divergence_check, first_structure
from harness.ports.torchmodel import build_model
from pyref import synth
from pyref.config import PRESETS

import heldout_fused as h6
import model_ports as mp
import qkv_split_ports as qs
import structure_ports as sp

TINY = PRESETS["tiny"]
# the graph's activations at a module boundary of a nanoGPT-named port, and their gradients
BOUNDARY = ["encoded", "ln1", "qkv", "atty", "attproj", "residual2", "ln2", "fch", "fch_gelu", "fcproj",
            "residual3", "lnf", "logits"]
C = TINY.channels
# the lettered port's q, k, v projections, mapped onto the rows of the C's qkvw (their
# biases follow: a module's bias goes with its weight)
LETTERS = {f"layers.{l}.self_attn.{name}.weight": f"qkvw[{l}][{rows}]" for l in range(TINY.num_layers)
           for name, rows in (("first", "0:C"), ("second", "C:2C"), ("third", "2C:3C"))}


def run(factory, mapping=None, steps=1):
    return run_parity(TINY, synth.init_params(TINY, seed=0), synth.batches(TINY, 2, 8), steps=steps,
                      models={"port": TorchModel(factory, mapping=mapping)})


def replays(report):
    return sum(c.kind == "replay" for s in report.steps for c in s.checks if c.impl == "port")


@pytest.fixture(scope="module")
def nanogpt():
    return run(mp.GPT)


@pytest.mark.parametrize("factory, mapping", [(qs.DecoderLM, None), (qs.Pondering, qs.NORMS),
                                              (qs.lettered, LETTERS), (qs.Pondering, None), (qs.lettered, None)],
                         ids=["split-qkv", "own-names", "lettered", "own-names-by-use", "lettered-by-use"])
def test_unmodified_port_passes_with_every_activation_observed(factory, mapping, nanogpt):
    report = run(factory, mapping, steps=2)
    bad = [(c.tensor, c.where) for s in report.steps for c in s.checks if not c.passed]
    assert report.passed and not bad, bad
    unseen = set(report.not_observed["port"])
    assert not unseen & {f"{g}.{a}" for a in BOUNDARY for g in ("acts", "grads_acts")}, unseen
    # as much as a nanoGPT-named port shows, or more (a layer norm's mean and rstd found by value)
    assert unseen <= set(nanogpt.not_observed["port"]) and "acts.ln1_mean" not in unseen, unseen
    assert replays(report) >= replays(nanogpt) > 50


def test_separate_qkv_are_the_rows_of_the_c_qkv_both_ways():
    from harness import AdamW, ModelState
    params = synth.init_params(TINY, seed=3)
    state = ModelState(TINY, params, TorchModel(qs.DecoderLM), AdamW())
    attn = state.model.layers[1].self_attn
    for i, p in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        assert (p.weight.detach().numpy() == state.params["qkvw"][1][i * C:(i + 1) * C]).all()
        assert (p.bias.detach().numpy() == state.params["qkvb"][1][i * C:(i + 1) * C]).all()
    inputs, targets = next(synth.batches(TINY, 2, 8))
    state.forward(inputs, targets)
    state.zero_grad()
    state.backward()
    assert (attn.v_proj.weight.grad.numpy() == state.grads["qkvw"][1][2 * C:]).all()
    assert (state.grads["qkvw"][1][:C] != 0).any()


@pytest.mark.parametrize("factory, where, cause", [
    (qs.no_mask, "layer 0 attention attention_forward", "attention.no-causal-mask"),
    (qs.erf_gelu, "layer 0 gelu gelu_forward", "gelu.erf"),
])
def test_planted_bug_is_localised_at_its_op(factory, where, cause):
    report = run(factory)
    assert not report.passed
    step = report.steps[0]
    c = first_divergence_check([c for c in step.checks if c.impl == "port"])
    assert c.kind == "replay" and c.where.startswith(where), (c.kind, c.where)
    assert where in step.first_divergence["port"]
    assert c.diagnosis is not None and c.diagnosis.causes[0].id == cause
    assert "qkv_split_ports.py:" in step.first_divergence["port"]      # pinned to the port's line


def test_a_slice_map_adds_to_the_recognition():
    model = build_model(qs.lettered, TINY)
    with pytest.raises(ModelError, match=r"self_attn\.first\.weight"):
        map_parameters(model, TINY, uses=False)      # names and shapes alone cannot tell q, k, v
    # their use can: the three (C, C) products of one input, in the order used, and o_proj
    used = {e.names[0]: str(e.slot) for e in map_parameters(model, TINY)}
    assert all(used[k] == str(parse_slot(v, TINY)) for k, v in LETTERS.items()), used
    entries = {e.names[0]: str(e.slot) for e in map_parameters(model, TINY, LETTERS)}
    assert entries["layers.1.self_attn.second.weight"] == f"qkvw[1][{C}:{2 * C}]"
    assert entries["layers.1.self_attn.second.bias"] == f"qkvb[1][{C}:{2 * C}]"
    assert entries["layers.0.norm2.weight"] == "ln2w[0]" and entries["final_norm.bias"] == "lnfb"
    # a map overrides what a name says
    swapped = {"layers.0.norm1.weight": "ln2w[0]", "layers.0.norm2.weight": "ln1w[0]"}
    entries = {e.names[0]: str(e.slot) for e in map_parameters(build_model(qs.DecoderLM, TINY), TINY, swapped)}
    assert entries["layers.0.norm1.weight"] == "ln2w[0]" and entries["layers.0.norm1.bias"] == "ln1b[0]"


def test_k_and_v_rows_swapped_fail_at_the_attention():
    wrong = dict(LETTERS)
    for l in range(TINY.num_layers):
        wrong[f"layers.{l}.self_attn.second.weight"] = f"qkvw[{l}][2C:3C]"
        wrong[f"layers.{l}.self_attn.third.weight"] = f"qkvw[{l}][C:2C]"
    report = run(qs.lettered, wrong)
    assert not report.passed
    assert "layer 0 attention attention_forward" in report.steps[0].first_divergence["port"]


def test_ambiguous_and_bad_maps_are_refused_in_one_line():
    model = build_model(qs.Pondering, TINY)
    with pytest.raises(ModelError) as e:
        map_parameters(model, TINY, uses=False)
    text = str(e.value)
    assert "\n" not in text
    assert "'trunk.0.before_mix.weight' (48,) matches no C tensor by name and by shape could be ln1w[0] or ln2w[0]" \
        in text and "map it, e.g. {'trunk.0.before_mix.weight': 'ln1w[0]'}" in text, text
    # two parameters on the same rows; rows left uncovered
    overlap = dict(LETTERS, **{"layers.0.self_attn.third.weight": "qkvw[0][C:2C]"})
    with pytest.raises(ModelError, match=r"both hold qkvw\[0\]\[48:96\].*missing: no parameter holds "
                                         r"qkvw\[0\]\[96:144\]"):
        map_parameters(build_model(qs.lettered, TINY), TINY, overlap)
    with pytest.raises(ModelError, match="slice bound 'D'"):
        map_parameters(build_model(qs.lettered, TINY), TINY, {"layers.0.self_attn.first.weight": "qkvw[0][0:D]"})


def test_census_names_modules_found_by_what_they_hold():
    """A block whose norm2 is skipped (norm1 feeds the MLP too): never called, by its name
    found from the parameter it holds, not from a family's name."""
    from harness import AdamW, ModelState
    state = ModelState(TINY, synth.init_params(TINY, seed=0), TorchModel(qs.DecoderLM), AdamW())
    layer = state.model.layers[1]
    layer.norm2.forward = lambda x: x      # noqa: E731  (an instance attribute: the hooks still see a call)
    layer.forward = lambda x: (lambda h: h + layer.ffn(layer.norm1(h)))(x + layer.self_attn(layer.norm1(x)))
    inputs, targets = next(synth.batches(TINY, 2, 8))
    state.forward(inputs, targets)
    found = {(f.id, f.module, f.where) for f in state.structure}
    assert ("structure.never-called", "layers.1.norm2", "layer 1 ln2 layernorm_forward") in found, found
    assert ("structure.called-more", "layers.1.norm1", "layer 1 ln1 layernorm_forward") in found, found


# ----------------------------------------------------------------------------- modules outside the graph

class RawAttention(mp.nn.Module):
    """nanoGPT's attention on raw parameters: one ``F.linear`` on a (3C, C) ``nn.Parameter``,
    then the projection's; ``scale`` (None: 1/sqrt(hs)) the scores' factor."""

    def __init__(self, C, n_head, scale=None):
        super().__init__()
        self.n_head, self.scale = n_head, scale
        self.w_qkv = mp.nn.Parameter(mp.torch.zeros(3 * C, C))
        self.b_qkv = mp.nn.Parameter(mp.torch.zeros(3 * C))
        self.w_out = mp.nn.Parameter(mp.torch.zeros(C, C))
        self.b_out = mp.nn.Parameter(mp.torch.zeros(C))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2)
                   for t in mp.F.linear(x, self.w_qkv, self.b_qkv).split(C, dim=2))
        y = mp.F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return mp.F.linear(y.transpose(1, 2).reshape(B, T, C), self.w_out, self.b_out)


RAW = {f"transformer.h.{l}.attn.{name}": f"{slot}[{l}]" for l in range(TINY.num_layers)
       for name, slot in (("w_qkv", "qkvw"), ("b_qkv", "qkvb"), ("w_out", "attprojw"), ("b_out", "attprojb"))}


def raw_attention(scale=None):
    """nanoGPT with every block's attention a :class:`RawAttention`."""
    def factory(config):
        model = mp.GPT(config)
        for block in model.transformer.h:
            block.attn = RawAttention(config.n_embd, config.n_head, scale)
        return model
    return factory


class Rescale(mp.nn.Module):
    """A module GPT-2's graph has no op for: the residual stream times 1.5."""

    def forward(self, x):
        return 1.5 * x


def rescaled(config):
    """nanoGPT whose dropout after the embeddings is a :class:`Rescale` (the math changed)."""
    model = mp.GPT(config)
    model.transformer.drop = Rescale()
    return model


def test_a_module_holding_c_tensors_is_in_the_graph():
    """An attention on raw parameters mapped to qkvw and attprojw computes the graph's ops:
    the unmodified port has no structural finding, and with a wrong scale in it the first
    divergence is numeric (the qkv, which it computes inside, found by value and right; the
    attention's output, the input of its projection by attprojw, found by use and off: the
    attention's replay fails), not a structure.unknown-module at the module."""
    right = run(raw_attention(), RAW)
    assert right.passed and not right.steps[0].structure.get("port"), right.steps[0].structure
    assert "acts.qkv" not in right.not_observed["port"]
    wrong = run(raw_attention(scale=1.0 / C), RAW)
    step = wrong.steps[0]
    assert not wrong.passed and not step.structure.get("port"), step.structure
    failing = [c for c in step.checks if c.impl == "port" and not c.passed]
    first = first_divergence_check(failing)
    assert (first.kind, first.where.split(" [")[0]) == ("replay", "layer 0 attention attention_forward")
    assert "[structure." not in wrong.first_divergence()
    assert "acts.qkv[layer 0]" not in {c.tensor for c in failing}
    assert "acts.residual2[layer 0]" in {c.tensor for c in failing if c.kind == "e2e"}


def test_a_module_outside_the_graph_is_a_finding_beside_the_numbers():
    """A parameterless module that changes the residual stream is structure.unknown-module,
    a finding of the step; the first divergence is the numeric failure it makes (a finding
    of that kind outranks no failing check)."""
    report = run(rescaled)
    step = report.steps[0]
    f = first_structure(step.structure.get("port"))
    assert not report.passed and f is not None
    assert (f.id, f.module, f.values["type"]) == ("structure.unknown-module", "transformer.drop", "Rescale")
    assert first_structure(step.structure["port"], first_divergence_check(step.checks)) is None
    assert "[structure.unknown-module]" not in report.first_divergence()


class Passthrough(mp.nn.Module):
    """A module GPT-2's graph has no op for, that computes nothing (a port's own hook point)."""

    def forward(self, x):
        return x


def passthrough(base=mp.GPT):
    """``base`` whose dropout after the embeddings is a :class:`Passthrough`."""
    def factory(config):
        model = base(config)
        model.transformer.drop = Passthrough()
        return model
    return factory


def test_an_unknown_module_does_not_outrank_a_failing_check(monkeypatch):
    """A harmless module outside the graph passes as a finding; with a mistake elsewhere (a
    layer norm's eps) the first divergence is the layer norm's, not the module's finding
    (which stays in the step's structure). Ranked as before, the finding is named instead."""
    from harness.ports import census
    right = run(passthrough())
    assert right.passed and [f.id for f in right.steps[0].structure["port"]] == ["structure.unknown-module"]
    wrong = run(passthrough(mp.GPT.variant(eps=1e-3)))
    assert not wrong.passed and "structure.unknown-module" in {f.id for f in wrong.steps[0].structure["port"]}
    assert "layernorm_forward" in wrong.first_divergence() and "[structure." not in wrong.first_divergence()
    monkeypatch.setattr(census, "BESIDE", ())
    assert "[structure.unknown-module]" in run(passthrough(mp.GPT.variant(eps=1e-3))).first_divergence()


class Squash(mp.nn.Module):
    """The tanh GELU, by hand, under a name of its own."""

    def forward(self, x):
        return 0.5 * x * (1.0 + mp.torch.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


class Gelu(Squash):
    pass


class OwnMLP(mp.nn.Module):
    """nanoGPT's MLP with its activation a parameterless module at ``attr``."""

    def __init__(self, n_embd, act, attr):
        super().__init__()
        self.c_fc, self.c_proj, self.attr = mp.nn.Linear(n_embd, 4 * n_embd), mp.nn.Linear(4 * n_embd, n_embd), attr
        setattr(self, attr, act())

    def forward(self, x):
        return self.c_proj(getattr(self, self.attr)(self.c_fc(x)))


def own_act(act, attr):
    def factory(config):
        model = mp.GPT(config)
        for block in model.transformer.h:
            block.mlp = OwnMLP(config.n_embd, act, attr)
        return model
    return factory


def test_a_parameterless_module_whose_output_the_projection_multiplies_is_the_gelu(monkeypatch):
    """An MLP's activation module of a class and name of its own is the graph's GELU by use:
    its output is what the layer's fcproj multiplies. The port passes with no finding; not
    followed by use, it is a structure.unknown-module."""
    from harness.ports import census
    report = run(own_act(Squash, "squash"))
    assert report.passed and not report.steps[0].structure.get("port"), report.steps[0].structure
    monkeypatch.setattr(census, "_storage", lambda t: None)
    found = run(own_act(Squash, "squash")).steps[0].structure["port"]
    assert {(f.id, f.values["type"]) for f in found} == {("structure.unknown-module", "Squash")}


@pytest.mark.parametrize("act, attr, known", [(Gelu, "squash", True), (Squash, "act", True),
                                              (Squash, "squash", False)])
def test_a_parameterless_module_named_for_a_gelu_is_the_gelu(monkeypatch, act, attr, known):
    """Not followed by use, an MLP's activation module is the graph's GELU by its class's
    name (``Gelu``) or its attribute's (``act``) inside the MLP; by neither, unknown."""
    from harness.ports import census
    monkeypatch.setattr(census, "_storage", lambda t: None)
    found = run(own_act(act, attr)).steps[0].structure.get("port")
    assert (not found) == known, found


def test_raw_parameters_of_a_block_are_placed_by_a_shape_only_they_have():
    """A block's raw parameters (no weight's or bias's name: ``w_qkv``, ``b_qkv``, ``w_out``,
    ``b_out``) are placed by shape among the block's C tensors no name placed: the (3C, C)
    one is the qkv weight, and the (C,) bias the projection's once the norms' are named; the
    port passes with no map. A raw parameter outside the blocks is still refused."""
    model = build_model(raw_attention(), TINY)
    slots = {n: str(e.slot) for e in map_parameters(model, TINY) for n in e.names}
    assert all(slots[k] == v for k, v in RAW.items()), slots
    assert run(raw_attention()).passed
    model.transformer.extra = mp.nn.Module()
    model.transformer.extra.w_raw = mp.nn.Parameter(mp.torch.zeros(3 * C, C))
    with pytest.raises(ModelError, match=r"extra parameter transformer\.extra\.w_raw"):
        map_parameters(model, TINY)


# ----------------------------------------------------------------------------- any structure, by use (issue 30, point 4)

def _every_activation_observed(report, nanogpt):
    bad = [(c.tensor, c.where) for s in report.steps for c in s.checks if not c.passed]
    assert report.passed and not bad, bad
    assert not report.findings["port"], report.findings["port"]
    unseen = set(report.not_observed["port"])
    assert not unseen & {f"{g}.{a}" for a in BOUNDARY for g in ("acts", "grads_acts")}, unseen
    assert unseen <= set(nanogpt.not_observed["port"]), unseen


def test_block_keys_of_a_module_dict():
    """A ModuleDict's key ending in digits is its block's index; a module's own name with a
    digit in it (fc1, w2, norm1, ln_1) is not."""
    from harness.ports.families import block_key, split_name
    assert [block_key(k) for k in ("stage0", "layer_3", "block-2", "h11", "7")] == [0, 3, 2, 11, 7]
    assert [block_key(k) for k in ("fc1", "w2", "norm1", "ln_1", "ln2", "mlp", "stack")] == [None] * 7
    assert split_name("stack.stage1.ffn.widen.weight")[:2] == (1, ["ffn", "widen"])
    assert split_name("layers.0.ffn.fc1.weight")[:2] == (0, ["ffn", "fc1"])


def test_heldout_fused_maps_by_use_and_passes_with_no_map(nanogpt):
    """BUGS8's model (tests/ports/heldout_fused.py, unmodified) with no map: its norms'
    gain/shift, the raw (3C, C) w_in through F.linear, widen/narrow, lexicon/placement and
    norm_out placed by their use, as its hand-written C_NAMES map places them; it passes with
    every graph activation observed. Names and shapes alone cannot place it."""
    model = build_model(h6.FusedGPT, TINY)
    with pytest.raises(ModelError, match=r"norm_a\.gain.*could be ln1w\[0\] or ln2w\[0\]"):
        map_parameters(model, TINY, uses=False)
    placed = {e.names[0]: str(e.slot) for e in map_parameters(model, TINY)}
    assert placed == {n: h6.c_slot(n, None) for n in placed}, placed
    _every_activation_observed(run(h6.FusedGPT), nanogpt)


@pytest.mark.parametrize("factory", [sp.functional("dict"), sp.functional("list"), sp.functional("attrs"), sp.MHAGPT],
                         ids=["parameter-dict", "parameter-list", "raw-attributes", "multihead-attention"])
def test_any_structure_passes_with_no_map_and_every_activation_observed(factory, nanogpt):
    """A functional port (no module per layer: its parameters in a ParameterDict, a
    ParameterList or raw attributes of the model, the forward F.linear/F.layer_norm/@ on
    them) and an nn.MultiheadAttention port (whose out_proj its parent applies without
    calling it: no never-called finding) map with no map and pass, every activation seen."""
    report = run(factory)
    _every_activation_observed(report, nanogpt)
    if factory is sp.MHAGPT:
        slots = {n: str(e.slot) for e in map_parameters(build_model(factory, TINY), TINY) for n in e.names}
        assert slots["tower.1.attend.in_proj_weight"] == "qkvw[1]" and slots["tower.1.pre.bias"] == "ln1b[1]"
        assert slots["tower.0.attend.out_proj.bias"] == "attprojb[0]" and slots["closing.weight"] == "lnfw"


@pytest.mark.parametrize("factory, where, cause", [
    (sp.functional("list", gelu="erf"), "layer 0 gelu gelu_forward", "gelu.erf"),
    (sp.mha_unmasked, "layer 0 attention attention_forward", "attention.no-causal-mask"),
], ids=["functional-erf-gelu", "mha-no-mask"])
def test_any_structure_wrong_variant_fails_at_its_op(factory, where, cause):
    """The activations no module boundary shows are taken where the forward computes them
    by the mapped parameters (a product's input: the GELU's output, attention's), so a
    wrong op is judged on its own inputs: replayed, named and pinned to its line."""
    report = run(factory)
    assert not report.passed
    step = report.steps[0]
    c = first_divergence_check([c for c in step.checks if c.impl == "port"])
    assert c.kind == "replay" and c.where.startswith(where), (c.kind, c.where)
    assert c.diagnosis is not None and c.diagnosis.causes[0].id == cause
    assert "structure_ports.py:" in step.first_divergence["port"]


def test_what_use_cannot_settle_is_refused_in_one_line():
    """A functional port whose final norm is skipped (2L norms where the forward should use
    2L + 1: which is which cannot be told) is refused naming what to map; one whose
    forward raises says so."""
    class Skipped(sp.FunctionalGPT):
        def forward(self, idx, targets):
            x = F.embedding(idx, self.w("vocab")) + self.w("where")[:idx.shape[1]]
            for l in range(self.L):
                x = x + self.attention(F.layer_norm(x, (self.C,), self.w(f"pre_g{l}"), self.w(f"pre_s{l}")), l)
                x = x + self.mlp(F.layer_norm(x, (self.C,), self.w(f"mid_g{l}"), self.w(f"mid_s{l}")), l)
            return x @ self.w("vocab").t(), None

    class Raises(sp.FunctionalGPT):
        def forward(self, idx, targets):
            raise RuntimeError("shapes do not match")

    with pytest.raises(ModelError) as e:
        map_parameters(Skipped(TINY), TINY)
    text = str(e.value)
    assert "\n" not in text and "p.pre_g0" in text and "(48,)" in text and "{'p.pre_g0': 'ln1w[0]'}" in text, text
    assert "p.mix_w0" not in text, text      # what the use placed is not asked for
    with pytest.raises(ModelError, match=r"raised RuntimeError: shapes do not match\)$"):
        map_parameters(Raises(TINY), TINY)


def test_a_parameter_without_gradient_departs_at_its_tensors_op():
    """A parameter the loss does not depend on, held by no module of the graph (a
    ParameterDict's table), is a finding at the graph's op of the C tensor it holds (the
    encoder for wpe, layer 1's fc for fcb[1]), not at no op."""
    import types
    import torch
    from harness.ports.census import Census
    from harness.ports.mapping import Slot
    model = torch.nn.Module()
    model.embed = torch.nn.ParameterDict({"positions": torch.nn.Parameter(torch.zeros(4, 2)),
                                          "bias": torch.nn.Parameter(torch.zeros(2))})
    entries = [types.SimpleNamespace(param=model.embed["positions"], names=["embed.positions"], slot=Slot("wpe")),
               types.SimpleNamespace(param=model.embed["bias"], names=["embed.bias"], slot=Slot("fcb", 1))]
    found = Census(model, TINY).gradient_findings(entries)
    assert [(f.id, f.where) for f in found] == [("structure.no-gradient", "encoder encoder_forward"),
                                                ("structure.no-gradient", "layer 1 fc matmul_forward")]


def test_a_sites_rows_are_told_past_rows_that_are_not_finite():
    """A site's row layout is told from the rows a batch element changes, those holding a
    NaN (a wrong mask's) set aside: batch-major with a NaN row in each batch element."""
    import numpy as np
    from harness.ports.usage import _rows
    a = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    b = a.copy()
    b[1] += 1.0
    a[:, 3, 0] = b[:, 3, 0] = np.nan
    assert _rows(a, b, 2, 4) == "bt"
    assert _rows(a.transpose(1, 0, 2).copy(), b.transpose(1, 0, 2).copy(), 2, 4) == "tb"


# ----------------------------------------------------------------------------- flattened paths, unused parameters, the encoder

def test_names_separated_by_slashes_map_by_name():
    """A ParameterDict keyed by Flax's flattened paths maps by name alone (no use recorded):
    ``kernel`` is a weight stored (in, out) (so transposed, the square projection too),
    ``scale`` a norm's weight, ``embedding`` a table; the bias of each kernel follows it."""
    from harness.ports.families import name_parts, split_name
    assert name_parts("params.layers/0/attn/proj/kernel") == ["params", "layers", "0", "attn", "proj", "kernel"]
    assert split_name("params.layers/1/mlp/fc2/bias")[:2] == (1, ["mlp", "fc2"])
    slots = {e.names[0]: str(e.slot) for e in map_parameters(build_model(sp.slash(), TINY), TINY, uses=False)}
    assert slots["params.layers/0/attn/proj/kernel"] == "attprojw[0].T", slots
    assert slots["params.layers/1/attn/qkv/kernel"] == "qkvw[1].T" and slots["params.layers/1/attn/qkv/bias"] == "qkvb[1]"
    assert slots["params.layers/0/norm2/scale"] == "ln2w[0]" and slots["params.final_norm/bias"] == "lnfb"
    assert slots["params.tok/embedding"] == "wte" and slots["params.pos/embedding"] == "wpe"


def test_slash_named_port_passes_with_every_activation_observed(nanogpt):
    """The flattened-path port, unmodified, passes with every graph activation observed
    (the encoder's output taken where the forward adds the two tables' lookups)."""
    _every_activation_observed(run(sp.slash()), nanogpt)


@pytest.mark.parametrize("factory, names", [
    (sp.slash("no-out-bias"), {"params.layers/0/attn/proj/bias": "attprojb[0]"}),
    (sp.functional_without_out_bias, {"p.back_s0": "attprojb[0]", "p.back_s1": "attprojb[1]"}),
], ids=["by-name", "by-use-then-shape"])
def test_a_parameter_never_used_is_placed_and_found_without_gradient(factory, names):
    """A parameter the forward never reads (an output bias left out) is placed, by its name
    or, where use places the rest, by the one C tensor of its block its shape leaves; the
    run then departs at that tensor's op with a no-gradient finding, not a refusal."""
    slots = {e.names[0]: str(e.slot) for e in map_parameters(build_model(factory, TINY), TINY)}
    assert {n: slots.get(n) for n in names} == names, slots
    report = run(factory)
    assert not report.passed
    step = report.steps[0]
    assert step.first_divergence["port"].startswith("first divergence: layer 0 attproj matmul_forward"), \
        step.first_divergence
    assert any(f.id == "structure.no-gradient" for f in report.findings["port"]), report.findings["port"]


@pytest.mark.parametrize("mistake, where", [
    ("positions-offset", "encoder encoder_forward"), ("tokens-scaled", "encoder encoder_forward"),
    ("dropout-on", "layer 0 residual2 residual_forward"),
])
def test_an_activation_taken_by_use_is_judged_whatever_its_value(mistake, where):
    """The encoder's output is taken where the forward adds a table's lookup (scaled or not)
    to the other table's lookup or slice, and the residual where a product's output, past
    a dropout left on, is added: a wrong encoder or dropout departs there, its inputs exact."""
    report = run(sp.slash(mistake))
    assert not report.passed
    c = first_divergence_check([c for c in report.steps[0].checks if c.impl == "port"])
    assert c.kind == "replay" and c.where.startswith(where), (c.kind, c.where)
    assert "found by use" in report.steps[0].first_divergence["port"]
