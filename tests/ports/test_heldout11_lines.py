"""BUGS11 (tests/ports/heldout_flax.py, issue 30's fifth held-out batch) quotes, for each
mistake, the line of the port holding it, so that a first divergence's pin can be checked
against it. This checks the quotes only: it runs no harness, no scorer and no mistake."""
from __future__ import annotations

import pytest

from harness import TorchModel

import heldout_flax as h11


def test_heldout11_lines_are_each_on_one_line_of_the_port():
    """Every BUGS11 mistake quotes a line that is in heldout_flax.py once, no two mistakes
    the same line, and a line that is not there (or is there twice) is refused."""
    assert len(h11.BUGS11) == 25
    lines = {h11.line_of(v[3]) for v in h11.BUGS11.values()}
    assert len(lines) == 25
    with pytest.raises(ValueError, match="on 0 lines"):
        h11.line_of("x = x + 1  # not in the file")
    with pytest.raises(ValueError, match="on [2-9] lines"):
        h11.line_of("B, T, C = t.shape")       # in Ops.to_heads and in a variant's


def test_heldout11_entries_say_where_and_which_cause():
    """Each entry is (a port, the place of the first divergence, a cause id or None, the line)."""
    for name, (port, where, cause, line) in h11.BUGS11.items():
        assert where and isinstance(where, str), name
        assert cause is None or (isinstance(cause, str) and "." in cause), name
        assert isinstance(port, TorchModel), name
