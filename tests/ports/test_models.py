"""PyTorch models checked as their ports run them: parameters mapped from the C's, autograd,
torch.optim, activations seen at module boundaries, replay localisation, hygiene findings.
The three ports are in tests/ports/model_ports.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harness import AdamW, Hyper, ModelError, ModelState, TorchModel, map_parameters, run_parity
from harness.cli import main as cli_main
from pyref import numpy_kernels, synth
from pyref.config import PRESETS, GPT2Config

import model_ports as mp

pytest.importorskip("transformers")

TINY = PRESETS["tiny"]
# B*T = 15 (not a multiple of 8), one head, V < Vp
ODD = GPT2Config(max_seq_len=8, vocab_size=40, padded_vocab_size=64, num_layers=1, num_heads=1, channels=12)
PORTS = {"walkthrough": mp.WalkGPT2, "nanogpt": mp.GPT, "hf": mp.hf_gpt2}
HERE = Path(__file__).resolve().parent


def run_model(factory, cfg=TINY, B=4, T=16, steps=1, optimizer=None, **kw):
    return run_parity(cfg, synth.init_params(cfg, seed=0), synth.batches(cfg, B, T), steps=steps,
                      models={"port": TorchModel(factory, optimizer=optimizer)}, **kw)


def failures(report):
    return [f"{c.impl} {c.kind} {c.tensor} {c.where}: {c.comparison.message()}"
            for s in report.steps for c in s.checks if not c.passed] + \
        [f"error {e}" for s in report.steps for e in s.errors.values()]


@pytest.mark.parametrize("port", list(PORTS))
def test_port_passes_ten_steps(port):
    report = run_model(PORTS[port], steps=10, replay="on-failure")
    assert report.passed, "\n".join(failures(report)[:5])
    assert report.impls == ["C", "port"] and report.findings["port"] == []
    kinds = {c.kind for s in report.steps for c in s.checks if c.impl == "port"}
    assert kinds == {"e2e", "update", "loss"}
    losses = [s.losses["port"] for s in report.steps]
    assert losses[-1] < losses[0]
    # every parameter's gradient and update is checked
    tensors = {c.tensor.split("[")[0] for s in report.steps for c in s.checks if c.impl == "port"}
    assert {"grads.wte", "grads.qkvw", "params.wte (after update)", "m.lnfb (after update)"} <= tensors
    # module boundaries (nanoGPT, HF) or the kernel calls (walkthrough) show the activations
    assert {"acts.ln1", "acts.qkv", "acts.atty", "acts.fch_gelu", "grads_acts.residual2"} <= tensors
    assert "acts.preatt" in report.not_observed["port"]


@pytest.mark.parametrize("port", list(PORTS))
def test_port_odd_shapes_and_one_head(port):
    report = run_model(PORTS[port], cfg=ODD, B=3, T=5, steps=2)
    assert report.passed, "\n".join(failures(report)[:5])
    assert any(c.kind == "replay" for s in report.steps for c in s.checks if c.impl == "port")


def _adamw(**kw):
    def factory(model, h):
        return torch.optim.AdamW(model.parameters(), lr=h.learning_rate, **kw)
    return factory


# planted bug -> (model, optimizer, where the first divergence must be, a finding that names it)
BUGS = {
    "dropout-on": (mp.hf_gpt2_defaults, None, "encoder encoder_forward [transformer.h.0 input]", "dropout"),
    "erf-gelu": (mp.GPT.variant(gelu="none"), None, "layer 0 gelu gelu_forward", "tanh approximation"),
    "ln-eps-1e-6": (mp.GPT.variant(eps=1e-6), None, "layer 0 ln1 layernorm_forward [transformer.h.0.ln_1]",
                    "eps 1e-06"),
    "softmax-over-Vp": (mp.WalkGPT2VocabBug, None, "softmax softmax_forward [model_ports.softmax_forward call]",
                        None),
    "labels-shifted-twice": (mp.GPT.variant(shift_labels=True), None,
                             "crossentropy crossentropy_softmax_backward [lm_head]", None),
    "adamw-default-decay": (mp.GPT, _adamw(betas=(0.9, 0.999)), "gpt2_update wte", "weight_decay=0.01"),
    "betas-0.95": (mp.GPT, _adamw(betas=(0.9, 0.95), weight_decay=0.1), "gpt2_update wte", "beta2=0.95"),
    "decay-2d-only": (mp.GPT, "configure_optimizers", "gpt2_update ln1w", "only some parameters"),
}


# the hygiene finding's id each names (a finding carries its identity as data)
HYGIENE_IDS = {"dropout-on": "hygiene.dropout", "ln-eps-1e-6": "hygiene.layernorm-eps",
               "adamw-default-decay": "hygiene.optimizer", "betas-0.95": "hygiene.optimizer",
               "decay-2d-only": "hygiene.decay-some"}


@pytest.mark.parametrize("bug", list(BUGS))
def test_planted_bug_is_localised(bug):
    factory, optimizer, where, finding = BUGS[bug]
    report = run_model(factory, optimizer=optimizer, B=2, T=8)
    assert not report.passed
    step = report.steps[0]
    assert "C" not in step.first_divergence
    text = step.first_divergence["port"]
    assert where in text, text
    if finding:
        assert any(finding in f for f in report.findings["port"]), report.findings
    if bug in HYGIENE_IDS:
        from harness import to_json
        details = to_json(report, versions=False)["finding_details"]["port"]
        assert any(d["id"] == HYGIENE_IDS[bug] and finding in d["description"] for d in details), details
    bad = [c for c in step.checks if not c.passed]
    assert bad and all(c.impl == "port" for c in bad)


def test_untied_head_is_refused_before_any_number():
    with pytest.raises(ModelError, match="untied head: .*lm_head.weight"):
        run_model(mp.GPT.variant(tied=False))


class _Renamed(torch.nn.Module):
    """The walkthrough's model under other names: needs an explicit mapping."""

    def __init__(self, cfg):
        super().__init__()
        self.inner = mp.WalkGPT2(cfg)
        self.tok = self.inner.wte   # the same tensor: one parameter, two names

    def forward(self, idx, targets):
        return self.inner(idx, targets)


def test_mapping_errors_are_clear():
    cfg = TINY
    model = mp.GPT(Hyper(cfg))
    model.extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ModelError, match=r"extra parameter extra \(3,\)"):
        map_parameters(model, cfg)
    model = mp.GPT(Hyper(cfg))
    del model.transformer.h[1].mlp.c_fc
    with pytest.raises(ModelError, match=r"missing: no parameter holds fcw\[1\], fcb\[1\]"):
        map_parameters(model, cfg)
    model = mp.WalkGPT2(cfg)
    model.ln1w = torch.nn.Parameter(torch.zeros(cfg.channels))
    with pytest.raises(ModelError, match=r"ln1w has shape \(48,\), ln1w needs \(2, 48\)"):
        map_parameters(model, cfg)
    with pytest.raises(ModelError, match="not a C parameter"):
        map_parameters(mp.WalkGPT2(cfg), cfg, mapping={"wte": "embedding"})


def test_explicit_mapping_and_bits_preserved():
    cfg = TINY
    # "inner.<C name>" and an alias "tok" of the same tensor as inner.wte
    mapping = lambda name, shape: "wte" if name == "tok" else name.rpartition(".")[2]
    params = synth.init_params(cfg, seed=3)
    state = ModelState(cfg, params, TorchModel(_Renamed, mapping=mapping), AdamW())
    assert np.array_equal(state.model.inner.qkvw.detach().numpy().view(np.uint32),
                          state.params["qkvw"].view(np.uint32))
    hf = ModelState(cfg, params, TorchModel(mp.hf_gpt2), AdamW())
    w = hf.model.transformer.h[1].attn.c_attn.weight.detach().numpy()
    assert np.array_equal(w.T.view(np.uint32), hf.params["qkvw"][1].view(np.uint32))  # Conv1D: transposed
    assert hf.model.transformer.wte.weight.shape[0] == cfg.vocab_size   # V rows of the C's Vp


def test_a_torch_model_state_is_a_reference():
    """ModelState has what run_parity drives and the checks read of any reference
    (harness.checks.modelstate.Reference), and says what it did not show the one way."""
    from harness.checks.modelstate import Reference
    from harness.graph import unobserved
    state = ModelState(TINY, synth.init_params(TINY, seed=0), TorchModel(mp.GPT), AdamW())
    inputs, targets = next(synth.batches(TINY, 2, 8))
    state.forward(inputs, targets)
    state.zero_grad()
    state.backward()
    assert isinstance(state, Reference)
    assert state.not_observed() == unobserved(TINY, state.observes)
    assert "grads_acts.att" in state.not_observed() and "acts.ln1" not in state.not_observed()


def test_cli_model_check(capsys):
    spec = f"{HERE / 'model_ports.py'}:GPT"
    assert cli_main(["run", "--model", spec, "--steps", "1", "--ref", "oracle", "-q", "-s"]) == 0
    out = capsys.readouterr().out
    assert "GPT" in out and "PASS" in out and "not observed [GPT]: acts.ln1_mean" in out
    bad = f"{HERE / 'model_ports.py'}:WalkGPT2VocabBug"
    assert cli_main(["run", "--model", bad, "--steps", "1", "--ref", "oracle", "-q", "-s"]) == 1
    assert "softmax softmax_forward [model_ports.softmax_forward call]" in capsys.readouterr().out
    assert cli_main(["run", "--model", f"{HERE / 'model_ports.py'}:nothing", "-q"]) == 2
    assert "no attribute 'nothing'" in capsys.readouterr().err


def test_report_json_carries_model_findings(tmp_path):
    from harness import to_json
    report = run_model(mp.GPT.variant(eps=1e-6), B=2, T=8, replay=False)
    data = to_json(report, versions=False)
    assert data["impls"] == ["C", "port"] and data["verdict"] == "fail"
    assert any("eps 1e-06" in f for f in data["findings"]["port"])
    assert "acts.att" in data["not_observed"]["port"]


# ----------------------------------------------------------------------------
# a kernel port with forward kernels only: backward by autograd through them

def _kernel_run(ks, steps=1, **kw):
    return run_parity(TINY, synth.init_params(TINY, seed=0), synth.batches(TINY, 4, 16), steps=steps,
                      impls={"walk": ks}, **kw)


def test_forward_only_kernel_port_is_checked_backward_by_autograd():
    """model_ports.py defines forward kernels only, two with the shapes passed explicitly
    (attention_forward(inp, B, T, C, NH), softmax_forward(logits)) and two returning their
    main output alone: loaded as it is, no adapter."""
    from harness import load_kernels
    ks = load_kernels(str(HERE / "model_ports.py"), fallback=True)
    assert ks.missing == ["adamw"]
    assert set(ks.derived) == {"encoder_backward", "layernorm_backward", "matmul_backward", "attention_backward",
                               "gelu_backward", "residual_backward", "crossentropy_softmax_backward"}
    report = _kernel_run(ks)
    assert report.passed, "\n".join(failures(report)[:5])
    replayed = {c.where.split(" [")[0] for s in report.steps for c in s.checks if c.impl == "walk" and c.kind == "replay"}
    assert {"layer 0 attention attention_backward", "layer 1 ln1 layernorm_backward",
            "crossentropy crossentropy_softmax_backward", "softmax softmax_forward"} <= replayed
    assert {"acts.att", "acts.ln1_mean", "grads_acts.preatt"} <= set(report.not_observed["walk"])
    assert report.derived["walk"] == ks.derived


def test_forward_only_kernel_port_bug_is_localised():
    """An attention scaled by 1/hs instead of 1/sqrt(hs): forward and (derived) backward fail
    there, and the first divergence names it."""
    from pyref.protocol import KernelSet, as_namespace
    funcs = {k: getattr(mp, k) for k in ("encoder_forward", "layernorm_forward", "matmul_forward", "gelu_forward",
                                         "residual_forward", "softmax_forward", "crossentropy_forward")}

    funcs["attention_forward"] = _scaled_attention
    ks = KernelSet.from_module(as_namespace(funcs, backend="torch"), name="bad", fallback=numpy_kernels)
    report = _kernel_run(ks)
    text = report.steps[0].first_divergence["walk"]
    assert "layer 0 attention attention_forward" in text and "inputs exact" in text, text


def _scaled_attention(inp, B, T, C, NH):
    hs = C // NH
    q, k, v = inp.split(C, dim=-1)
    q, k, v = (x.reshape(B, T, NH, hs).transpose(1, 2) for x in (q, k, v))
    att = (q @ k.transpose(-2, -1)) / hs          # the bug: 1/hs, not 1/sqrt(hs)
    att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    return (att @ v).transpose(1, 2).reshape(B, T, C)


def test_ops_table_checks_derived_backward_kernels(capsys):
    assert cli_main(["ops", "--impl", str(HERE / "model_ports.py"), "-k", "attention_backward",
                     "-k", "crossentropy_softmax_backward", "-k", "layernorm"]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and "not checked for model_ports: adamw" not in out


# ----------------------------------------------------------------------------
# free-running trajectories

def test_free_run_bounds_every_implementation_by_the_witness():
    from harness import free_run, free_run_table, load_kernels
    steps = 4
    rows = free_run(TINY, synth.init_params(TINY, seed=0), [synth.make_batch(TINY, 4, 16, seed=i) for i in range(steps)],
                    lib=None, impls={"numpy": load_kernels("numpy")},
                    models={"GPT": TorchModel(mp.GPT),
                            "betas95": TorchModel(mp.GPT, optimizer=_adamw(betas=(0.9, 0.95), weight_decay=0.1))})
    table = free_run_table(rows)
    assert len(rows) == 4 * steps
    by = {(r.impl, r.step): r for r in rows}
    for impl in ("C", "numpy", "GPT"):
        assert all(by[impl, t].passed for t in range(1, steps + 1)), table
    # the bound grows with the witness's own drift, step by step
    assert by["C", steps].param_bound > by["C", 1].param_bound
    # other betas leave v, so the trajectory, from step 2 on
    assert by["betas95", 1].passed and not by["betas95", 2].passed, table
    assert by["betas95", steps].param_norm_rel > 10 * by["betas95", steps].param_bound


def test_cli_free_run(tmp_path, capsys):
    import json
    out = tmp_path / "r.json"
    rc = cli_main(["run", "--model", f"{HERE / 'model_ports.py'}:GPT", "--ref", "oracle", "--steps", "1",
                   "--free-run", "2", "--replay", "never", "-q", "-s", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "free run: each implementation on its own state" in text
    data = json.loads(out.read_text())
    assert [(r["impl"], r["step"]) for r in data["free_run"]] == [("C", 1), ("GPT", 1), ("C", 2), ("GPT", 2)]
    assert all(r["passed"] for r in data["free_run"])


# ----------------------------------------------------------------------------
# hygiene findings

def _tf32(cfg):
    torch.set_float32_matmul_precision("high")
    return mp.GPT(Hyper(cfg))


@pytest.mark.parametrize("case, factory, finding, where", [
    ("float64", lambda cfg: mp.GPT(Hyper(cfg)).double(), "torch.float64, not float32", None),
    ("tf32", _tf32, "float32_matmul_precision='high'", None),
    ("unscaled-attention", lambda cfg: mp.hf_gpt2(cfg, scale_attn_weights=False), "not scaled",
     "layer 0 attention attention_forward"),
    ("eval-mode-dropout", lambda cfg: mp.hf_gpt2_defaults(cfg).eval(), None, None),
])
def test_hygiene_findings(case, factory, finding, where):
    try:
        report = run_model(factory, B=2, T=8)
    finally:
        torch.set_float32_matmul_precision("highest")
    found = report.findings["port"]
    if finding is None:
        assert found == [] and report.passed, (found, failures(report)[:3])   # dropout is off in eval mode
    else:
        hygiene = [f for f in found if f.id.startswith("hygiene.")]
        assert len(hygiene) == 1 and finding in hygiene[0], found
        # a port that ran below float32 (TF32 here) is judged at that precision, and says so
        judged = {f.id for f in found if f.id.startswith("precision.")}
        assert judged == ({"precision.judged-at", "precision.reach"} if case == "tf32" else set()), found
    if where:
        assert where in report.steps[0].first_divergence["port"]


def _frozen_ln(cfg):
    model = mp.GPT(Hyper(cfg))
    model.transformer.ln_f.weight.requires_grad_(False)
    return model


def test_frozen_parameter_is_a_finding_and_fails():
    report = run_model(_frozen_ln, B=2, T=8, replay=False)
    assert any("ln_f.weight requires_grad=False" in f for f in report.findings["port"])
    bad = {c.tensor for s in report.steps for c in s.checks if not c.passed}
    assert "grads.lnfw" in bad


def test_kernel_signatures_by_name_on_numpy_too():
    """attention_forward(inp, B, T, C, NH) returning its output alone and softmax_forward(logits)
    work for a NumPy port as well; what they do not return is not compared; a signature whose
    names say nothing is not guessed."""
    from harness import check_kernel, make_inputs
    from pyref.cases import SHAPES
    from pyref.spec import SPEC
    from pyref.protocol import KernelSet, as_namespace

    def attention_forward(inp, B, T, C, NH):
        return numpy_kernels.attention_forward(inp, NH)[0]

    def softmax_forward(logits):
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    ks = KernelSet.from_module(as_namespace({"attention_forward": attention_forward,
                                             "softmax_forward": softmax_forward}), name="np-port")
    s = SHAPES[0]
    for kernel in ("attention_forward", "softmax_forward"):
        results = check_kernel(ks, kernel, make_inputs(SPEC[kernel], s, 0))
        assert results and all(c.passed for c in results), [c.message() for c in results if not c.passed]
    assert ("attention_forward", "att") in ks.not_returned
    vague = KernelSet.from_module(as_namespace({"attention_forward": lambda x, a, b, c, d: x}), name="vague")
    with pytest.raises(TypeError, match="vague.attention_forward"):
        vague.attention_forward(np.zeros((1, 2, 6), np.float32), 2)


def _literal_adamw(betas):
    """An optimizer as a port writes it: the settings as Python literals (doubles), not the
    C's floats."""
    def make(model, hyper):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=betas, eps=1e-8, weight_decay=0.1)
    return make


def test_an_adamw_with_literal_settings_is_judged_at_the_settings_it_holds():
    """torch's AdamW keeps betas=(0.9, 0.999) as doubles: 1 - 0.9 differs from the C's
    1.0f - 0.9f by 2.4e-7 relative, more than an update's rounding. The same settings up
    to float rounding are judged as held (no false alarm over two steps); another beta2 is
    not (0.95 fails at v and is named), and the C's floats alone would fail the right one."""
    report = run_model(mp.GPT, steps=2, optimizer=_literal_adamw((0.9, 0.999)), replay="on-failure")
    assert report.passed, "\n".join(failures(report)[:5])
    wrong = run_model(mp.GPT, steps=1, optimizer=_literal_adamw((0.9, 0.95)), replay="on-failure")
    failed = [c for c in wrong.steps[0].checks if c.impl == "port" and not c.passed]
    assert failed and {c.ref.group for c in failed} <= {"v", "params"}, failed[:3]
    assert any(c.diagnosis is not None and c.diagnosis.known for c in failed)


def test_the_cs_floats_alone_would_fail_a_correct_literal_adamw(monkeypatch):
    """The check the test above relies on can fail: with the held settings ignored (the
    C's floats for every port), the correct literal-settings AdamW fails at m."""
    from harness.ports.torchstate import ModelState
    monkeypatch.setattr(ModelState, "held_settings", lambda self: {})
    report = run_model(mp.GPT, steps=1, optimizer=_literal_adamw((0.9, 0.999)), replay="on-failure")
    assert not report.passed and any(c.ref.group == "m" for s in report.steps for c in s.checks if not c.passed)
