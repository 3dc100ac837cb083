"""Reports of a run: text for a person, JSON for a program, a PNG for a glance.

* :mod:`.table` -- the one table renderer (fixed-width text, or markdown, from the same rows);
* :mod:`.text` -- the per-step table, the run's summary, and the other tables;
* :mod:`.jsonfile` -- the JSON report (schema ``llmc-parity/run/1``, docs/report-schema.md);
* :mod:`.png` -- the PNG of a run (matplotlib, imported when drawing);
* :mod:`.progress` -- the progress bar on stderr while a run runs.

Nothing here writes over an existing file unless asked to (``overwrite=True``), and files
are written atomically (:func:`pyref.formats.write_atomic`).
"""
from __future__ import annotations

from .jsonfile import SCHEMA, to_json, write_json
from .png import plot
from .table import markdown_table, text_table
from .text import (cause_lines, debug_state_table, divergence_lines, format_table, free_run_table, model_notes,
                   run_summary, step_table, worst_per_op_table)

__all__ = ["SCHEMA", "to_json", "write_json", "plot", "markdown_table", "text_table", "cause_lines",
           "debug_state_table", "divergence_lines", "format_table", "free_run_table", "model_notes", "run_summary",
           "step_table", "worst_per_op_table"]
