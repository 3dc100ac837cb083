"""llm.c's CPU trainer as the harness's C reference: ``train_gpt2.c`` (ours, bit-identical
to llm.c's original under the same compiler and flags) and ``abi_probe.c`` (the translation
unit that includes a train_gpt2.c and reports its struct layout and build assumptions).

A package only so that an installed llmc-parity carries these files: nothing here is Python.
"""
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
