"""The project's own import graph, read statically from its source.

Two things follow it: the check that dvc.yaml lists every module a stage runs
(tests/test_dvc_graph.py) and the candidate cache's code hash
(shrinkflow.compress.cache), so neither depends on a hand-kept list of
modules. An edge is every ``import`` anywhere in a module, lazy ones inside
functions included, plus the ``__init__`` of every package on the way. The
graph is an upper bound: a lazy import counts whether or not it runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

# The project's top-level packages; imports of anything else are not followed.
PACKAGES = ("shrinkflow", "stages", "tasks", "flows", "monitoring")


def module_file(root: Path, module: str) -> Path | None:
    """The source file of dotted ``module`` under ``root`` (``a/b.py`` or
    ``a/b/__init__.py``); None when neither exists (e.g. an attribute named
    by ``from pkg import name``)."""
    base = Path(root).joinpath(*module.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def imported_modules(path: Path, module: str, packages: tuple[str, ...] = PACKAGES) -> set[str]:
    """Every module of ``packages`` named by an import statement in ``path``
    (the source of dotted ``module``). ``from pkg import name`` yields both
    ``pkg`` and ``pkg.name``, since ``name`` may be a submodule. Raises
    SyntaxError on a file that does not parse."""
    tree = ast.parse(Path(path).read_text(), filename=str(path))
    is_pkg = Path(path).name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base_parts = parts if is_pkg else parts[:-1]
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m.split(".")[0] in packages}


def import_closure(root: Path, entry: str, packages: tuple[str, ...] = PACKAGES) -> set[Path]:
    """The files, relative to ``root``, that importing dotted module ``entry``
    (or ``python -m entry``) executes at most: ``entry`` and everything it
    imports, transitively, within ``packages``."""
    root = Path(root)
    seen: set[str] = set()
    files: set[Path] = set()
    todo = [entry]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        parts = mod.split(".")
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        path = module_file(root, mod)
        if path is None:
            continue
        files.add(path.relative_to(root))
        todo.extend(imported_modules(path, mod, packages))
    return files
