"""The one table renderer: a header and rows of cells (strings), as fixed-width text for a
terminal or as a markdown table, from the same rows."""
from __future__ import annotations

from typing import Collection, Sequence


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> list[str]:
    """The lines of a fixed-width table: each column as wide as its widest cell, two spaces
    between columns, the columns ``right`` (indices: numbers) right-aligned, a rule of
    dashes under the header."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> list[str]:
    """The lines of the same table in markdown (the columns ``right`` right-aligned)."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    rule = "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"
    return [line(header), rule, *(line(r) for r in rows)]
