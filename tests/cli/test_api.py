"""The public entry points (harness.__all__, harness.arbiter.compare, harness.probe), and the
facts that have one home each: the layout of a flat buffer, AdamW's settings, the loader
of user code."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import harness
from pyref.config import LLMC_MAIN, AdamW, PRESETS, layout, param_shapes, point

ROOT = Path(__file__).resolve().parents[2]


def test_every_public_name_resolves():
    for name in harness.__all__:
        assert getattr(harness, name) is not None, name
    with pytest.raises(AttributeError):
        harness.no_such_name   # noqa: B018


def test_importing_harness_and_its_build_loads_nothing_else():
    """`make lib` runs `python -m harness.clib.build` before any virtual environment exists."""
    code = ("import sys, harness, harness.clib, harness.clib.build; "
            "print(sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('numpy', 'cffi', 'pyref')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_one_layout_walk_for_every_flat_buffer():
    cfg = PRESETS["tiny"]
    shapes = param_shapes(cfg)
    where = layout(shapes)
    flat = np.arange(cfg.num_parameters(), dtype=np.float32)
    views = point(flat, shapes)
    for name, (offset, shape) in where.items():
        assert views[name].shape == shape and views[name].reshape(-1)[0] == offset
        assert np.shares_memory(views[name], flat)
    with pytest.raises(ValueError, match="a buffer of"):
        point(flat[:-1], shapes)


def test_one_adamw_settings_object():
    assert AdamW().weight_decay == 0.1 and LLMC_MAIN.weight_decay == 0.0     # the run's and main()'s
    h = AdamW(beta2=0.999).as_float32()
    assert h.beta2 == float(np.float32(0.999)) != 0.999
    args = AdamW().kernel_args(3)
    assert list(args) == ["lr", "beta1", "beta2", "eps", "weight_decay", "t"] and args["t"] == 3
    assert AdamW.from_kernel_args(args) == AdamW().as_float32()


def test_the_loader_reports_user_code_that_raises_as_the_users_mistake(tmp_path):
    from harness import KernelLoadError, ModelError, load_kernels, load_model, load_object
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ModelError, match="boom"):
        load_object(f"{bad}:GPT")
    with pytest.raises(KernelLoadError, match="boom"):
        load_kernels(str(bad))
    with pytest.raises(ModelError, match="expected file.py:name"):
        load_model("no_colon")
    model = load_model(f"{ROOT / 'tests' / 'ports' / 'model_ports.py'}:GPT", optimizer="configure_optimizers")
    assert model.name == "GPT" and model.optimizer == "configure_optimizers" and model.mapping is None


# the layers are docs/architecture.md's table: the test reads them from there, so the doc and
# the imports are kept in step
ARCHITECTURE = ROOT / "docs" / "architecture.md"
SCANNED = ("harness", "pyref", "benchmarks")


def doc_layers(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """The layers of docs/architecture.md, top to bottom: (name, paths) from the rows of the
    table under "## The layers" whose second column holds paths in backquotes."""
    import re
    section = text.split("## The layers", 1)[1].split("\n## ", 1)[0]
    layers = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and len(cells) >= 2:
            paths = tuple(re.findall(r"`([^`]+)`", cells[1]))
            if paths and cells[0] not in ("layer",) and not set(cells[0]) <= set("-: "):
                layers.append((cells[0], paths))
    if not layers:
        raise ValueError(f"{ARCHITECTURE}: no layer table under '## The layers'")
    return layers


def _layer(rel: str, layers) -> int | None:
    """The index of the layer a file (a path relative to the root) belongs to: the longest
    path of the table that is the file itself or a folder above it."""
    found = [(len(p), i) for i, (_, paths) in enumerate(layers) for p in paths
             if rel == p or (p.endswith("/") and rel.startswith(p))]
    return max(found)[1] if found else None


def _module_file(module: str) -> str | None:
    """The file (relative to the root) of an importable module of the checkout, if any."""
    base = module.replace(".", "/")
    for rel in (base + ".py", base + "/__init__.py"):
        if (ROOT / rel).is_file():
            return rel
    return None


def _imports(path: Path, package: str):
    """The modules a file imports, anywhere in it (lazy imports too): for ``from X import
    name`` the submodule X.name where there is one, else X."""
    import ast
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join((parts[:len(parts) - node.level + 1] if node.level else [])
                            + ([node.module] if node.module else []))
            for alias in node.names:
                yield base + "." + alias.name if _module_file(base + "." + alias.name) else base
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def layering_problems(layers, roots=SCANNED) -> list[str]:
    """Every file of ``roots`` that no layer holds, and every import of a higher layer."""
    problems = []
    for root in roots:
        for path in sorted((ROOT / root).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            mine = _layer(rel, layers)
            if mine is None:
                problems.append(f"{rel} is in no layer of {ARCHITECTURE.name}")
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            package = module if parts[-1] == "__init__" else module.rpartition(".")[0]
            for target in _imports(path, package):
                where = _module_file(target)
                theirs = None if where is None else _layer(where, layers)
                if theirs is not None and theirs < mine:
                    problems.append(f"{rel} ({layers[mine][0]}) imports {target} ({layers[theirs][0]})")
    return problems


def test_the_layers_of_docs_architecture_hold():
    problems = layering_problems(doc_layers(ARCHITECTURE.read_text()))
    assert not problems, problems


def test_the_layer_table_is_read_from_the_doc():
    layers = doc_layers(ARCHITECTURE.read_text())
    names = [n for n, _ in layers]
    assert names[0] == "entry points" and names[-1] == "references" and "the arbiter" in names
    assert dict(layers)["shared"] == ("harness/graph.py", "harness/cores.py", "harness/probe.py",
                                      "harness/errors.py", "harness/clib/build.py")
    for _, paths in layers:
        for p in paths:
            assert (ROOT / p).exists(), f"{ARCHITECTURE.name} names {p}, which does not exist"


def test_an_upward_import_or_a_module_in_no_layer_fails(tmp_path, monkeypatch):
    """Planted in a copy of the tree: pyref importing harness, and a harness module the doc's
    table does not hold; and the table without a layer's row."""
    import shutil
    for root in SCANNED:
        shutil.copytree(ROOT / root, tmp_path / root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    layers = doc_layers(ARCHITECTURE.read_text())
    assert layering_problems(layers) == []
    (tmp_path / "pyref" / "upward.py").write_text("from harness.checks.run import run_parity\n")
    (tmp_path / "harness" / "stray.py").write_text("import pyref\n")
    problems = layering_problems(layers)
    assert problems == ["harness/stray.py is in no layer of architecture.md",
                        "pyref/upward.py (references) imports harness.checks.run (checks)"], problems
    without_arbiter = [row for row in layers if row[0] != "the arbiter"]
    assert any(p.startswith("harness/arbiter/") and "is in no layer" in p
               for p in layering_problems(without_arbiter))
