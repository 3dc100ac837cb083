"""Hostile model inputs: invalid configs and parameters, token ids out of range, batches
whose shape changes, steps out of order, non-finite hyperparameters and parameters, and
the lifetime of the C memory behind a CModel's views (it lives exactly as long as a view
of it does: thousands of create/step/close cycles with flat RSS).

Each test asserts a clear exception (its type, and a message naming what is wrong) AND
that the process lives on. The binding's checks run before any C call, so calling them in
process is the real test (if a check were missing, the C would take pytest down: that is
the failure mode these tests exist to catch); every refusal also runs once in a fresh
process. tests/binding/hostile_common.py holds what the hostile tests share.
"""
from __future__ import annotations

import gc
import os
import re
import weakref

import numpy as np
import pytest

from hostile_common import (B, T, TINY, assert_survived, batch, lib, model, params,  # noqa: F401 (fixtures)
                            run_isolated)

from harness import CModel, LlmcInputError, format_table, op_tolerance
from harness.arbiter.compare import compare
from pyref.model import GPT2 as PyGPT2
from pyref.synth import make_batch


# ----------------------------------------------------------------------------- config

def test_config_C_not_divisible_by_NH(lib, params):
    bad = TINY.replace(num_heads=5)
    with pytest.raises(ValueError, match=r"channels \(48\) is not divisible by num_heads \(5\)"):
        bad.validate()
    with pytest.raises(ValueError, match="divisible"):
        CModel.from_params(bad, params, lib=lib)


@pytest.mark.parametrize("field,value,pattern", [
    ("channels", 0, "channels"), ("num_layers", -1, "num_layers"),
    ("vocab_size", 1000, "padded_vocab_size"), ("max_seq_len", 2.5, "max_seq_len"),
    ("num_heads", True, "num_heads"),
])
def test_config_invalid_fields(field, value, pattern, lib, params):
    bad = TINY.replace(**{field: value})
    with pytest.raises(ValueError, match=pattern):
        CModel.from_params(bad, params, lib=lib)


def test_from_params_wrong_size_or_dtype(lib, params):
    with pytest.raises(LlmcInputError, match=r"needs \d+ parameters, got \d+"):
        CModel.from_params(TINY, params[:-1], lib=lib)
    with pytest.raises(LlmcInputError, match="float32"):
        CModel.from_params(TINY, params.astype(np.float64), lib=lib)
    with pytest.raises(LlmcInputError, match="missing"):
        CModel.from_params(TINY, {"wte": params[:10]}, lib=lib)


# ----------------------------------------------------------------------------- the model step

@pytest.mark.parametrize("bad_id", [-1, -2**31, TINY.vocab_size, TINY.padded_vocab_size - 1,
                                    TINY.padded_vocab_size, 2**31 - 1])
@pytest.mark.parametrize("which", ["inputs", "targets"])
def test_forward_token_out_of_range(model, batch, bad_id, which):
    """The C asserts 0 <= id < V (an abort), ids in V..Vp included."""
    x, y = (a.copy() for a in batch)
    (x if which == "inputs" else y)[1, 3] = bad_id
    with pytest.raises(LlmcInputError, match=rf"{which}: token id {bad_id} .*outside \[0, V=123\)"):
        model.forward(x, y)
    assert model.batch_size == 0          # nothing reached the C
    assert model.forward(*batch) > 0      # and the model is still usable


def test_forward_token_dtype_and_shape(model, batch):
    x, y = batch
    with pytest.raises(LlmcInputError, match="integer token ids"):
        model.forward(x.astype(np.float32), y)
    with pytest.raises(LlmcInputError, match=r"\(B, T\)"):
        model.forward(x.ravel(), y)
    with pytest.raises(LlmcInputError, match="empty"):
        model.forward(np.zeros((0, 4), np.int32))
    with pytest.raises(LlmcInputError, match="targets shape"):
        model.forward(x, y[:, :-1])
    # int64 ids beyond int32 must not wrap around into range when narrowed to C int
    wrap = x.astype(np.int64)
    wrap[0, 0] = 2**32 + 5
    with pytest.raises(LlmcInputError, match="outside"):
        model.forward(wrap, y)
    # valid ids of any integer dtype and layout are fine (converted, not refused)
    assert model.forward(np.asfortranarray(x.astype(np.int64)), y.astype(np.uint16)) > 0


def test_forward_B_or_T_changed_after_first_forward(model, batch):
    x, y = batch
    loss = model.forward(x, y)
    for xx, yy in ((x[:1], y[:1]), (x[:, :4], y[:, :4]), (np.tile(x, (2, 1)), np.tile(y, (2, 1)))):
        with pytest.raises(LlmcInputError, match=rf"first run with B={B} T={T}.*cannot change"):
            model.forward(xx, yy)
    assert (model.batch_size, model.seq_len) == (B, T)
    assert model.forward(x, y) == loss     # unharmed


def test_forward_T_above_max_seq_len(model):
    x = np.zeros((1, TINY.max_seq_len + 1), np.int32)
    with pytest.raises(LlmcInputError, match=r"T=33 exceeds max_seq_len=32"):
        model.forward(x, x)


def test_backward_before_forward(model):
    with pytest.raises(LlmcInputError, match=r"backward\(\) needs a forward\(\) with targets"):
        model.backward()


def test_backward_after_forward_without_targets(model, batch):
    x, y = batch
    assert model.forward(x) is None
    with pytest.raises(LlmcInputError, match="with targets"):
        model.backward()
    # with targets, then without: mean_loss is -1 again and the C would refuse (exit)
    model.forward(x, y)
    model.forward(x)
    with pytest.raises(LlmcInputError, match="with targets"):
        model.backward()
    model.forward(x, y)
    model.backward()                       # and it works once targets are back


def test_update_before_backward(model, batch):
    with pytest.raises(LlmcInputError, match=r"update\(\) needs gradients"):
        model.update(t=1)
    model.forward(*batch)
    with pytest.raises(LlmcInputError, match="needs gradients"):
        model.update(t=1)


@pytest.mark.parametrize("t", [0, -1, 1.5, True, 2**31, None, "1"])
def test_update_step_t_must_count_from_one(model, batch, t):
    model.forward(*batch)
    model.backward()
    with pytest.raises(LlmcInputError, match="counts from 1"):
        model.update(t=t)


@pytest.mark.parametrize("hp", ["learning_rate", "beta1", "beta2", "eps", "weight_decay"])
def test_update_nonfinite_hyperparameter(model, batch, hp):
    model.forward(*batch)
    model.backward()
    with pytest.raises(LlmcInputError, match=rf"{hp} must be finite"):
        model.update(t=1, **{hp: float("nan")})


def test_closed_model_refuses(lib, params, batch):
    m = CModel.from_params(TINY, params, lib=lib)
    m.close()
    for call in (lambda: m.forward(*batch), m.backward, m.zero_grad, lambda: m.update(t=1),
                 lambda: m.params):
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_views_before_they_exist(model):
    for attr in ("grads", "acts", "grads_acts", "m_memory", "v_memory", "inputs"):
        with pytest.raises(RuntimeError, match=r"no .* yet|forward|backward|update"):
            getattr(model, attr)


_MODEL_ABUSE = """
    import numpy as np
    from harness import CModel
    from pyref.config import PRESETS
    from pyref.synth import init_params, make_batch
    cfg = PRESETS["tiny"]
    m = CModel.from_params(cfg, init_params(cfg))
    x, y = make_batch(cfg, 2, 8)
    bad = x.copy(); bad[0, 0] = cfg.vocab_size
    calls = [
        ("backward_first", lambda: m.backward()),
        ("update_first", lambda: m.update(t=1)),
        ("token_V", lambda: m.forward(bad, y)),
        ("token_neg", lambda: m.forward(-x, y)),
        ("T_above_maxT", lambda: m.forward(np.zeros((1, 33), np.int32))),
        ("first", lambda: m.forward(x, y)),
        ("B_change", lambda: m.forward(x[:1], y[:1])),
        ("no_targets", lambda: m.forward(x)),
        ("backward_no_targets", lambda: m.backward()),
        ("t0", lambda: (m.forward(x, y), m.backward(), m.update(t=0))),
    ]
    for name, call in calls:
        try:
            call()
            print(name, "OK")
        except Exception as e:
            print(name, "RAISED", type(e).__name__, e)
    print("ALIVE")
"""


def test_model_abuse_in_a_fresh_process(lib):
    """Every refusal above, in one child process: it must end normally (the C's exit(1) or
    assert's abort would show as a non-zero return code)."""
    out = assert_survived(run_isolated(_MODEL_ABUSE, lib))
    for name in ("backward_first", "update_first", "token_V", "token_neg", "T_above_maxT",
                 "B_change", "backward_no_targets", "t0"):
        assert re.search(rf"^{name} RAISED LlmcInputError", out, re.M), out
    assert re.search(r"^first OK", out, re.M), out


# ----------------------------------------------------------------------------- non-finite parameters

@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
def test_nonfinite_parameters_run_and_are_reported(lib, params, batch, poison):
    """A NaN or Inf in a parameter is data, not an error: the whole step runs, and the
    comparison engine reports the non-finite elements as mismatches (not a crash)."""
    x, y = batch
    bad = params.copy()
    wte = bad[:TINY.padded_vocab_size * TINY.channels].reshape(TINY.padded_vocab_size, -1)
    wte[x[0, 0], 5] = poison                  # a row the batch looks up
    with CModel.from_params(TINY, bad, lib=lib) as m, np.errstate(invalid="ignore", over="ignore"):
        loss = m.forward(x, y, threads=1)
        m.zero_grad()
        m.backward(threads=1)
        m.update(t=1, threads=1)
        m.update(t=2, threads=1)
        assert not np.isfinite(loss)
        logits = m.acts["logits"][..., :TINY.vocab_size]
        grads = m.grads_memory
        assert not np.isfinite(logits).all() and not np.isfinite(grads).all()

        clean = PyGPT2(TINY, params, dtype=np.float64)
        clean.forward(x, y)
        n = TINY.channels
        tol = op_tolerance("matmul_forward", "out", n)
        c = compare(logits, clean.acts["logits"][..., :TINY.vocab_size], name="logits", tol=tol,
                    axes=("b", "t", "v"))
        assert not c.passed
        assert c.n_nonfinite_mismatch > 0 and c.n_bad >= c.n_nonfinite_mismatch
        assert "nonfinite" in c.failed_checks()
        assert "Non-finite mismatches" in c.message()
        assert "non-finite" in format_table([c])
        assert np.isfinite([c.max_abs, c.max_rel, c.norm_rel]).all()

        # the same poisoned parameters in the float64 model: NaN where the C has NaN counts
        # as equal (nan_equal), so a faithful port is not flagged for the user's NaN
        poisoned = PyGPT2(TINY, bad, dtype=np.float64)
        poisoned.forward(x, y)
        c2 = compare(m.acts["encoded"], poisoned.acts["encoded"], name="encoded",
                     tol=op_tolerance("encoder_forward", "out", 1))
        assert c2.passed, c2.message()


# ----------------------------------------------------------------------------- memory

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_views_outlive_close(lib, params, batch):
    """close() drops the model's hold; the C memory is freed (gpt2_free) only when the last
    view goes, so a kept view never reads freed memory."""
    m = CModel.from_params(TINY, params, lib=lib)
    m.forward(*batch, threads=1)
    m.backward(threads=1)
    m.update(t=1, threads=1)
    views = dict(wte=m.params["wte"], logits=m.acts["logits"], dqkv=m.grads_acts["qkv"],
                 m=m.m_memory, g=m.grads["fcw"])
    copies = {k: v.copy() for k, v in views.items()}
    owner = weakref.ref(m._owner)
    m.close()
    assert m.closed
    del m
    gc.collect()
    assert owner() is not None, "freed while views were alive"
    # allocate and free a lot in between: a dangling view would see it
    for _ in range(5):
        with CModel.from_params(TINY, params, lib=lib) as other:
            other.forward(*batch, threads=1)
    for k, v in views.items():
        assert np.array_equal(v, copies[k]), k
    views["wte"][0, 0] = 1.0               # still writable, still ours
    del copies, v
    for k in list(views):
        del views[k]
        gc.collect()
        assert (owner() is None) == (not views), f"freed too early or too late after {k}"


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="under ASan, freed memory sits in its quarantine: RSS is no leak "
                           "signal there (LeakSanitizer is)")
def test_no_leak_over_thousands_of_cycles(lib, params):
    """2000 x (create, forward, zero_grad, backward, update, close) at the tiny preset: RSS
    stays flat after the warm-up (a leak of even 1.5 KB a cycle would show). One OpenMP thread: on a busy 2-core machine the thread
    team's barriers cost more than the work (this is about memory, not speed)."""
    x, y = make_batch(TINY, 1, 4, seed=1)

    def cycle():
        m = CModel.from_params(TINY, params, lib=lib)
        m.forward(x, y, threads=1)
        m.zero_grad()
        m.backward(threads=1)
        m.update(t=1, threads=1)
        m.close()

    for _ in range(100):
        cycle()
    gc.collect()
    before = _rss()
    for _ in range(2000):
        cycle()
    gc.collect()
    growth = _rss() - before
    # each model holds ~1.3 MB (params, grads, m, v, acts): a leak of one per cycle would
    # be gigabytes; the cffi struct and the token copies are under 1 KB
    assert growth < 3 * 2**20, f"RSS grew by {growth / 2**20:.2f} MiB over 2000 cycles"
