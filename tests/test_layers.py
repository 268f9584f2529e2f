"""The package's layering and sizes (issue 26), read from the source: the shared primitives import nothing above
them, the loss modules neither the public API nor the distributed layer, and no file or function grows past what
a reader can hold (600 lines a file, 80 a function)."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "fastcontrast"
# what each layer may not import (absolute module names under fastcontrast)
FORBIDDEN = {
    "primitives": ("fastcontrast.functional", "fastcontrast.modules", "fastcontrast.distributed",
                   "fastcontrast.dispatch", "fastcontrast.losses", "fastcontrast.oplist", "fastcontrast.integrations"),
    "losses": ("fastcontrast.functional", "fastcontrast.modules", "fastcontrast.distributed", "fastcontrast.oplist",
               "fastcontrast.integrations"),
}


def _imports(path: pathlib.Path):
    """Absolute names of every module ``path`` imports (relative imports resolved against its package)."""
    pkg = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            yield mod
            yield from (f"{mod}.{a.name}" for a in node.names)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(layer):
    bad = [f"{p.relative_to(PKG)} imports {m}" for p in sorted((PKG / layer).rglob("*.py")) for m in _imports(p)
           if m.startswith(FORBIDDEN[layer])]
    assert not bad, bad


def test_no_file_over_600_lines_and_no_function_over_80():
    long_files, long_functions = [], []
    for p in sorted(PKG.rglob("*.py")):
        src = p.read_text()
        if len(src.splitlines()) > 600:
            long_files.append(f"{p.relative_to(PKG)}: {len(src.splitlines())}")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f"{p.relative_to(PKG)}:{node.lineno} {node.name}: "
                                      f"{node.end_lineno - node.lineno + 1}")
    assert not long_files and not long_functions, (long_files, long_functions)
