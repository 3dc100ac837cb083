"""The command line: exit status 0 pass / 1 parity failure / 2 bad usage, reports, inputs."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from harness.cli import main
from pyref import formats, synth
from pyref.config import PRESETS

ROOT = Path(__file__).resolve().parents[2]
TINY = PRESETS["tiny"]


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_passes_and_prints_table_and_verdict(capsys):
    code, out, err = cli(capsys, "run", "--steps", "2", "-q", "-v")
    assert code == 0, out[-2000:] + err
    assert out.splitlines()[-1] == "llmc-parity: PASS"
    assert "acts.ln1[layer 1]" in out and "grads.wte" in out and "mean_loss" in out   # -v: every row
    assert "loss trajectory" in out


def test_a_passing_run_fits_on_one_screen_and_ends_with_its_verdict(capsys):
    """`make parity`: the header, a short summary, the verdict last; no passing step's table."""
    code, out, err = cli(capsys, "run", "-q")
    lines = out.splitlines()
    assert code == 0, out[-2000:] + err
    assert lines[0].startswith("llmc-parity run: tiny") and "10 steps" in lines[0]
    assert len(lines) < 40, out
    assert lines[-1] == "llmc-parity: PASS"
    assert "acts.ln1 [layer" not in out and "loss trajectory" in out and "first divergence: none" in out


def test_summary_only_prints_no_passing_step_tables(capsys):
    code, out, err = cli(capsys, "run", "--steps", "2", "-q", "--ref", "numpy", "--summary-only")
    assert code == 0 and out.splitlines()[-1] == "llmc-parity: PASS"
    assert "acts.ln1 [layer" not in out and "loss trajectory" in out


def test_run_with_a_broken_port_exits_1_with_first_divergence(capsys, tmp_path):
    port = tmp_path / "port.py"
    port.write_text(textwrap.dedent("""
        import numpy as np
        def gelu_forward(inp):   # forgot the cubic term
            s = np.sqrt(2 / np.pi).astype(inp.dtype)
            return 0.5 * inp * (1 + np.tanh(s * inp))
    """))
    code, out, err = cli(capsys, "run", "--steps", "1", "-q", "--ref", "numpy", "--impl", port)
    assert code == 1, out[-2000:] + err
    assert out.splitlines()[-1] == "llmc-parity: FAIL (1 of 1 steps failed)"
    assert "first divergence" in out and "gelu_forward" in out
    assert "acts.fch_gelu [layer" in out        # the failed step's table is shown


@pytest.mark.parametrize("args, reason", [
    (["run", "--config", "nope"], "unknown config"),
    (["run", "--checkpoint", "/nonexistent/model.bin"], "--checkpoint /nonexistent/model.bin: no such file"),
    (["run", "--tokens", "/nonexistent/tok.bin"], "--tokens /nonexistent/tok.bin: no such file"),
    (["run", "--checkpoint", __file__, "--debug-state", "/nonexistent/d.bin"],
     "--debug-state /nonexistent/d.bin: no such file"),
    (["run", "--model", "/nonexistent/m.py:GPT"], "--model /nonexistent/m.py: no such file"),
    (["run", "--model", f"{__file__}:x", "--optimizer", "/nonexistent/o.py:f"],
     "--optimizer /nonexistent/o.py: no such file"),
    (["run", "--src", "/nonexistent/train_gpt2.c"], "--src /nonexistent/train_gpt2.c: no such file"),
    (["ops", "--impl", "/nonexistent/port.py"], "--impl /nonexistent/port.py: no such file"),
    (["run", "-T", "999"], "max_seq_len"),
    (["run", "--steps", "0"], "positive"),
    (["run", "-T", "0"], "positive"),
    (["run", "--witness-every", "0"], "--witness-every must be >= 1"),
    (["run", "--debug-state", "/nonexistent/d.bin"], "--checkpoint"),
    (["ops", "-k", "no_such_kernel"], "no check ran"),
    (["run", "--impl", "/nonexistent/port.py"], "--impl /nonexistent/port.py: no such file"),
    (["run", "--lib", "/nonexistent/lib.so"], "does not exist"),
    (["gate", "--baseline", "/nonexistent/gate.json"], "no gate baseline"),
])
def test_bad_usage_exits_2_with_one_line_reason(capsys, args, reason):
    code, out, err = cli(capsys, *args, "-q")
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("llmc-parity: error:")]
    assert len(lines) == 1 and reason.lower() in lines[0].lower(), err


def test_every_option_of_every_subcommand_has_help():
    import argparse

    from harness.cli import parser
    top = parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, sub in subs.choices.items()
               for a in sub._actions if not (a.help or "").strip()]
    missing += [a.dest for a in top._actions if not (a.help or "").strip()]
    assert not missing, missing
    assert set(subs.choices) == {"run", "ops", "gate", "info"}


def test_json_and_plot_reports_never_overwrite(capsys, tmp_path):
    j, p = tmp_path / "report.json", tmp_path / "report.png"
    code, out, err = cli(capsys, "run", "--steps", "2", "-q", "--ref", "numpy", "--json", j, "--plot", p)
    assert code == 0, err
    data = json.loads(j.read_text())
    assert data["schema"] == "llmc-parity/run/1" and data["verdict"] == "pass"
    assert len(data["steps"]) == 2 and data["steps"][0]["checks"]
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = j.read_bytes()
    code, out, err = cli(capsys, "run", "--steps", "1", "-q", "--json", j)
    assert code == 2 and "exists" in err
    assert out == ""                      # refused before running, not after
    assert j.read_bytes() == before


def _llmc_files(tmp_path, logits_factor: float = 1.0):
    """What llm.c's train_gpt2.py writes, for the tiny model: model.bin (a checkpoint) and
    debug.bin (a debug state: one batch, its logits, loss and gradients, from torch);
    ``logits_factor``: the debug state's logits doctored by that factor."""
    from harness import load_kernels
    from pyref.model import GPT2
    params = synth.init_params(TINY, seed=5)
    formats.write_checkpoint(tmp_path / "model.bin", TINY, params)
    x, y = synth.make_batch(TINY, 2, 8, seed=3)
    m = GPT2(TINY, params, kernels=load_kernels("torch"))
    loss = m.forward(x, y)
    m.zero_grad()
    m.backward()
    formats.write_debug_state(tmp_path / "debug.bin", TINY, x, y, m.acts["logits"] * logits_factor, loss,
                              m.grads_memory)


def test_run_from_llmc_files(capsys, tmp_path):
    """An llm.c checkpoint, a token shard to draw batches from, and a debug state."""
    _llmc_files(tmp_path)
    formats.write_tokens(tmp_path / "tokens.bin", synth.make_tokens(TINY, 1000, seed=1))
    code, out, err = cli(capsys, "run", "-q", "--steps", "2", "--ref", "numpy", "--checkpoint", tmp_path / "model.bin",
                         "--tokens", tmp_path / "tokens.bin", "--debug-state", tmp_path / "debug.bin",
                         "--free-run", "2", "--json", tmp_path / "out.json")
    assert code == 0, out[-3000:] + err
    assert "debug state: PASS (18 of 18 tensors OK" in out and "free run: PASS" in out
    assert out.splitlines()[-1] == "llmc-parity: PASS"
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["verdict"] == "pass" and data["debug_state"]["passed"]
    assert len(data["debug_state"]["tensors"]) == 18 and len(data["free_run"]) == 2 * 2   # C, numpy


def _verdicts(code: int, out: str, json_path: Path) -> tuple[int, str, str]:
    """The run's three verdicts: the exit status, the JSON's and the last printed line."""
    return code, json.loads(json_path.read_text())["verdict"], out.splitlines()[-1]


def test_a_failing_debug_state_fails_the_run_in_every_verdict(capsys, tmp_path):
    """Logits 1% off in the debug state: the exit status, the JSON's verdict and the last
    line all say FAIL (the per-step checks pass), the last line after the debug state's table."""
    _llmc_files(tmp_path, logits_factor=1.01)
    code, out, err = cli(capsys, "run", "-q", "--steps", "1", "--checkpoint", tmp_path / "model.bin",
                         "--debug-state", tmp_path / "debug.bin", "--json", tmp_path / "out.json")
    assert _verdicts(code, out, tmp_path / "out.json") == (1, "fail", "llmc-parity: FAIL (the debug state failed)"), \
        out[-3000:] + err
    assert out.index("debug state: FAIL") < out.index("llmc-parity: FAIL")
    data = json.loads((tmp_path / "out.json").read_text())
    assert [t["tensor"] for t in data["debug_state"]["tensors"] if not t["passed"]] == ["logits"]
    assert all(s["passed"] for s in data["steps"])


def test_a_failing_free_run_fails_the_run_in_every_verdict(capsys, tmp_path, monkeypatch):
    """A free run whose C leaves its bound at the last step (doctored: the free run's own
    bounds are tested in tests/ports): exit 1, "fail", a last FAIL line after its table."""
    import dataclasses

    import harness.checks.run as run_mod
    real = run_mod.free_run

    def drifting(*a, **k):
        rows = real(*a, **k)
        return [dataclasses.replace(r, loss_rel=10 * r.loss_bound) if (r.impl, r.step) == ("C", len(a[2])) else r
                for r in rows]
    monkeypatch.setattr(run_mod, "free_run", drifting)
    code, out, err = cli(capsys, "run", "-q", "--steps", "1", "--ref", "oracle", "--free-run", "2",
                         "--json", tmp_path / "out.json")
    assert _verdicts(code, out, tmp_path / "out.json") == (1, "fail", "llmc-parity: FAIL (the free run failed)"), \
        out[-3000:] + err
    assert out.index("free run: FAIL") < out.index("llmc-parity: FAIL")


def test_json_on_stdout_is_the_json_alone(capsys):
    """`--json -`: stdout parses as the report (no text before it), whose verdict is the
    exit status's; the text's verdict line would otherwise not be last."""
    code, out, err = cli(capsys, "run", "-q", "--steps", "1", "--ref", "oracle", "--json", "-")
    assert (code, json.loads(out)["verdict"]) == (0, "pass"), out[-2000:] + err


def test_a_model_is_labelled_by_the_name_the_user_gave(capsys, tmp_path):
    """A model made by a factory function is reported under the factory's name, as a class
    is under its own: never a generic word."""
    from harness.ports.loader import model_label, target_file
    assert model_label("my_gpt.py:GPT") == "GPT" and model_label("pkg.models:make_gpt") == "make_gpt"
    assert target_file("my_gpt.py:GPT") == "my_gpt.py" and target_file("pkg.models:make_gpt") is None
    assert target_file("configure_optimizers") is None and target_file("numpy") is None
    (tmp_path / "factory_model.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests" / "ports")!r})
        import model_ports as mp

        def make_gpt(cfg):
            return mp.GPT(cfg)
    """))
    code, out, err = cli(capsys, "run", "--steps", "1", "-q", "--ref", "oracle",
                         "--model", f"{tmp_path / 'factory_model.py'}:make_gpt")
    assert code == 0, out[-2000:] + err
    assert "not observed [make_gpt]:" in out and "impls: C, make_gpt" in out
    assert "factory" not in out.replace("factory_model.py", "")


def test_run_builds_a_c_source(capsys, tmp_path):
    src = tmp_path / "train_gpt2.c"
    src.write_text((ROOT / "llmc" / "train_gpt2.c").read_text())
    code, out, err = cli(capsys, "run", "-q", "--steps", "1", "--ref", "oracle", "--src", src,
                         "--lib", tmp_path / "lib.so", "--cflags=-O2")
    assert code == 0, out[-2000:] + err
    assert str(tmp_path / "lib.so") in out


def test_ops_and_info(capsys):
    code, out, err = cli(capsys, "ops", "--ref", "numpy", "-k", "layernorm")
    assert code == 0 and " 0 failed" in out
    code, out, err = cli(capsys, "info")
    assert code == 0 and "struct layout: checked" in out


def test_a_port_named_C_is_not_taken_for_the_library(capsys, tmp_path):
    """A port file called C.py (with a dataclass, which needs a real module) is reported
    under its own name: the C library's verdict stays the C's."""
    port = tmp_path / "C.py"
    port.write_text(textwrap.dedent("""
        from __future__ import annotations
        from dataclasses import dataclass
        import numpy as np

        @dataclass
        class Consts:
            coef: float = 0.0447          # wrong: 0.044715

        def gelu_forward(inp):
            s = np.sqrt(2 / np.pi).astype(inp.dtype)
            return 0.5 * inp * (1 + np.tanh(s * (inp + Consts().coef * inp ** 3)))
    """))
    code, out, err = cli(capsys, "run", "--steps", "1", "-q", "--ref", "oracle", "--impl", port)
    assert code == 1, err
    assert "[C (port)] first divergence" in out and "gelu_forward" in out
    assert "[C] first divergence" not in out


@pytest.mark.parametrize("exc", [ValueError("a bug of ours"), RuntimeError("a bug of ours")])
def test_a_harness_bug_exits_3_with_the_trace_not_2(capsys, monkeypatch, exc):
    """Exit 2 is for errors about the user's input, raised as such where it is checked
    (harness.errors.InputError and the file/format/config errors); a ValueError or a
    RuntimeError from inside the harness is ours to fix, and says so."""
    import harness.checks.run

    def broken(*a, **k):
        raise exc
    monkeypatch.setattr(harness.checks.run, "run_parity", broken)
    code, out, err = cli(capsys, "run", "--steps", "1", "-q", "--ref", "numpy")
    assert code == 3, err
    assert "internal error" in err and "Traceback" in err and "a bug of ours" in err


def test_model_map_maps_a_model_under_other_names(capsys, tmp_path):
    """--model-map: a model whose parameter names no built-in rule knows is refused with
    the reason (exit 2) until a map names each parameter's C tensor; then it is checked.
    A map that names a wrong tensor is caught by the numbers (exit 1)."""
    (tmp_path / "renamed.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests" / "ports")!r})
        import torch
        import model_ports as mp

        class Renamed(torch.nn.Module):
            def __init__(self, cfg):
                super().__init__()
                core = mp.WalkGPT2(cfg)
                self.table = torch.nn.ParameterDict({{"p_" + n: p for n, p in core.named_parameters()}})
                self._core = [core]    # not a submodule: its parameters are seen only as p_*

            def forward(self, idx, targets):
                return self._core[0](idx, targets)

        def good(name, shape):
            return name.rpartition(".")[2].removeprefix("p_")

        def swapped(name, shape):      # ln1w <-> ln2w: same shapes, wrong tensors
            n = good(name, shape)
            return {{"ln1w": "ln2w", "ln2w": "ln1w"}}.get(n, n)
    """))
    model = f"{tmp_path / 'renamed.py'}:Renamed"
    code, out, err = cli(capsys, "run", "--steps", "1", "-q", "--ref", "oracle", "--model", model)
    assert code == 2 and "parameter" in err, out[-1500:] + err
    code, out, err = cli(capsys, "run", "--steps", "1", "-q", "--ref", "oracle", "--model", model,
                         "--model-map", f"{tmp_path / 'renamed.py'}:good")
    assert code == 0 and "llmc-parity: PASS" in out, out[-2000:] + err
    code, out, err = cli(capsys, "run", "--steps", "1", "-q", "--ref", "oracle", "--model", model,
                         "--model-map", f"{tmp_path / 'renamed.py'}:swapped")
    assert code == 1 and "first divergence" in out, out[-2000:] + err


def test_the_defaults_fit_the_job(capsys, tmp_path, monkeypatch):
    """With --debug-state (or from 50M parameters) a run checks the C against the oracle
    alone, replaying where a check fails, and its header says so and how long a step took;
    below that, and where the user says otherwise, the references and the replay are as
    asked."""
    from harness.checks.policy import Plan, plan
    small = plan(TINY)
    assert (small.refs, small.replay, small.large, small.why) == (["numpy", "torch"], "always", False, None)
    big = PRESETS["d12"]
    large = plan(big)
    assert (large.refs, large.replay, large.large) == ([], "on-failure", True) and "124M parameters" in large.why
    assert plan(big, refs=["numpy"], replay="always") == Plan(["numpy"], "always", True)
    assert plan(TINY, debug_state=True).large and "--debug-state" in plan(TINY, debug_state=True).why
    _llmc_files(tmp_path)
    code, out, err = cli(capsys, "run", "-q", "--steps", "2", "--checkpoint", tmp_path / "model.bin",
                         "--debug-state", tmp_path / "debug.bin")
    assert code == 0, out[-3000:] + err
    head = out.splitlines()[:4]
    assert "references: oracle (float64); replay: on-failure" in head[0]
    assert head[1].startswith("with --debug-state: the C against the float64 oracle")
    assert head[2].startswith("witness: ") and " GiB available)" in head[2]
    assert head[3].startswith("step 1 took ") and "the 2 steps take about" in head[3]
    assert head[3].endswith(" in all") and ", the run about " in head[3]
    assert "numpy" not in out.split("checks\n", 1)[1].split("first divergence")[0]


def test_the_progress_bar_estimates_the_time_left(monkeypatch):
    from harness import cli as cli_mod
    clock = iter([0.0, 0.0, 10.0, 10.0, 15.0])
    monkeypatch.setattr(cli_mod.time, "perf_counter", lambda: next(clock))
    p = cli_mod.Progress(enabled=False)
    p(1, 4, "C")                      # step 1 starts at 0
    p(2, 4, "C")                      # step 2 starts at 10: 10 s a step
    assert p.left(2, 4, 15.0) == pytest.approx(3 * 10 - 5)
    assert p.left(1, 4, 5.0) is None
