"""``llmc-parity run --checkpoint`` on llm.c's bf16 checkpoint (version 5): the C, which
reads float32 only, and every reference get the parameters widened exactly; the header
says so; a bad version-5 file, or one given with --debug-state (the C reads that file
itself), exits 2 with one line that names the file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from harness.cli import main
from pyref import formats, synth
from pyref.config import PRESETS

TINY = PRESETS["tiny"]


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def params():
    return synth.init_params(TINY, seed=0)


@pytest.fixture
def v5(tmp_path, params):
    path = tmp_path / "tiny_bf16.bin"
    formats.write_checkpoint(path, TINY, params, dtype="bf16")
    return path


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("llmc-parity: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _c_loss(capsys, checkpoint) -> float:
    """The C's mean loss of step 1 of a one-step run on ``checkpoint``, from the JSON report."""
    code, out, err = cli(capsys, "run", "--checkpoint", checkpoint, "--steps", "1", "-q",
                         "--ref", "numpy", "--json", "-", "--json-only")
    assert code == 0, err
    return json.loads(out)["steps"][0]["losses"]["C"]


def test_run_on_a_bf16_checkpoint_passes_and_says_it_was_widened(capsys, v5):
    code, out, err = cli(capsys, "run", "--checkpoint", v5, "--steps", "1", "-q", "--ref", "numpy")
    assert code == 0, out[-2000:] + err
    assert "llmc-parity: PASS" in out
    note = [line for line in out.splitlines() if line.startswith(f"checkpoint {v5}:")]
    assert len(note) == 1 and "bf16" in note[0] and "widened exactly to float32 " in note[0]


def test_a_float32_checkpoint_gets_no_widening_line(capsys, tmp_path, params):
    formats.write_checkpoint(tmp_path / "tiny.bin", TINY, params)
    code, out, err = cli(capsys, "run", "--checkpoint", tmp_path / "tiny.bin", "--steps", "1", "-q",
                         "--ref", "numpy")
    assert code == 0, err
    assert f"checkpoint {tmp_path / 'tiny.bin'}:" not in out and "widened exactly" not in out


def test_the_c_computes_on_torchs_rounding_of_the_parameters(capsys, tmp_path, v5, params):
    """The C's loss on the bf16 file is its loss on a float32 file of torch's bf16 values,
    and not its loss on the unrounded parameters (so a wrong widening would show)."""
    torch = pytest.importorskip("torch")
    rounded = torch.from_numpy(params).to(torch.bfloat16).float().numpy()
    formats.write_checkpoint(tmp_path / "rounded.bin", TINY, rounded)
    formats.write_checkpoint(tmp_path / "unrounded.bin", TINY, params)
    loss = _c_loss(capsys, v5)
    assert loss == _c_loss(capsys, tmp_path / "rounded.bin")
    assert loss != _c_loss(capsys, tmp_path / "unrounded.bin")


@pytest.mark.parametrize("damage, words", [
    (lambda raw: raw[:-2], f"header implies {formats.HEADER_BYTES + 2 * TINY.num_parameters()} "
                           "(version 5: bf16 parameters, 2 bytes each)"),
    (lambda raw: raw[:4] + np.int32(4).tobytes() + raw[8:], "unsupported checkpoint version 4"),
], ids=["truncated", "unknown_version"])
def test_a_bad_bf16_checkpoint_exits_2_with_one_line(capsys, v5, damage, words):
    v5.write_bytes(damage(v5.read_bytes()))
    code, out, err = cli(capsys, "run", "--checkpoint", v5, "--steps", "1", "-q")
    assert code == 2
    line = _error_line(err)
    assert str(v5) in line and words in line, line
    assert "PASS" not in out and "FAIL" not in out


def test_a_debug_state_with_a_bf16_checkpoint_exits_2_before_the_run(capsys, tmp_path, v5, params):
    """The debug-state check gives the checkpoint file to the C, which reads version 3 only."""
    x, y = synth.make_batch(TINY, 1, 4, seed=0)
    ds = tmp_path / "debug_state.bin"
    formats.write_debug_state(ds, TINY, x, y, np.zeros((1, 4, TINY.V), np.float32), 0.0,
                              np.zeros(TINY.num_parameters(), np.float32))
    code, out, err = cli(capsys, "run", "--checkpoint", v5, "--debug-state", ds, "--steps", "1", "-q")
    assert code == 2
    line = _error_line(err)
    assert str(v5) in line and "reads version 3 (float32) only" in line, line
    assert "llmc-parity run:" not in out, "refused only after the run began"
