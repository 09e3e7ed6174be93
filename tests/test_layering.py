"""The package's imports point one way: no circle, no import from a lower layer to a higher one.

Every ``import bakery...`` / ``from bakery... import`` in ``bakery/`` counts, those inside functions
too (a lazy import is still a dependency). A module may import its own layer or a lower one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bakery"

# low to high; a module's layer is the first entry its dotted name starts with
LAYERS: list[tuple[str, ...]] = [
    ("bakery", "bakery.errors", "bakery.naming", "bakery.stats"),
    ("bakery.arch", "bakery.placement", "bakery.models"),
    ("bakery.io",),
    ("bakery.vectors", "bakery.traits"),
    ("bakery.steering", "bakery.gguf"),
    ("bakery.extraction", "bakery.fidelity"),
    ("bakery.engines",),
    ("bakery.bakers",),
    ("bakery.hub",),
    ("bakery.cli", "bakery.__main__"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, found = -1, None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best:
                best, found = len(n), i
    assert found is not None, f"{module} is in no layer of LAYERS: give it one"
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The bakery modules ``path`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    out: set[str] = set()
    me = module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "bakery")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                pkg = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "bakery":
                continue
            subs = {f"{base}.{a.name}" for a in node.names} & known
            out.update(subs or {base})
    return {m for m in out if m in known and m != me}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer():
    for m in modules():
        layer_of(m)


def test_no_import_runs_up_a_layer():
    up = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
          for a, deps in graph().items() for b in deps if layer_of(b) > layer_of(a)]
    assert not up, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(up))


def find_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    cycles = find_cycles(graph())
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_the_checker_sees_a_circle_and_an_upward_import():
    g = {"bakery.io.a": {"bakery.bakers.b"}, "bakery.bakers.b": {"bakery.io.a"}}
    assert find_cycles(g) == [["bakery.bakers.b", "bakery.io.a"]]
    assert layer_of("bakery.io.a") < layer_of("bakery.bakers.b")


def test_no_module_is_much_over_400_lines():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > 420}
    assert not long, f"modules over about 400 lines (split them by job): {long}"
