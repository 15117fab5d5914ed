"""Imports flow one way (DESIGN §2): no module imports from a higher layer, lazily or not, and no two packages
import each other; configs import only ``configs.common`` and the public library; torch and peft only in
``vlpeft_jax/benchmarks`` (and, lazily, ``hf/io.py`` for PyTorch-format checkpoints)."""

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "vlpeft_jax"
RANK = {"": 0, "errors": 0, "tree": 0, "config": 0, "data": 1, "models": 1, "peft": 2, "eval": 3, "hf": 3,
        "train": 3, "mtl": 3, "analysis": 4, "tasks": 4, "experiments": 5, "benchmarks": 6, "cli": 7}


def _package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "vlpeft_jax":
        return None
    if len(parts) == 1:
        return ""
    return parts[1] if (PKG / parts[1]).is_dir() else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out.extend((node.lineno, f"{node.module}.{a.name}") for a in node.names)
    return out


def _library_edges() -> tuple[list[str], dict[str, set[str]]]:
    upward, edges = [], collections.defaultdict(set)
    for f in sorted(PKG.rglob("*.py")):
        if f == PKG / "__init__.py":  # the package's face re-exports from every layer
            continue
        rel = f.relative_to(ROOT).with_suffix("")
        src = _package(".".join(p for p in rel.parts if p != "__init__"))
        for line, name in _imports(f):
            dst = _package(name)
            if dst is None or dst == src:
                continue
            edges[src].add(dst)
            if RANK.get(dst, 0) > RANK.get(src, 0):
                upward.append(f"{f.relative_to(ROOT)}:{line} ({src or 'top'}) imports {name} ({dst})")
    return upward, edges


def test_no_upward_imports_and_no_package_cycles():
    upward, edges = _library_edges()
    assert not upward, "\n".join(upward)
    cycles = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges.get(b, ())})
    assert not cycles, cycles


def test_the_check_can_fail(tmp_path):
    # the walker sees a lazy import inside a function as an import
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from vlpeft_jax.cli import train\n")
    assert (2, "vlpeft_jax.cli") in _imports(f)
    assert RANK[_package("vlpeft_jax.cli.train")] > RANK[_package("vlpeft_jax.models.hooks")]


def test_configs_import_only_common_and_the_library():
    allowed_roots = {"vlpeft_jax", "configs", "ml_collections", "__future__", "pathlib", "typing", "collections",
                     "dataclasses", "math", "re"}
    bad = []
    for f in sorted((ROOT / "configs").glob("*.py")):
        for line, name in _imports(f):
            root = name.split(".")[0]
            if root not in allowed_roots or name.startswith(("vlpeft_jax.cli", "vlpeft_jax.experiments")) or (
                    root == "configs" and name not in ("configs", "configs.common")):
                bad.append(f"{f.name}:{line} imports {name}")
    assert not bad, bad


def test_torch_and_peft_only_in_benchmarks():
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG).as_posix()
        if rel.startswith("benchmarks/") or rel == "hf/io.py":
            continue
        for line, name in _imports(f):
            if name.split(".")[0] in ("torch", "peft"):
                bad.append(f"{rel}:{line} imports {name}")
    assert not bad, bad
