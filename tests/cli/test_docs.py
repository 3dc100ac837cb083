"""The docs a newcomer reads are true of the checkout: every file or folder of the project
that README.md and docs/*.md name exists, every `llmc-parity` command they show parses
with the current command line, and README.md stays a five-minute read."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 220
# the checkout's own folders: a path that starts with one of them names a file of the project
# (build/ holds outputs, and a user's paths start elsewhere: ~/llm.c/, edited/, path/to/)
ROOTS = ("harness", "pyref", "tests", "docs", "llmc", "benchmarks", "baselines", ".ci")
_PATH = re.compile(r"(?<![\w./~-])((?:" + "|".join(re.escape(r) for r in ROOTS) + r")/[\w./-]*)")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def named_paths(text: str, doc: Path) -> set[str]:
    """The project paths a doc names (relative to the root): tokens that start with one of
    ROOTS, and the targets of its relative markdown links (relative to the doc's folder)."""
    found = {m.rstrip(".,;") for m in _PATH.findall(text)}
    for target in _LINK.findall(text):
        target = target.split("#", 1)[0]
        if target and "://" not in target:
            found.add((doc.parent / target).resolve().relative_to(ROOT).as_posix())
    return {p for p in found if p}


def missing_paths(text: str, doc: Path) -> list[str]:
    return sorted(p for p in named_paths(text, doc) if not (ROOT / p).exists())


def commands(text: str) -> list[list[str]]:
    """The `llmc-parity` command lines of a doc's code blocks, as argument lists: every line
    of a ```sh block, and a `$ ` line of any other (the rest of those is output)."""
    found, fence = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        words = line.strip()
        shown = fence == "sh" or (fence is not None and words.startswith("$ "))
        words = words.removeprefix("$ ")
        if shown and words.startswith("llmc-parity "):
            found.append(shlex.split(words, comments=True)[1:])
    return found


@pytest.mark.parametrize("doc", docs(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_path_a_doc_names_exists(doc):
    assert missing_paths(doc.read_text(), doc) == []


@pytest.mark.parametrize("doc", docs(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_command_a_doc_shows_parses(doc):
    from harness.cli import parser
    for argv in commands(doc.read_text()):
        try:
            parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{doc.name}: `llmc-parity {shlex.join(argv)}` does not parse")


def test_readme_is_a_five_minute_read():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, at most {README_MAX_LINES}"
    first = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1).splitlines()[:2]
    assert [line.split("#")[0].split() for line in first] == [["make", "parity"], ["make", "test"]], first


def test_a_planted_bad_path_or_command_fails():
    readme = ROOT / "README.md"
    planted = "`harness/cli.py`, [x](docs/kernels.md); see `harness/arbiter/no_such.py` and [x](docs/nowhere.md).\n"
    assert missing_paths(planted, readme) == ["docs/nowhere.md", "harness/arbiter/no_such.py"]
    assert missing_paths("[x](nowhere.md), tests/cli/test_docs.py", ROOT / "docs" / "x.md") == ["docs/nowhere.md"]
    assert missing_paths("~/llm.c/train_gpt2.c edited/train_gpt2.c build/bench.json", readme) == []
    assert commands("```sh\nllmc-parity run --no-such-flag  # a comment\n```\n") == [["run", "--no-such-flag"]]
    from harness.cli import parser
    with pytest.raises(SystemExit):
        parser().parse_args(["run", "--no-such-flag"])
