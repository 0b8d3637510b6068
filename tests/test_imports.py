"""The package's import graph: no cycles and only downward imports between layers, counting imports made
inside functions too (a lazy import is still a dependency). The layers are those of docs/design.md."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import moge

ROOT = Path(moge.__file__).parent

# Bottom-up; a module may import its own unit and units of strictly lower layers, never a sibling in its
# own layer or anything above.
LAYERS: list[set[str]] = [
    {"errors"}, {"validate", "progress", "memory"}, {"config"}, {"routing"}, {"metrics", "data"}, {"experts"}, {"model"},
    {"quant"}, {"engine", "parallel"}, {"generate", "checkpoint"}, {"serve", "hf"}, {"train", "analysis", "sim"},
    {"cli"}, {"moge"}, {"__main__"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the moge modules it imports anywhere in its file (functions included)."""
    mods = modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, (path, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def unit(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "moge"
    return "hf" if parts[1].startswith("hf") else parts[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in list(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop(); on.discard(w); comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_graph_sees_function_level_imports():
    g = import_graph()
    assert g["moge.__main__"] == {"moge.cli"}
    assert "moge.model.mtp" in g["moge.model.decoder"] and "moge.experts.choice" in g["moge.experts.linear"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_imports_only_point_down():
    bad = sorted(f"{a} -> {b}" for a, bs in import_graph().items() for b in bs
                 if unit(a) != unit(b) and not RANK[unit(b)] < RANK[unit(a)])
    assert not bad, "imports that do not point down a layer (see docs/design.md):\n" + "\n".join(bad)


def test_every_unit_has_a_layer_and_few_modules_are_flat():
    units = {unit(m) for m in modules()}
    assert units <= set(RANK), f"units without a layer: {sorted(units - set(RANK))}"
    flat = sorted(m for m, (p, is_pkg) in modules().items() if m.count(".") == 1 and not is_pkg)
    assert len(flat) <= 12, f"{len(flat)} modules flat in src/moge: {flat}"
