"""Ordinary port bugs of a nanoGPT-style model, each caught, localised and named.

Every bug is a variant of tests/ports/model_ports.py (``GPT.variant(...)``: attention, GELU,
layer norm, embeddings, loss, structure) run for one step from the C's state. Each must
fail, with no error line, its first divergence at the right module (or the graph's op
whose module shows it), and its explanation (the first divergence's diagnosis, or the
structural census's finding) the right cause, with the fitted constant where there is one.
The unmodified ports have no finding and no diagnosis (tests/ports/test_models.py runs them ten
steps). tests/ports/heldout_einsum_sdpa.py has two more models and tests/ports/heldout_baddbmm.py a fourth, each
written differently, with other mistakes of the same kinds in batches run once untuned
before the catalogue learnt from them: FIRST_RUNS records each batch's first run.
tests/ports/heldout_qkv.py has a fifth (separate q/k/v projections, names of its own) and
BUGS7, whose first run (test_heldout7_first_run_is_recorded) also counts the failures pinned
to the mistake's line of the port.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import pytest

from harness import TorchModel, run_parity, to_json
from harness.checks.results import first_divergence_check, first_structure
from pyref import synth
from pyref.config import PRESETS

import heldout_baddbmm as h4
import heldout_einsum_sdpa as ho
import heldout_flax as h11
import heldout_fused as h6
import heldout_headloop as h7
import heldout_litgpt as h8
import heldout_qkv as h5
import model_ports as mp

TINY = PRESETS["tiny"]
V = mp.GPT.variant

# bug -> (model, where the first divergence must be, the cause's id, its fitted value or None)
BUGS = {
    "heads-merged-without-transpose": (V(attn=dict(merge_no_transpose=True)), "layer 0 attention attention_forward",
                                       "attention.layout", None),
    "qkv-order-kqv": (V(attn=dict(qkv_order="kqv")), "layer 0 attention attention_forward",
                      "attention.qkv-order.q-k-swapped", None),
    "scale-by-sqrt-C": (V(attn=dict(scale=1 / math.sqrt(48))), "layer 0 attention attention_forward", "attention.scale",
                        1 / math.sqrt(48)),
    "scale-by-hs": (V(attn=dict(scale=1 / 12)), "layer 0 attention attention_forward", "attention.scale=1/hs", 1 / 12),
    "mask-off-by-one": (V(attn=dict(diagonal=1)), "layer 0 attention attention_forward", "attention.mask-diagonal",
                        None),
    "no-causal-mask": (V(attn=dict(no_mask=True)), "layer 0 attention attention_forward", "attention.no-causal-mask",
                       None),
    "softmax-over-queries": (V(attn=dict(softmax_dim=-2)), "layer 0 attention attention_forward",
                             "attention.softmax-axis", None),
    "gelu-erf": (V(gelu="none"), "layer 0 gelu gelu_forward", "gelu.erf", None),
    "layernorm-eps": (V(eps=1e-6), "layer 0 ln1 layernorm_forward [transformer.h.0.ln_1]", "layernorm.eps=1e-06",
                      None),
    "positions-from-1": (V(pos_offset=1), "encoder encoder_forward", "embedding.position-shift", None),
    "label-smoothing": (V(label_smoothing=0.1), "crossentropy crossentropy_softmax_backward",
                        "crossentropy.label-smoothing", 0.1),
    "loss-summed": (V(loss_reduction="sum"), "crossentropy crossentropy_softmax_backward", "crossentropy.divisor",
                    None),
    "ignored-positions": (V(ignore_index=5), "crossentropy crossentropy_softmax_backward",
                          "crossentropy.ignored-positions", None),
    "branch-factor": (V(block=dict(mlp_branch=0.5)), "layer 0 residual3 residual_forward", "residual.branch-scale", 0.5),
    "ln_1-feeds-the-mlp": (V(block=dict(ln1_for_mlp=True)), "layer 0 ln2 layernorm_forward [transformer.h.0.ln_2]",
                           "structure.never-called", None),
    "ln_f-skipped": (V(skip_ln_f=True), "lnf layernorm_forward [transformer.ln_f]", "structure.never-called", None),
    "wpe-unused": (V(no_wpe=True), "encoder encoder_forward [transformer.wpe]", "structure.never-called", None),
    "loss-over-Vp": (mp.WalkGPT2LossOverVp, "crossentropy crossentropy_softmax_backward", "softmax.padded-columns",
                     None),
    "gelu-module-before-c_fc": (V(block=dict(gelu_first=True)), "layer 0 gelu gelu_forward [transformer.h.0.mlp.gelu]",
                                "structure.out-of-order", None),
}


def run_bug(factory, B=2, T=8):
    """One step of a model (a factory, or a TorchModel that brings its optimizer) from the C's state."""
    port = factory if isinstance(factory, TorchModel) else TorchModel(factory)
    return run_parity(TINY, synth.init_params(TINY, seed=0), synth.batches(TINY, B, T), steps=1,
                      models={"port": port})


def explanation(report, impl="port"):
    """(the first divergence's text, the causes that explain it: (id, value) pairs) of
    ``impl``'s first step: the structural census's first finding where the model departs
    from the graph, else the first divergence's diagnosis."""
    step = report.steps[0]
    text = step.first_divergence.get(impl, "")
    c = first_divergence_check([c for c in step.checks if c.impl == impl])
    f = first_structure(step.structure.get(impl), c)
    if f is not None:
        return text, [(f.id, None)]
    d = None if c is None else c.diagnosis
    return text, [] if d is None else [(x.id, x.value) for x in d.causes]


def verdict(report, where, cause, impl="port"):
    """(localised, named, errors) of a bug's report."""
    text, causes = explanation(report, impl)
    errors = [e for s in report.steps for e in s.errors.values()]
    return where in text, bool(causes) and causes[0][0].startswith(cause), errors


@pytest.mark.parametrize("bug", list(BUGS))
def test_port_bug_is_caught_localised_and_named(bug):
    factory, where, cause, value = BUGS[bug]
    report = run_bug(factory)
    assert not report.passed
    text, causes = explanation(report)
    assert not [e for s in report.steps for e in s.errors.values()]
    assert where in text, text
    assert causes and causes[0][0] == cause, (text, causes)
    if value is not None:
        assert causes[0][1] == pytest.approx(value, rel=2e-3), causes
    # the C is not blamed
    assert "C" not in report.steps[0].first_divergence


def test_structural_findings_name_the_module_and_run_the_checks_that_can_run():
    report = run_bug(V(block=dict(ln1_for_mlp=True)))
    found = {(f.id, f.module) for f in report.findings["port"]}
    assert ("structure.called-more", "transformer.h.0.ln_1") in found
    assert ("structure.never-called", "transformer.h.1.ln_2") in found
    assert ("structure.no-gradient", "transformer.h.0.ln_2") in found
    kinds = {c.kind for c in report.steps[0].checks if c.impl == "port"}
    assert kinds == {"e2e", "replay", "update", "loss"}          # nothing ended in an error
    # the first call of ln_1 is the one compared (ln1 is right: its output passes)
    ln1 = [c for c in report.steps[0].checks if c.impl == "port" and c.kind == "replay" and c.tensor == "acts.ln1[layer 0]"]
    assert ln1 and ln1[0].passed
    data = to_json(report, versions=False)
    details = data["finding_details"]["port"]
    from report_schema import documented, validate
    doc = documented()
    for d in details + data["steps"][0]["structure"]["port"]:
        validate(d, "finding", doc)
    assert any(d["id"] == "structure.no-gradient" and d["values"]["tensor"] == "ln2w[0]" for d in details)
    assert data["steps"][0]["structure"]["port"]


def test_unmodified_ports_have_no_finding_and_no_diagnosis():
    for factory in (mp.GPT, mp.WalkGPT2, ho.HeldGPT, ho.ThirdGPT, h4.FourthGPT,
                    TorchModel(h4.FourthGPT, optimizer=h4.FourthAdamW.factory())):
        report = run_bug(factory)
        assert report.passed and report.findings["port"] == []
        assert not report.steps[0].structure
        assert all(c.diagnosis is None for c in report.steps[0].checks)


def _adamw(model, hyper, params=None):
    import torch
    return torch.optim.AdamW(model.parameters() if params is None else params, lr=hyper.learning_rate,
                             betas=(hyper.beta1, hyper.beta2), eps=hyper.eps, weight_decay=hyper.weight_decay)


def _warmup_at_construction(model, hyper):
    """A linear warmup whose LambdaLR sets the lr to 0 as it is built (factor step/100 at 0)."""
    import torch
    opt = _adamw(model, hyper)
    opt.warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 100))
    return opt


@pytest.mark.parametrize("optimizer, cause", [
    (_warmup_at_construction, "adamw.lr"),      # the moments stepped, the parameters not
    (lambda model, hyper: _adamw(model, hyper, model.transformer.h.parameters()), "adamw.not-stepped"),
])
def test_a_zero_lr_is_told_from_a_tensor_never_stepped_by_its_moments(optimizer, cause):
    """The update's diagnosis is given the port's m and v after the step: with a zero lr
    they move (adamw.lr, fitted 0), a tensor the optimizer was not given keeps them."""
    report = run_bug(TorchModel(mp.GPT, optimizer=optimizer))
    text, causes = explanation(report)
    assert not report.passed and causes and causes[0][0] == cause, (text, causes)
    assert cause != "adamw.lr" or causes[0][1] == 0.0


# ----------------------------------------------------------------------------- held out

# The held-out batches of tests/ports/heldout_einsum_sdpa.py, each written after the previous one was
# run and run once, untuned, on its first run (caught / localised / named with the right cause):
#   BUGS  18/18, 18/18, 16/18   (a mask after the softmax, a scaled token table: no known cause)
#   BUGS2 16/16, 15/16, 10/16   (an interleaved head merge, a finite mask fill, GELU's tanh
#                                scale, eps outside the square root, a logit temperature: no
#                                known cause; wpe added twice named by the census, not by the
#                                embedding family expected; a parameter without gradient named
#                                its parameter, not its module, as it printed then)
#   BUGS3 14/14, 13/14, 11/14   (ReLU for GELU, a layer norm over the positions, blocks in
#                                reverse order: no known cause, the last not localised)
#   BUGS4 15/15, 14/15,  9/15   (q/k/v interleaved per head, GELU before c_fc, x**2 for x**3
#                                in GELU, a layer norm's weight and bias swapped, the targets
#                                shifted inside the loss, the MLP's residual from the block's
#                                input: no known cause; GELU before c_fc localised at c_fc)
#   BUGS5 22/22, 21/22, 16/22   (a third model; a merge by transpose(2, 3), a layer norm's gain
#                                as 1+weight, positions counted over the flattened batch, the
#                                embeddings multiplied: no known cause; log(softmax + 1e-8)
#                                named a constant factor on dlogits and a parallel attention
#                                and MLP the attention branch times 0: wrong causes; ln_f called
#                                before the blocks localised at layer 0's ln_1)
#   BUGS6 27/27, 26/27, 21/27   (a fourth model, tests/ports/heldout_baddbmm.py, with an optimizer of
#                                its own; heads batched (NH, B) and merged as (B, NH), k = q,
#                                a 0/1 tril added as the mask bias, GELU's cubic constant
#                                0.0044715, a layer norm over (T, C), weight decay not scaled
#                                by the learning rate: no known cause; ln_1 and ln_2 swapped
#                                in the block localised at layer 0's ln_2, not its ln_1)
# Each batch's misses were then added to the catalogue as families, BUGS6's as forms of
# attention.layout, attention.qkv-order, attention.masking, layernorm.axis, a wider
# gelu.cubic-constant, adamw.weight-decay-without-lr, and the census's out-of-order findings
# listed in the graph's order (so all six are now regression tests, no longer held out).
# BUGS6's first run: 78% named, 96% localised, every one caught, no error line, no wrong cause.
#   BUGS7 25/25, 25/25, 21/25, pinned 9/25   (a fifth model, tests/ports/heldout_qkv.py, issue 30's
#                                measurement: see HELDOUT7_* below; it is the latest held-out
#                                rate, and its misses are not yet in the catalogue)
HELDOUT = {"BUGS": set(), "BUGS2": set(), "BUGS3": set(), "BUGS4": set(), "BUGS5": set(), "BUGS6": set()}


class FirstRun(NamedTuple):
    """A held-out batch's first run, as counts: pinned (the first divergence's line of the
    port is the mistake's) is counted from BUGS7 on (None: the pin did not exist yet);
    every batch so far ran with no error line."""

    bugs: int
    caught: int
    localised: int
    named: int
    wrong: int          # named a wrong cause
    pinned: int | None = None
    errors: int = 0     # ran into an error line (BUGS10 is the first batch with one)


# the first runs, as data
FIRST_RUNS = {"BUGS": FirstRun(18, 18, 18, 16, 0), "BUGS2": FirstRun(16, 16, 15, 10, 0),
              "BUGS3": FirstRun(14, 14, 13, 11, 0), "BUGS4": FirstRun(15, 15, 14, 9, 0),
              "BUGS5": FirstRun(22, 22, 21, 16, 2), "BUGS6": FirstRun(27, 27, 26, 21, 0),
              "BUGS7": FirstRun(25, 25, 25, 21, 2, pinned=9),
              "BUGS8": FirstRun(25, 25, 1, 1, 24, pinned=2),
              "BUGS9": FirstRun(25, 25, 2, 3, 22, pinned=0),
              "BUGS10": FirstRun(25, 24, 21, 14, 4, pinned=17, errors=1),
              "BUGS11": FirstRun(25, 23, 18, 15, 1, pinned=9, errors=2)}
# BUGS5, as it first ran (untuned; tests/ports/test_model_bugs.py asserted it so at the commit
# that recorded it): not named (two of them with a wrong cause, the others no known cause),
# and not localised where it was expected
HELDOUT5_UNNAMED = {"merge-transpose-2-3", "layernorm-one-plus-weight", "positions-across-batch",
                    "embeddings-multiplied", "log-softmax-with-eps", "parallel-attention-and-mlp"}
HELDOUT5_WRONG = {"log-softmax-with-eps": "output.scale",                 # a factor 0.9999987 on dlogits
                  "parallel-attention-and-mlp": "residual.branch-scale"}  # the attention branch x0
HELDOUT5_UNLOCALISED = {"ln_f-before-the-blocks"}   # at layer 0's ln_1, "called after ln_f"
# BUGS6, as it first ran (untuned; tests/ports/test_model_bugs.py asserted it so at the commit that
# recorded it): no known cause for six (none named a wrong cause), one
# localised elsewhere than expected
HELDOUT6_UNNAMED = {"heads-batched-nh-major", "k-is-q", "mask-tril-ones-added", "gelu-coefficient-0.0044715",
                    "layernorm-over-T-and-C", "decay-not-scaled-by-lr"}
HELDOUT6_WRONG: dict[str, str] = {}
HELDOUT6_UNLOCALISED = {"block-norms-swapped"}   # at layer 0's ln_2, "called before c_attn"


def _heldout(bugs):
    """Each bug of a batch run once: (unlocalised, unnamed, {bug: the wrong cause named}).
    Every one must be caught, with no error line."""
    rows = []
    for name, (factory, where, cause) in bugs.items():
        report = run_bug(factory)
        localised, named, errors = verdict(report, where, cause)
        rows.append((name, not report.passed, localised, named, errors, explanation(report)))
    assert all(r[1] for r in rows), [r[0] for r in rows if not r[1]]            # every one caught
    assert not [r for r in rows if r[4]], [(r[0], r[4]) for r in rows if r[4]]  # no error line
    unnamed = {r[0] for r in rows if not r[3]}
    wrong = {r[0]: r[5][1][0][0] for r in rows if r[0] in unnamed and r[5][1]}
    return {r[0] for r in rows if not r[2]}, unnamed, wrong


# slow: a batch is some twenty model runs (about 130 in all, seven minutes of the suite on
# two busy cores); test_port_bug_is_caught_localised_and_named keeps one run per kind of
# mistake in the fast suite, and CI (make test-slow) runs every batch
@pytest.mark.slow
@pytest.mark.parametrize("batch", list(HELDOUT))
def test_earlier_heldout_batches_are_now_named(batch):
    unlocalised, unnamed, wrong = _heldout(getattr(ho, batch, None) or getattr(h4, batch))
    by_op = {k for k, v in wrong.items() if NAMED_BY_ITS_OP.get(k) == v}
    assert not unlocalised and not unnamed - by_op and not set(wrong) - by_op, (unlocalised, unnamed, wrong)


# a bias left out, which its batch expected named by the census's no-gradient finding: since
# 8 Dec the failing check at its op names it (layernorm.no-bias) and the finding is shown
# beside (census.named_there)
NAMED_BY_ITS_OP = {"layernorm-without-bias": "layernorm.no-bias"}


def test_heldout_first_run_is_recorded():
    """The last held-out batch's first run (BUGS5: a third model, 22 mistakes of the same
    kinds, written before the catalogue met them, run once untuned): every one caught, no
    error line, 21 of 22 localised where expected, 16 of 22 named (73%, below the 90% aimed
    at), two of the others with a wrong cause. The record is the misses' names; the batch
    itself is now a regression batch (test_earlier_heldout_batches_are_now_named)."""
    n, caught, localised, named, wrong, *_ = FIRST_RUNS["BUGS5"]
    assert n == len(ho.BUGS5) == 22
    assert HELDOUT5_UNNAMED | HELDOUT5_UNLOCALISED <= set(ho.BUGS5) and set(HELDOUT5_WRONG) <= HELDOUT5_UNNAMED
    assert (named, localised, wrong) == (n - len(HELDOUT5_UNNAMED), n - len(HELDOUT5_UNLOCALISED),
                                         len(HELDOUT5_WRONG))
    assert all(HELDOUT5_WRONG[b] != ho.BUGS5[b][2] for b in HELDOUT5_WRONG)


def test_heldout6_first_run_is_recorded():
    """BUGS6's first run (a fourth model, 27 mistakes of the
    same kinds, written before any of them ran, run once untuned): every one caught, no
    error line, 26 of 27 localised where expected, 21 of 27 named (78%, below the 90% aimed
    at), none with a wrong cause. The record is the misses' names (tests/ports/test_model_bugs.py
    ran the batch and asserted exactly these at the commit that recorded it); the batch is
    now a regression batch (test_earlier_heldout_batches_are_now_named)."""
    n, caught, localised, named, wrong, *_ = FIRST_RUNS["BUGS6"]
    assert n == caught == len(h4.BUGS6) == 27
    assert HELDOUT6_UNNAMED | HELDOUT6_UNLOCALISED <= set(h4.BUGS6) and set(HELDOUT6_WRONG) <= HELDOUT6_UNNAMED
    assert (named, localised, wrong) == (n - len(HELDOUT6_UNNAMED), n - len(HELDOUT6_UNLOCALISED),
                                         len(HELDOUT6_WRONG))


# ----------------------------------------------------------------------------- BUGS7 (issue 30)

# The fifth model's batch (tests/ports/heldout_qkv.py: separate to_q/to_k/to_v/to_out, names
# of its own, everything written by hand), scored as written before it ran: caught (the run
# fails), localised (the first divergence's text holds the place expected), pinned (the
# first divergence's Check.pin, its first line, is the line of heldout_qkv.py holding the
# mistake; no pin is not pinned; where the first divergence is a structural finding, which
# had no pin when the rules were written, its pin: pin_of), named (the explanation's first cause's id starts with
# the id expected; a bug expecting None cannot be named, and any cause it is given is a
# wrong one), error lines (a step's errors, or the run raising).

def pin_of(report, impl="port"):
    """The first divergence's pin (harness.ports.record.Pin), or None: the structural
    finding's where the first divergence is one (the model departs from the graph there),
    else the first failing check's."""
    c = first_divergence_check([c for c in report.steps[0].checks if c.impl == impl])
    f = first_structure(report.steps[0].structure.get(impl), c)
    return (f.pin if f is not None else None if c is None else c.pin)


def on_line(pin, text, module) -> bool:
    """Whether ``pin``'s line is the line of ``module``'s source holding ``text``."""
    from pathlib import Path
    return (pin is not None and Path(pin.file).resolve() == Path(module.__file__).resolve()
            and pin.line == module.line_of(text))


def heldout7_row(name, bugs=None, module=h5):
    """One bug of BUGS7 run once and scored (the rules above), with what the harness said."""
    factory, where, cause, line = (bugs or module.BUGS7)[name]
    try:
        report = run_bug(factory)
    except Exception as e:      # an error line: scored as such, not raised
        return dict(name=name, caught=False, localised=False, pinned=False, named=False, wrong=None,
                    errors=[f"{type(e).__name__}: {e}"], text="", causes=[], pin=None)
    text, causes = explanation(report)
    pin = pin_of(report)
    named = cause is not None and bool(causes) and causes[0][0].startswith(cause)
    return dict(name=name, caught=not report.passed, localised=where in text, pinned=on_line(pin, line, module),
                named=named, wrong=causes[0][0] if causes and not named else None,
                errors=[e for s in report.steps for e in s.errors.values()], text=text, causes=causes,
                pin=None if pin is None else pin.describe())


def test_heldout7_lines_are_each_on_one_line_of_the_port():
    """Every BUGS7 mistake quotes a line that is in heldout_qkv.py once (so a pin can be
    checked against it), and a line that is not there is refused."""
    assert len(h5.BUGS7) == 25
    lines = {h5.line_of(v[3]) for v in h5.BUGS7.values()}
    assert len(lines) == 25
    with pytest.raises(ValueError, match="on 0 lines"):
        h5.line_of("x = x + 1  # not in the file")


# BUGS7, as it first ran (untuned, the harness as it was; the batch, its lines and the
# rules above were committed before it ran): every one caught and localised, no error
# line; named by the rules: all but four, two of those with a wrong cause; pinned: nine
HELDOUT7_UNNAMED = {"softmax-over-heads",          # NaN (all of a query's heads masked): no known cause, no pin
                    "head-weight-detached",        # expected no cause; named backward.overwrite
                    "loss-targets-shifted",        # expected crossentropy.*; named labels.next-position
                    "adamw-nanogpt-betas"}         # the first divergence m.wte (the port's double 0.9): no known cause
HELDOUT7_WRONG = {"head-weight-detached": "backward.overwrite", "loss-targets-shifted": "labels.next-position"}
HELDOUT7_UNLOCALISED: set[str] = set()
HELDOUT7_PINNED = {"scale-by-sqrt-width", "mask-past-not-future", "split-head-dim-first", "split-without-transpose",
                   "layernorm-unbiased-variance", "layernorm-eps-on-std", "gelu-erf", "gelu-root-inverted",
                   "gelu-sigmoid"}


def _agrees(r, batch: dict, unnamed: set, unlocalised: set, pinned: set, wrong: dict) -> None:
    """A pinned batch's recorded run agrees with the names of its misses: every bug caught,
    the counts those of the sets, the wrong causes among the unnamed."""
    assert r.bugs == r.caught == len(batch) == 25
    assert unnamed | unlocalised | pinned <= set(batch)
    assert set(wrong) <= unnamed
    assert (r.named, r.localised, r.wrong, r.pinned) == (r.bugs - len(unnamed), r.bugs - len(unlocalised),
                                                         len(wrong), len(pinned))


def test_heldout7_first_run_is_recorded():
    """The latest held-out batch's first run (BUGS7: a fifth model, 25 mistakes, written and
    committed before any ran, run once untuned): 25/25 caught, 25/25 localised, 9/25
    pinned to the mistake's line, 21/25 named (84%), two wrong causes, no error line. The
    record is the misses' names; the counts must agree with them."""
    _agrees(FIRST_RUNS["BUGS7"], h5.BUGS7, HELDOUT7_UNNAMED, HELDOUT7_UNLOCALISED, HELDOUT7_PINNED, HELDOUT7_WRONG)
    # a wrong cause is one the batch did not expect: not the expected id's prefix
    assert all(h5.BUGS7[b][2] is None or not HELDOUT7_WRONG[b].startswith(h5.BUGS7[b][2]) for b in HELDOUT7_WRONG)


# BUGS7 now, with the pins of issue 30's second part (harness/ports/pins.py: structural findings,
# residuals, the encoder, NaN, the mask's line, a constructor's constant, the loss, a
# detached weight, the optimizer's settings), tuned on BUGS7 (so no longer a held-out rate):
# every one pinned to the mistake's line; then, with BUGS7's misses catalogued (the softmax
# over the heads as a form of attention.softmax-axis, a detached head as
# backward.weight-without-gradient), 22 named: head-weight-detached is named for what it is,
# but its record expected no cause (so by the rules a wrong one, as labels.next-position,
# the right description, is for loss-targets-shifted's crossentropy.), and
# adamw-nanogpt-betas still fails first at m.wte (the update check's false alarm on a
# Python-double beta1: docs/diagnosis.md)
BUGS7_NOW = FirstRun(25, 25, 25, 22, 2, pinned=25)
HELDOUT7_PINNED_NOW = set(h5.BUGS7)


def test_heldout7_now_is_recorded():
    r = BUGS7_NOW
    assert r.bugs == len(h5.BUGS7) and r.pinned == len(HELDOUT7_PINNED_NOW) and HELDOUT7_PINNED_NOW <= set(h5.BUGS7)
    assert r.pinned >= FIRST_RUNS["BUGS7"].pinned and r.named >= FIRST_RUNS["BUGS7"].named


@pytest.mark.slow
def test_heldout7_batch_is_no_worse_than_its_first_run():
    """BUGS7 run again: every one still caught with no error line, and no bug that was
    localised or named on the first run lost, nor one pinned now (BUGS7_NOW), nor a new
    wrong cause (an improvement passes; the first run itself is kept by
    test_heldout7_first_run_is_recorded)."""
    rows = [heldout7_row(name) for name in h5.BUGS7]
    assert all(r["caught"] for r in rows), [r["name"] for r in rows if not r["caught"]]
    assert not [r for r in rows if r["errors"]], [(r["name"], r["errors"]) for r in rows if r["errors"]]
    lost = {k: {r["name"] for r in rows if not r[k]} - missed
            for k, missed in (("localised", HELDOUT7_UNLOCALISED), ("named", HELDOUT7_UNNAMED),
                              ("pinned", set(h5.BUGS7) - HELDOUT7_PINNED_NOW))}
    assert not any(lost.values()), lost
    new_wrong = {r["name"]: r["wrong"] for r in rows if r["wrong"] and r["name"] not in HELDOUT7_WRONG}
    assert not new_wrong, new_wrong


# ----------------------------------------------------------------------------- BUGS8 (issue 30)

# The sixth model's batch (tests/ports/heldout_fused.py: one fused F.linear on a raw (3C, C)
# parameter, ModuleDict stages, einsum attention over (B, T, NH, hs), torch.var_mean, names
# of its own), written and committed before it ran, scored by heldout7_row's rules.

def test_heldout8_lines_are_each_on_one_line_of_the_port():
    """Every BUGS8 mistake quotes a line that is in heldout_fused.py once."""
    assert len(h6.BUGS8) == 25
    assert len({h6.line_of(v[3]) for v in h6.BUGS8.values()}) == 25
    with pytest.raises(ValueError, match="on 0 lines"):
        h6.line_of("x = x + 1  # not in the file")


# BUGS8, as it first ran (untuned, the harness as it is at b1e22c7, unchanged; the batch and its
# lines committed before it ran). Two findings: the model's names need a map (C_NAMES,
# c_slot: the ModuleDict's "stage0" keys and gain/shift/w_in/widen are recognised by no
# name or shape), and the unmodified model passes but with a structure.unknown-module
# finding for each Mixer (a module holding raw parameters the graph has no op for); once
# a mistake makes the run fail, that finding is the first divergence of 24 of 25 mistakes,
# at stack.stage0.mixer, named structure.unknown-module, pinned to the block's call of the
# mixer (the optimizer's three: no pin). Only post-norm-feed was localised, pinned and named
# (structure.out-of-order); residual-from-normed pinned (its mixer call is the mistake's line).
HELDOUT8_UNNAMED = set(h6.BUGS8) - {"post-norm-feed"}
HELDOUT8_UNLOCALISED = set(h6.BUGS8) - {"post-norm-feed"}
HELDOUT8_PINNED = {"post-norm-feed", "residual-from-normed"}
HELDOUT8_WRONG = {b: "structure.unknown-module" for b in HELDOUT8_UNNAMED}


def test_heldout8_first_run_is_recorded():
    """BUGS8's first run (a sixth model, 25 mistakes, committed before any ran, run once
    untuned): 25/25 caught, 1/25 localised, 2/25 pinned, 1/25 named, 24 wrong causes (all
    structure.unknown-module: the unmodified Mixer's finding taken as the first divergence),
    no error line. The counts must agree with the misses' names."""
    _agrees(FIRST_RUNS["BUGS8"], h6.BUGS8, HELDOUT8_UNNAMED, HELDOUT8_UNLOCALISED, HELDOUT8_PINNED, HELDOUT8_WRONG)


def test_heldout8_unmodified_model_passes_with_its_map():
    """The sixth model, unmodified, with its map: it passes with no finding (BUGS8's first run
    met a structure.unknown-module for each Mixer, a module holding the C's qkvw and
    attprojw, as every failure's first divergence: such a module is now part of the graph)."""
    report = run_bug(h6.port())
    assert report.passed
    assert not report.findings["port"], report.findings["port"]


# BUGS8 now, with a module holding C tensors counted as part of the graph (the census: no
# structure.unknown-module for the Mixer) and its inside sought by value (capture.fused_holders),
# it was 16 localised, 15 pinned, 13 named, one wrong cause (gelu-without-half: output.scale),
# the seven attention mistakes not localised (the Mixer's wrong atty found by no value: the
# first divergence the mean loss), nor mask-not-inverted or softmax-in-half. Then (issue 30's
# localisation inside a module of several ops): an activation a matmul with the C's weight
# reads or writes is taken there, found by use (harness/ports/finder.py: the Mixer's atty is
# what it multiplies by attprojw, wrong values and all), so the attention's replay fails and
# is diagnosed; a forward end-to-end failure ranks before the loss (checks/results.py); the
# anchor of a pin is the reshape where right values were laid out wrong (localise._anchor);
# GELU without its 0.5 is gelu.half-factor; a port's V-wide logits are pinned over the V real
# tokens (localise.pin_failure): 24 localised, 21 pinned, 20 named, no wrong cause.
# Then the two masks pinned at their masked_fill (a -inf row's NaN, a fill of 0) and
# adamw-no-decay-on-vectors at its group's dict: 24 pinned; then qkv-chunked-k-first at its
# chunk (the einsum's (B*NH, T, T) scores no longer matched transposed, record.layouts, so
# the q/k swap is found where it is made): 25 pinned.
# Left: positions-detached localised at its structure.no-gradient finding, not the encoder's
# backward; no cause for mask-not-inverted (NaN), log-softmax-over-time, adamw eps and betas
HELDOUT8_LOCALISED_NOW = set(h6.BUGS8)   # positions-detached since: its no-gradient finding names encoder_backward
HELDOUT8_PINNED_NOW = set(h6.BUGS8)
HELDOUT8_NAMED_NOW = set(h6.BUGS8) - {"mask-not-inverted", "softmax-in-half", "log-softmax-over-time",
                                      "adamw-eps-1e-6", "adamw-betas-swapped"}
HELDOUT8_WRONG_NOW: dict[str, str] = {}
BUGS8_NOW = FirstRun(25, 25, 25, 20, 0, pinned=25)
NOW8 = {"caught": set(h6.BUGS8), "localised": HELDOUT8_LOCALISED_NOW, "named": HELDOUT8_NAMED_NOW,
        "pinned": HELDOUT8_PINNED_NOW}


def _now_agrees(r, batch: dict, first, now: dict, wrong: dict) -> None:
    """A batch's record since its first run agrees with the names it holds (``now``: measure
    -> the names it reaches), and has lost nothing its first run had."""
    assert all(names <= set(batch) for names in now.values()) and set(wrong) <= set(batch)
    assert {k: getattr(r, k) for k in now} == {k: len(names) for k, names in now.items()} and r.wrong == len(wrong)
    assert r.localised >= first.localised and r.named >= first.named and r.pinned >= first.pinned
    assert r.errors <= first.errors


def _no_worse(batch: dict, module, now: dict, wrong: dict) -> None:
    """A batch run again: no error line, nothing ``now`` reaches (measure -> names) lost, no
    new wrong cause (an improvement passes)."""
    rows = [heldout7_row(name, batch, module) for name in batch]
    assert not [r for r in rows if r["errors"]]
    lost = {k: {r["name"] for r in rows if not r[k]} & names for k, names in now.items()}
    assert not any(lost.values()), lost
    assert not {r["name"] for r in rows if r["wrong"] and not r["wrong"].startswith(wrong.get(r["name"], "\0"))}


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("name, says", [
    ("RaisesInForward", r"RaisesInForward's forward raised RuntimeError in transformer\.h\.1\.mlp \(MLP\): mat1"),
    ("ReturnsNothing", r"returned neither logits .* nor a scalar loss \(it returned None\)"),
    ("WrongLogits", r"returned logits of shape \(4, 16, 50\); their last axis must be V=123"),
    ("half_gain", r"parameter transformer\.h\.0\.ln_1\.weight \(ln1w\[0\]\) is torch\.float16"),
])
def test_bad_model_is_one_line_and_exit_2(name, says, capsys):
    import re
    from pathlib import Path
    from harness.cli import main
    spec = f"{Path(mp.__file__)}:{name}"
    assert main(["run", "--model", spec, "--ref", "oracle", "--steps", "1", "-q", "-s"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and re.search(says, err[0]), err
    assert "Traceback" not in err[0]
    assert main(["run", "--model", spec, "--ref", "oracle", "--steps", "1", "-q", "-s", "-v"]) == 2
    assert "Traceback" in capsys.readouterr().err     # -v: where it came from


# ----------------------------------------------------------------------------- BUGS9 (issue 30)

# The seventh model's batch (tests/ports/heldout_headloop.py: Conv1D-style (in, out) kernels by
# addmm, a ParameterDict of tables, attention looped over heads, F.layer_norm and a hand affine,
# the loss through nll_loss; run with its map), written and committed before it ran, scored by
# heldout7_row's rules.

def test_heldout9_lines_are_each_on_one_line_of_the_port():
    """Every BUGS9 mistake quotes a line that is in heldout_headloop.py once."""
    assert len(h7.BUGS9) == 25
    assert len({h7.line_of(v[3]) for v in h7.BUGS9.values()}) == 25


# BUGS9, as it first ran (untuned: main at 079e142, the batch merged before it ran, run once by
# heldout7_row over h7.BUGS9). The unmodified model passes, but with a
# structure.unknown-module finding for each block's GELU module (layers.i.mlp.act, class
# Gelu: a parameterless module the census did not know as the graph's GELU); once a mistake
# makes the run fail, that finding is the first divergence of 22 of 25, pinned to the MLP's
# call of it (the optimizer's two: no pin). Named: positions-from-token-table (a structure
# finding of its own), mlp-before-attention (structure.out-of-order, localised at layer 0's
# ln1), last-layer-skipped (structure.never-called, localised); none pinned to its line.
HELDOUT9_NAMED_FIRST = {"positions-from-token-table", "mlp-before-attention", "last-layer-skipped"}
HELDOUT9_UNNAMED = set(h7.BUGS9) - HELDOUT9_NAMED_FIRST
HELDOUT9_UNLOCALISED = set(h7.BUGS9) - {"mlp-before-attention", "last-layer-skipped"}
HELDOUT9_PINNED: set[str] = set()
HELDOUT9_WRONG = {b: "structure.unknown-module" for b in HELDOUT9_UNNAMED}


def test_heldout9_first_run_is_recorded():
    """BUGS9's first run (a seventh model, 25 mistakes, committed before any ran, run once
    untuned): 25/25 caught, 2/25 localised, 0/25 pinned, 3/25 named, 22 wrong causes (all
    structure.unknown-module: the unmodified GELU module's finding taken as the first
    divergence), no error line. The counts must agree with the misses' names."""
    _agrees(FIRST_RUNS["BUGS9"], h7.BUGS9, HELDOUT9_UNNAMED, HELDOUT9_UNLOCALISED, HELDOUT9_PINNED, HELDOUT9_WRONG)


# BUGS9 now (tuned on it, by general rules, after its first run): a parameterless module is
# the graph's GELU where a layer's fcproj multiplies its output (by use) or its name says so
# (census._known_gelus), and a structure.unknown-module finding outranks no failing numeric
# check (census.BESIDE); the activations found by use have one home (usage.Usage.sites); a
# parameter without gradient departs at its C tensor's op (census._slot_op): 25 localised,
# 13 pinned, 20 named. Left: the attention's pins span the head loop's lines
# (its per-head intermediates reproduce none of the reference's: the first line pinned is
# the slicing), the structural findings of layer order and a skipped layer with no line,
# eps and the GELU's misplaced factor pinned to two lines; no cause for a stride-less head
# offset, dropout always on, lr 3e-4; a cause other than the one written before the run for
# the layer norm over (T, C) (layernorm.axis, where none was expected) and the RMS norm
# (layernorm.rms, where layernorm.form was).
# Then a port's per-head tensor matched to the reference's head slice (Step.heads_of) and an
# op given another step's value in one operand's place pinned where that value was made
# (Step.of): mask-after-softmax and softmax-over-query-axis pinned at their line (the
# first per-head op not reproducing its intermediate), kv-offsets-swapped kept at its
# slicing line: 15 pinned.
HELDOUT9_LOCALISED_NOW = set(h7.BUGS9)
# Then (general pin rules: a random draw, a sum's wrong term, a layout flattened as it is,
# a class body's constant, the loss after the logits as returned, a block's input passed on,
# the frame deciding an order, a loop's header, a parameter's sibling read in its place):
# every one pinned.
HELDOUT9_PINNED_NOW = set(h7.BUGS9)
HELDOUT9_NAMED_NOW = set(h7.BUGS9) - {"adamw-lr-3e-4", "embedding-dropout-always-on", "head-offset-without-stride",
                                      "ln-over-time-and-channels", "ln-rms"}
HELDOUT9_WRONG_NOW = {"ln-over-time-and-channels": "layernorm.axis", "ln-rms": "layernorm.rms"}
# named since by causes added after (8 Dec): the batch expected none (None: scored as a wrong
# cause), each read by the lead and found to be the mistake
HELDOUT9_WRONG_NOW |= {"adamw-lr-3e-4": "adamw.lr", "embedding-dropout-always-on": "output.dropout",
                       "head-offset-without-stride": "attention.layout"}
BUGS9_NOW = FirstRun(25, 25, 25, 20, 5, pinned=25)
NOW9 = {"caught": set(h7.BUGS9), "localised": HELDOUT9_LOCALISED_NOW, "named": HELDOUT9_NAMED_NOW,
        "pinned": HELDOUT9_PINNED_NOW}


# ---------------------------------------------------------------------------- BUGS10 (issue 30)

# The eighth model's batch (tests/ports/heldout_litgpt.py: lit-gpt style, a Config dataclass,
# the fused qkv split in lit-gpt's grouped layout, F.scaled_dot_product_attention, the head's
# weight tied under lm_head's name; no map), written and committed before it ran, run once
# untuned on main 2a8a5dd by heldout7_row over h8.BUGS10 (its parameters placed by use).
# Not caught: attention-in-bf16 (q, k, v cast to bf16 in a float32 run: judged at the
# precision the op ran in, it passed). An error line: adamw-blocks-only (the optimizer given
# the blocks alone: "AdamW keeps no 'exp_avg' for lm_head.weight", a refusal, not a verdict).
HELDOUT10_UNCAUGHT = {"attention-in-bf16"}
HELDOUT10_ERRORS = {"adamw-blocks-only"}
HELDOUT10_UNLOCALISED = {"adamw-blocks-only", "attention-in-bf16", "blocks-not-chained", "final-norm-in-loop"}
HELDOUT10_UNPINNED = {"activation-after-proj", "adamw-blocks-only", "attention-in-bf16", "blocks-not-chained",
                      "ln-llama-eps", "ln-without-bias", "position-padding-idx", "sdpa-scale-as-divisor"}
HELDOUT10_UNNAMED = {"adamw-beta1-twice", "adamw-blocks-only", "attention-in-bf16", "float-tril-mask",
                     "ln-without-bias", "position-padding-idx", "query-key-swapped", "relu-squared",
                     "targets-time-major", "values-are-keys", "z-loss"}
HELDOUT10_WRONG = {"values-are-keys": "attention.qkv-order", "query-key-swapped": "attention.qkv-order",
                   "float-tril-mask": "attention.masking", "ln-without-bias": "structure.no-gradient"}


def test_heldout10_first_run_is_recorded():
    """BUGS10's first run (an eighth model, 25 mistakes, committed before any ran, run once
    untuned): 24/25 caught, 21 localised, 17 pinned to the mistake's line (68%), 14 named
    (56%), 4 wrong causes, 1 error line. The counts must agree with the misses' names."""
    _first_run_agrees(FIRST_RUNS["BUGS10"], h8, h8.BUGS10, HELDOUT10_UNCAUGHT, HELDOUT10_ERRORS, HELDOUT10_UNLOCALISED,
                      HELDOUT10_UNPINNED, HELDOUT10_UNNAMED, HELDOUT10_WRONG)


def _first_run_agrees(r, module, bugs: dict, uncaught: set, errors: set, unlocalised: set, unpinned: set,
                      unnamed: set, wrong: dict) -> None:
    """A held-out batch's first run (from BUGS10 on: errors and pins counted) agrees with
    the names of its misses, and each mistake is on a line of its own."""
    batch = set(bugs)
    assert r.bugs == len(batch) == 25 and len({module.line_of(v[3]) for v in bugs.values()}) == 25
    assert uncaught | errors | unlocalised | unpinned <= batch
    assert set(wrong) <= unnamed <= batch
    assert (r.caught, r.localised, r.pinned, r.named, r.wrong, r.errors) == (
        r.bugs - len(uncaught), r.bugs - len(unlocalised), r.bugs - len(unpinned), r.bugs - len(unnamed),
        len(wrong), len(errors))


# BUGS10 now (no longer held out): adamw-blocks-only a failing update pinned to the
# optimizer's parameters argument (no error line); attention-in-bf16 caught, localised and
# pinned (a port's own bf16 cast in a run that declared no mixed precision is judged at the
# C's float32: precision.undeclared). Then (general pin rules, not keyed to this batch) a
# scale from a method at its return, eps from a config's field, the GELU passed on after the
# projection at its line: 22 pinned; then a parameter without gradient at the line that
# leaves it out (ln-without-bias: the F.layer_norm call reading the gain alone) or drops its
# module's output (blocks-not-chained: h = block(x), the pin naming layer 1's ln1 as the op
# not given it, so localised), a position table's padding_idx at its constructor call
# (pins.option_site): 24 localised, 25 pinned. Left: final-norm-in-loop localised at lnf
# (called twice), not layer 1's ln1; 11 unnamed, 4 with a wrong cause.
HELDOUT10_CAUGHT_NOW = set(h8.BUGS10)
HELDOUT10_LOCALISED_NOW = set(h8.BUGS10)   # final-norm-in-loop since: its first call named as running before layer 1 ln1
HELDOUT10_PINNED_NOW = set(h8.BUGS10)
HELDOUT10_NAMED_NOW = set(h8.BUGS10) - HELDOUT10_UNNAMED
# every one it expected no cause for is named since (8 Dec, causes added after; scored as a
# wrong cause, each read by the lead and found to be the mistake)
HELDOUT10_WRONG_NOW = {
    "values-are-keys": "attention.qkv-order.v-is-k", "query-key-swapped": "attention.qkv-order.q-k-swapped",
    "float-tril-mask": "attention.masking.added", "ln-without-bias": "layernorm.no-bias",
    "z-loss": "crossentropy.z-loss", "targets-time-major": "labels.time-major", "relu-squared": "gelu.relu-squared",
    "adamw-beta1-twice": "adamw.beta2", "adamw-blocks-only": "adamw.not-stepped",
    "position-padding-idx": "embedding.padding-idx", "attention-in-bf16": "precision.bfloat16"}
BUGS10_NOW = FirstRun(25, 25, 25, 14, 11, pinned=25, errors=0)
NOW10 = {"caught": HELDOUT10_CAUGHT_NOW, "localised": HELDOUT10_LOCALISED_NOW, "named": HELDOUT10_NAMED_NOW,
         "pinned": HELDOUT10_PINNED_NOW}


def test_plot_marks_a_forward_first_divergence_in_the_forward_half():
    """The plot's x positions are the graph's, shared by every implementation: a model's
    first divergence at layer 0's ln1 sits before the backward half, not after it."""
    report = run_bug(V(eps=1e-6))
    c = first_divergence_check([c for c in report.steps[0].checks if c.impl == "port"])
    e2e = [x for x in report.steps[0].checks if x.kind == "e2e"]
    positions = list(dict.fromkeys(x.position for x in e2e))
    first_backward = min(positions.index(x.position) for x in e2e if x.phase == "backward")
    assert c.position == "layer 0 ln1 layernorm_forward" and positions.index(c.position) < first_backward
    assert c.where == "layer 0 ln1 layernorm_forward [transformer.h.0.ln_1]"


# ---------------------------------------------------------------------------- BUGS11 (issue 30)

# The ninth model's batch (tests/ports/heldout_flax.py: a Flax port, one flat ParameterDict
# under Flax's '/' paths, (in, out) kernels, pure functions in an Ops class, bmm attention over
# (B*NH) with its own softmax and a finfo.min mask, a hand-written norm and loss; no map),
# written and committed before it ran, run once untuned on main 7e51051 (after this session's
# pin and cause rules) by heldout7_row over h11.BUGS11. (One helper's grep had shown one line
# of the file, ln2-reads-ln1-params' expected cause, before the run; that mistake was an error
# line.) Two error lines: a parameter the forward never reads refused as an "extra parameter"
# (its '/' name not recognised, nothing to place it by use). Not localised: the encoder's
# mistakes (its output, found by use, not found when a table is sliced or scaled: the first
# divergence at layer 0 ln1). Not pinned: a value made in a helper's caller or callee
# (a scale returned by a method taking an argument, a class attribute of a non-module, a
# softmax axis passed by the caller), a loss's pin led by the one_hot line, an optimizer's
# setting decided by its caller or changed by a scheduler.
HELDOUT11_UNCAUGHT = {"ln2-reads-ln1-params", "out-proj-without-bias"}
HELDOUT11_ERRORS = {"ln2-reads-ln1-params", "out-proj-without-bias"}
HELDOUT11_UNLOCALISED = HELDOUT11_ERRORS | {"ln-centred-in-place", "position-row-not-slice", "positions-opt-offset",
                                            "residual-dropout-always-on", "tokens-scaled-sqrt-width"}
HELDOUT11_UNPINNED = HELDOUT11_UNLOCALISED | {
    "adamw-flax-decay-mask", "adamw-warmup-at-construction", "ln-flax-epsilon", "loss-mean-over-vocab",
    "merge-without-permute", "scale-by-model-width", "softmax-over-queries", "targets-shifted-again", "vocab-from-logits"}
HELDOUT11_UNNAMED = HELDOUT11_UNLOCALISED | {"adamw-positional-decay-eps", "adamw-warmup-at-construction",
                                             "triu-without-offset"}
HELDOUT11_WRONG = {"adamw-warmup-at-construction": "adamw.not-stepped"}


def test_heldout11_first_run_is_recorded():
    """BUGS11's first run (a ninth model, 25 mistakes, committed before any ran, run once
    untuned): 23/25 caught, 18 localised, 9 pinned to the mistake's line (36%), 15 named
    (60%; five the batch expected no cause for), 1 wrong cause, 2 error lines. The counts
    must agree with the misses' names."""
    _first_run_agrees(FIRST_RUNS["BUGS11"], h11, h11.BUGS11, HELDOUT11_UNCAUGHT, HELDOUT11_ERRORS,
                      HELDOUT11_UNLOCALISED, HELDOUT11_UNPINNED, HELDOUT11_UNNAMED, HELDOUT11_WRONG)


# BUGS11 now (no longer held out; fixed by general rules, each on a port of its own): '/' names
# read as '.' ones, a parameter never read a finding (not a refusal), the encoder's output
# taken by use however its tables are read, pins followed into a helper's caller or callee, a
# bias left out named by its op (matmul.no-bias) with the finding beside. Its four wrong
# causes are mistakes it expected none for, each read by the lead and found to be the mistake
# (the position table's row T for all positions: embedding.positions; dropout in the residual
# branch: output.dropout; a warmup's lr 0 at construction: adamw.lr; eps and weight decay given
# positionally: adamw.swapped).
HELDOUT11_UNPINNED_NOW = {"ln-centred-in-place", "ln2-reads-ln1-params", "residual-dropout-always-on",
                          "targets-shifted-again", "vocab-from-logits"}
HELDOUT11_WRONG_NOW = {"position-row-not-slice": "embedding.positions", "residual-dropout-always-on": "output.dropout",
                       "adamw-warmup-at-construction": "adamw.lr", "adamw-positional-decay-eps": "adamw.swapped"}
BUGS11_NOW = FirstRun(25, 25, 25, 20, 4, pinned=20, errors=0)
NOW11 = {"caught": set(h11.BUGS11), "localised": set(h11.BUGS11),
         "named": set(h11.BUGS11) - set(HELDOUT11_WRONG_NOW) - {"ln-centred-in-place"},
         "pinned": set(h11.BUGS11) - HELDOUT11_UNPINNED_NOW}


# ------------------------------------------------------------------ the batches since, now

# each batch rerun since its first run (no longer held out): (its record, its module, the
# names each measure reaches, the wrong causes it may name)
NOW = {"BUGS8": (BUGS8_NOW, h6, NOW8, HELDOUT8_WRONG_NOW), "BUGS9": (BUGS9_NOW, h7, NOW9, HELDOUT9_WRONG_NOW),
       "BUGS10": (BUGS10_NOW, h8, NOW10, HELDOUT10_WRONG_NOW), "BUGS11": (BUGS11_NOW, h11, NOW11, HELDOUT11_WRONG_NOW)}


@pytest.mark.parametrize("batch", list(NOW))
def test_heldout_now_is_recorded(batch):
    r, module, now, wrong = NOW[batch]
    _now_agrees(r, getattr(module, batch), FIRST_RUNS[batch], now, wrong)


@pytest.mark.slow
@pytest.mark.parametrize("batch", list(NOW))
def test_heldout_batch_is_no_worse_than_its_first_run(batch):
    """A batch run again: nothing caught, localised, named or pinned now lost, no error
    line, no new wrong cause (an improvement passes)."""
    r, module, now, wrong = NOW[batch]
    _no_worse(getattr(module, batch), module, now, wrong)
