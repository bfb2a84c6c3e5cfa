"""Layering, read from the source: which parts of qiusuo may import which (docs/architecture.md).

A part is a top-level package or module of qiusuo (`model`, `engine`, `train`, `tokenizer`, ...).
Every import counts, also the ones inside functions (a lazy import is still a dependency), so
the rules hold for what runs, not only for what loads at import time:

- `model` and `engine` import none of `train`, `serve`, `deploy`, `registry`, `export`: the
  model and the generation path sit below everything that trains, serves, stores or exports;
- `train` does not import `deploy` (the Ray start-up both use is `local_ray`);
- no cycle between parts: the part graph is a DAG, so each part can be read, tested and
  changed with only what is below it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qiusuo"

FORBIDDEN = {
    "model": {"train", "serve", "deploy", "registry", "export"},
    "engine": {"train", "serve", "deploy", "registry", "export"},
    "train": {"deploy"},
}


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    """(dotted module name, is a package's __init__) of a file under the package directory `root`."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    is_init = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_init else parts), is_init


def _imported_modules(node: ast.AST, module: str, is_init: bool) -> list[str]:
    """Absolute names an import statement brings in (`from pkg import name` counts pkg.name too)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_init else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names if a.name != "*"]


def import_edges(root: Path = PACKAGE) -> dict[tuple[str, str], list[str]]:
    """(importing part, imported part) -> the places ("file:line") where it happens."""
    top = root.name
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        module, is_init = _module_name(path, root)
        parts = module.split(".")
        if len(parts) < 2:
            continue  # the package's own __init__ re-exports; it is not a part
        source = parts[1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            for name in _imported_modules(node, module, is_init):
                target = name.split(".")
                if len(target) < 2 or target[0] != top or target[1] == source:
                    continue
                if not ((root / target[1]).is_dir() or (root / f"{target[1]}.py").is_file()):
                    continue  # `from qiusuo import __version__` and the like: a name, not a part
                place = f"{path.relative_to(root.parent)}:{node.lineno}"
                if place not in edges[source, target[1]]:
                    edges[source, target[1]].append(place)
    return edges


def forbidden_imports(edges: dict[tuple[str, str], list[str]]) -> list[str]:
    return [f"{src} imports {dst} at {', '.join(places)}" for (src, dst), places in sorted(edges.items())
            if dst in FORBIDDEN.get(src, set())]


def part_cycles(edges: dict[tuple[str, str], list[str]]) -> list[list[str]]:
    """Each strongly connected set of parts with more than one member (Tarjan), as a sorted list."""
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst in edges:
        graph[src].add(dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(set(graph) | {d for ds in graph.values() for d in ds}):
        if v not in index:
            visit(v)
    return out


def _known_violations(edges: dict[tuple[str, str], list[str]]) -> dict[tuple[str, str], list[str]]:
    """Int8 quantization is a model transform the engine applies; until it moves from export/ to
    model/quantize.py, the engine's import of qiusuo.export.quantize is the one allowed exception.
    The allowance ends by itself when model/quantize.py exists."""
    if (PACKAGE / "model" / "quantize.py").exists():
        return edges
    kept = dict(edges)
    places = [p for p in kept.get(("engine", "export"), []) if not _imports_only_quantize(p)]
    if places:
        kept["engine", "export"] = places
    else:
        kept.pop(("engine", "export"), None)
    return kept


def _imports_only_quantize(place: str) -> bool:
    path, line = place.rsplit(":", 1)
    module, is_init = _module_name(PACKAGE.parent / path, PACKAGE)
    names = [name for n in ast.walk(ast.parse((PACKAGE.parent / path).read_text(encoding="utf-8")))
             if isinstance(n, (ast.Import, ast.ImportFrom)) and n.lineno == int(line)
             for name in _imported_modules(n, module, is_init) if name.startswith("qiusuo.export")]
    return bool(names) and all(n == "qiusuo.export.quantize" or n.startswith("qiusuo.export.quantize.")
                               for n in names)


def test_model_and_engine_stay_below_train_serve_deploy_registry_export():
    bad = forbidden_imports(_known_violations(import_edges()))
    assert not bad, "layering broken (move the shared piece down, or invert the call):\n" + "\n".join(bad)


def test_no_import_cycle_between_parts():
    edges = import_edges()
    cycles = part_cycles(edges)
    detail = [f"{' <-> '.join(c)}: " + "; ".join(f"{a}->{b} at {edges[a, b][0]}" for a in c for b in c
                                                  if (a, b) in edges) for c in cycles]
    assert not cycles, "import cycle between parts (move the shared piece to the lower part):\n" + "\n".join(detail)


def test_the_checker_sees_lazy_relative_and_from_package_imports(tmp_path):
    """The rules above can fail: a fake package with a lazy, a relative and a `from pkg import part`
    import, a forbidden edge and a cycle is caught."""
    root = tmp_path / "qiusuo"
    for sub in ("model", "train", "eval"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "model" / "layers.py").write_text("def f():\n    from qiusuo.train.loop import x\n")  # lazy
    (root / "train" / "loop.py").write_text("from ..eval import report\nx = 1\n")  # relative
    (root / "eval" / "report.py").write_text("from qiusuo import train\n")  # a part by name
    edges = import_edges(root)
    assert set(edges) == {("model", "train"), ("train", "eval"), ("eval", "train")}
    assert edges["model", "train"] == ["qiusuo/model/layers.py:2"]
    assert forbidden_imports(edges) == ["model imports train at qiusuo/model/layers.py:2"]
    assert part_cycles(edges) == [["eval", "train"]]


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_every_ruled_part_exists(part):
    assert (PACKAGE / part).is_dir(), f"rule for a part that is gone: {part}; update FORBIDDEN"
