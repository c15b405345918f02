"""The code keeps the shape a reader relies on: each layer imports only from the layers below it, and no function in
fcdm/ is too long to read in one sitting.

Layers, top to bottom: the entry points (train.py, sample.py, benchmarks/), the trainer (fcdm.train), the library
(the rest of fcdm), the kernels (fcdm_kernels). Every import counts, including those inside functions.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80

# A module may import from its own layer and the layers after it in this list, never from one before it.
LAYERS = ["entry", "trainer", "library", "kernels"]


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name of this repository, or None for anything else (torch, numpy, ...)."""
    top = module.split(".")[0]
    if top == "fcdm_kernels":
        return "kernels"
    if module == "fcdm.train" or module.startswith("fcdm.train."):
        return "trainer"
    if module == "fcdm.cli" or module.startswith("fcdm.cli."):
        return "entry"
    if top == "fcdm":
        return "library"
    if top in ("train", "sample", "benchmarks", "tests"):
        return "entry"
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path):
    """(line, dotted name) of every module `path` imports, relative imports resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            yield node.lineno, name
            # `from fcdm import train` imports a sub-module: judge it by its own layer.
            yield from ((node.lineno, f"{name}.{alias.name}") for alias in node.names)


def source_files(*roots: str):
    for root in roots:
        yield from sorted((REPO / root).rglob("*.py"))


@pytest.mark.parametrize("root", ["fcdm", "fcdm_kernels"])
def test_no_module_imports_from_a_layer_above_its_own(root):
    upward = []
    for path in source_files(root):
        own = LAYERS.index(layer_of(module_name(path)))
        for line, name in imported_modules(path):
            layer = layer_of(name)
            if layer is not None and LAYERS.index(layer) < own:
                upward.append(f"{path.relative_to(REPO)}:{line} imports {name} ({layer} is above "
                              f"{LAYERS[own]})")
    assert not upward, "\n".join(upward)


def test_the_layer_check_sees_upward_imports():
    # The checker itself: a trainer import from the library, a relative one from the kernels, one inside a function.
    assert layer_of("fcdm.train.loop") == "trainer" and layer_of("fcdm.vae") == "library"
    assert layer_of("fcdm.cli.sample") == "entry" and layer_of("torch.nn") is None
    names = dict(imported_modules(REPO / "fcdm" / "train" / "loop.py")).values()
    assert "fcdm.train.resume" in names and "fcdm.distributed" in names


def test_no_function_in_fcdm_is_too_long_to_read_in_one_sitting():
    long = []
    for path in source_files("fcdm"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines >= MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} has {lines} lines")
    assert not long, f"split these below {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_every_custom_op_is_in_the_one_fcdm_namespace():
    # torch.ops.fcdm.<op>_<backend>: the Triton ops (Python) and the CUDA ones (csrc/bindings.cpp) side by side.
    import re
    names = [name for path in source_files("fcdm_kernels")
             for name in re.findall(r'custom_op\("([^"]+)"', path.read_text())]
    names += re.findall(r'm\.def\("([a-z_]+)\(', (REPO / "csrc" / "bindings.cpp").read_text())
    assert len(names) >= 8, names
    assert all(name.startswith("fcdm::") or "::" not in name for name in names), names
    assert all(name.split("::")[-1].split("_")[-1] in ("triton", "cuda", "backward") for name in names), names


def test_tests_live_in_tests():
    elsewhere = [str(p.relative_to(REPO)) for root in ("fcdm", "fcdm_kernels", "benchmarks", "csrc")
                 for p in (REPO / root).rglob("test_*.py")]
    assert not elsewhere, elsewhere


def test_the_entry_points_are_thin():
    # The programs read flags and call the library; what they do lives in fcdm/ (DiT's sample_ddp.py is ~170 lines).
    lines = {path: len((REPO / path).read_text().splitlines()) for path in
             ("train.py", "sample.py", "fcdm/cli/train.py", "fcdm/cli/sample.py")}
    assert lines["train.py"] <= 15 and lines["sample.py"] <= 15, lines
    assert lines["fcdm/cli/sample.py"] < 220 and lines["fcdm/cli/train.py"] < 60, lines
