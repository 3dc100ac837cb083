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


# docs/architecture.md's layers, top to bottom: a module imports from its own and lower ones
LAYERS = (("entry points", ("harness.cli", "harness.pytest_plugin", "harness.gate", "harness.calibrate",
                            "harness.suite")),
          ("reports", ("harness.report",)), ("checks", ("harness.checks",)), ("diagnosis", ("harness.diagnosis",)),
          ("implementations", ("harness.clib", "harness.ports")),
          ("the arbiter", ("harness.arbiter",)),
          ("shared", ("harness.graph", "harness.cores", "harness.probe", "harness.errors", "harness.clib.build")),
          ("references", ("pyref",)))


def _layer(module: str) -> int | None:
    found = [(len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
             if module == p or module.startswith(p + ".")]
    return max(found)[1] if found else None


def _imports(path: Path, package: str):
    import ast
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            yield ".".join(base + ([node.module] if node.module else []))
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_the_layers_of_docs_architecture_hold():
    upward = []
    for root in ("harness", "pyref"):
        for path in (ROOT / root).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            package = module if parts[-1] == "__init__" else module.rpartition(".")[0]
            mine = _layer(module)
            for target in _imports(path, package):
                theirs = _layer(target)
                if mine is not None and theirs is not None and theirs < mine:
                    upward.append(f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert not upward, upward
