"""The package's layers import only downward: core < service < dataset < graph < launch (README, "Development").

Every import of every module under pipeline/ is read from its source (those inside functions and under
TYPE_CHECKING too): a module may import its own layer and those the table below allows, and `pipeline` itself
(the version). The dataset does not import the service. pipeline/local/ (development tools) and
pipeline/__main__.py may import anything; no layer imports them.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"
ALLOWED = {
    "core": {"core"},
    "service": {"core", "service"},
    "dataset": {"core", "dataset"},
    "graph": {"core", "service", "dataset", "graph"},
    "launch": {"core", "service", "dataset", "graph", "launch"},
}
FREE = {"local", "__main__"}  # may import any layer


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _layer(module: str) -> str | None:
    """The layer (or free part) of a dotted module under pipeline; None for `pipeline` itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _dotted(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for each import of a pipeline module; `from pipeline import x` names pipeline.x when x is
    a subpackage or module, and relative imports are resolved."""
    found = []
    package = _dotted(path) if path.name == "__init__.py" else _dotted(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "pipeline"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "pipeline":
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / submodule.replace(".", "/")).is_dir() or (
                    PACKAGE.parent / f"{submodule.replace('.', '/')}.py"
                ).is_file()
                found.append((node.lineno, submodule if is_module else base))
    return found


def test_every_module_sits_in_a_layer() -> None:
    """No module outside the layers' folders but the package's own two (the version, `python -m pipeline`)."""
    strays = [
        str(p.relative_to(PACKAGE.parent))
        for p in _modules()
        if _layer(_dotted(p)) not in {*ALLOWED, *FREE} and p.parent != PACKAGE
    ]
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert not strays + loose, f"modules in no layer (move them into one of {sorted(ALLOWED)}): {strays + loose}"


def test_layers_import_only_downward() -> None:
    upward = []
    for path in _modules():
        here = _layer(_dotted(path))
        if here is None or here in FREE:
            continue
        for line, module in _imports(path):
            there = _layer(module)
            if there is not None and there not in ALLOWED[here]:
                upward.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}: "
                    f"{here} may import only {', '.join(sorted(ALLOWED[here]))} (and pipeline itself)"
                )
    assert not upward, "imports that point upward or sideways:\n" + "\n".join(upward)
