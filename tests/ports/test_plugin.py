"""The pytest face of a torch port: ``pytest --llmc-model port.py:GPT`` run in a user's own
folder (a port file there, nothing of llmc-parity's copied) collects the shipped suite
(harness/suite/test_model.py). Each op is judged on its own inputs, so a bug fails its own
op's test and the end-to-end ones, not the ops downstream of it; a failure's message is the
CLI's (first divergence, pinned line, cause). The port is tests/ports/model_ports.py's GPT,
the bug its q/k/v split in the wrong order (``GPTqkvOrder``)."""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pyref.protocol import KERNEL_OP

pytest.importorskip("torch")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PORTS = HERE / "model_ports.py"
# the line making the tensors taken in the wrong order (the keys stand where the queries
# belong): the swapped split's pin
SPLIT_LINE = 'q, k, v = self.c_attn(x).split(self.n_embd, dim=2)'
# a deliberately wrong selection: layer norm judged by the end-to-end checks too
WRONG_SELECTION = """import harness.pytest_plugin as plugin
plugin.OP_KINDS = plugin.OP_KINDS + plugin.STEP_KINDS
"""


def user_folder(tmp_path: Path, model: str = "GPT", conftest: str | None = None) -> Path:
    """A user's folder: ``port.py`` (model_ports.py, its ``GPT`` rebound to ``model``) and,
    where given, a ``conftest.py`` of theirs."""
    text = PORTS.read_text() + ("" if model == "GPT" else f"\n\nGPT = {model}\n")
    (tmp_path / "port.py").write_text(text)
    if conftest is not None:
        (tmp_path / "conftest.py").write_text(conftest)
    return tmp_path


def pytest_in(folder: Path, *args: str, code: tuple[str, str] = ("--llmc-model", "port.py:GPT")) \
        -> dict[str, tuple[str, str]]:
    """``pytest --llmc-model port.py:GPT ARGS`` (or the user's ``code`` named otherwise) run
    in ``folder`` (this checkout's harness first on the path), as test name -> (outcome,
    message): passed, failed, skipped."""
    xml = folder / "results.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *code,
                        "--llmc-steps", "1", f"--junitxml={xml}", *args],
                       capture_output=True, text=True, timeout=300, cwd=folder, env=env)
    assert r.returncode in (0, 1) and xml.is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        found = [e for e in case if e.tag in ("failure", "error", "skipped")]
        if not found:
            out[case.get("name")] = ("passed", "")
        else:
            e = found[0]
            out[case.get("name")] = ("skipped" if e.tag == "skipped" else "failed",
                                     f"{e.get('message', '')}\n{e.text or ''}")
    assert (r.returncode == 1) == any(o == "failed" for o, _ in out.values()), r.stdout[-3000:]
    return out


def op_test(op: str) -> str:
    return f"test_model_op[{op}-model]"


def line_of(folder: Path, text: str) -> int:
    return next(i for i, line in enumerate((folder / "port.py").read_text().splitlines(), 1) if text in line)


def test_an_attention_bug_fails_the_attention_test_with_its_cause_and_line(tmp_path):
    folder = user_folder(tmp_path, "GPTqkvOrder")
    got = pytest_in(folder, "-k", "attention")
    assert list(got) == [op_test("attention")]
    outcome, message = got[op_test("attention")]
    assert outcome == "failed"
    assert "first divergence: layer 0 attention attention_forward" in message, message
    assert f"port.py:{line_of(folder, SPLIT_LINE)}" in message, message              # the pinned line
    assert "why: probable cause: q, k, v mixed up: q and k swapped (k, q, v" in message, message


def test_an_attention_bug_leaves_the_ops_downstream_passing_and_fails_end_to_end(tmp_path):
    """Layer norm and GELU run after the attention, on the inputs it spoiled: judged on
    their own inputs they pass; the step's end-to-end tests fail, naming the attention."""
    got = pytest_in(user_folder(tmp_path, "GPTqkvOrder"), "-k", "layernorm or gelu or step")
    assert got[op_test("layernorm")] == ("passed", "") and got[op_test("gelu")] == ("passed", ""), got
    for kind in ("e2e", "loss"):
        outcome, message = got[f"test_model_step[{kind}]"]
        assert outcome == "failed" and f"{kind}: " in message, message
        assert "first divergence: step 1 [GPT] layer 0 attention attention_forward" in message, message
        assert "[attention.qkv-order.q-k-swapped" in message, message


def test_a_right_port_passes_every_test_and_says_what_it_did_not_check(tmp_path):
    """One test per op of the op table (``-k`` names) and one per end-to-end kind; softmax's
    probabilities are not shown by a nanoGPT port (cross_entropy fuses them): skipped, so
    saying, never a silent pass."""
    got = pytest_in(user_folder(tmp_path))
    ops = set(KERNEL_OP.values())
    assert ops == {"encoder", "layernorm", "matmul", "attention", "gelu", "residual", "softmax", "crossentropy",
                   "adamw"}
    assert set(got) == {op_test(op) for op in ops} | {"test_model_step[e2e]", "test_model_step[loss]"}, got
    outcome, reason = got.pop(op_test("softmax"))
    assert outcome == "skipped" and "softmax not checked on its own inputs" in reason and "acts.probs" in reason
    assert all(o == "passed" for o, _ in got.values()), got


def test_judging_an_op_by_end_to_end_checks_fails_it_for_a_bug_upstream(tmp_path):
    """The selection is what keeps ``-k layernorm`` passing: layer norm judged by its
    end-to-end checks too (a user's conftest widens it) fails for the attention's bug."""
    got = pytest_in(user_folder(tmp_path, "GPTqkvOrder", conftest=WRONG_SELECTION), "-k", "layernorm")
    outcome, message = got[op_test("layernorm")]
    assert outcome == "failed" and "layernorm: " in message, message


def test_an_optimizer_bug_fails_adamw_by_its_update_check(tmp_path):
    """nanoGPT's configure_optimizers leaves the 1-D parameters undecayed, the C decays
    every one: the update check (AdamW on the port's own gradients) is adamw's test."""
    got = pytest_in(user_folder(tmp_path), "--llmc-optimizer", "configure_optimizers", "-k", "adamw or gelu")
    assert got[op_test("gelu")] == ("passed", ""), got
    outcome, message = got[op_test("adamw")]
    assert outcome == "failed" and "gpt2_update" in message, message


# a kernel port's GELU with its tanh argument scaled by 0.8 instead of sqrt(2/pi)
KERNEL_PORT = """import numpy as np


def gelu_forward(inp):
    return 0.5 * inp * (1.0 + np.tanh(0.8 * (inp + 0.044715 * inp ** 3)))
"""


def test_a_kernel_ports_model_test_says_the_first_divergence_and_its_cause(tmp_path):
    """``--llmc-impl``: the kernels are judged one call at a time already; the model-level
    test's message is the CLI's first divergence and cause, and no model test is collected."""
    (tmp_path / "port.py").write_text(KERNEL_PORT)
    got = pytest_in(tmp_path, "-k", "trains or gelu-gelu_forward-base", code=("--llmc-impl", "port.py"))
    assert set(got) == {"test_port_trains_like_the_c", "test_port_kernel[gelu-gelu_forward-base-port]"}, got
    outcome, message = got["test_port_trains_like_the_c"]
    assert outcome == "failed" and "C itself failed" not in message, message
    assert "first divergence: step 1 [port] layer 0 gelu gelu_forward, inputs exact (its own)" in message, message
    assert "why: probable cause: GELU's tanh argument scaled by 0.8" in message, message


def test_an_op_failing_in_a_model_that_departs_from_the_graph_says_where_it_departs(tmp_path):
    """ln_1 feeding the MLP too: layer norm's own checks fail (its weights' gradients sum
    two calls), and the message says where the forward departs from GPT-2's graph."""
    got = pytest_in(user_folder(tmp_path, "GPTln1ForMLP"), "-k", "layernorm")
    outcome, message = got[op_test("layernorm")]
    assert outcome == "failed", message
    assert "the step's first divergence: layer 0 ln2 layernorm_forward [transformer.h.0.ln_2]" in message, message
    assert "never called" in message, message
