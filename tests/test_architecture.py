"""The shape of the code base: no import circle anywhere (checked with ``ast``), lowerings that
see only the public lowering context, and the docs/architecture.md walkthrough, run as written."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("mari_fx", "torchrec_integration", "bench")


def _modules():
    out = {}
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _imports(mods):
    """Module -> the project modules it imports (any import statement, top level or nested)."""
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.endswith("__init__.py") else m.rsplit(".", 1)[0]
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in names:
                # importing a submodule runs its package's __init__ first: not an edge back to it
                if t in mods and t != m and not (m.startswith(t + ".") and mods[t].endswith("__init__.py")):
                    graph[m].add(t)
    return graph


def _circles(graph):
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    mods = _modules()
    assert "mari_fx.lowering.driver" in mods and "bench.run" in mods  # the walk found the tree
    assert _circles(_imports(mods)) == []


def test_the_circle_check_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_lowerings_import_values_and_context_not_the_driver():
    graph = _imports(_modules())
    core = [m for m in graph if m.startswith("mari_fx.lowering.ops.")]
    assert len(core) >= 5
    for m in core + ["torchrec_integration.lowering"]:
        assert not {"mari_fx.lowering.driver", "mari_fx.lowering"} & graph[m], m
    # the driver imports its lowerings (through the ops package), not the other way round
    assert "mari_fx.lowering.ops" in graph["mari_fx.lowering.driver"]
    assert set(core) <= graph["mari_fx.lowering.ops"]


def test_lowerings_use_only_the_public_context():
    """No lowering reaches into private members of the context it is handed (``lw._value``)."""
    mods = _modules()
    files = [p for m, p in mods.items() if m.startswith("mari_fx.lowering.ops.")]
    files.append(mods["torchrec_integration.lowering"])
    found = []
    for path in files:
        with open(path) as f:
            tree = ast.parse(f.read())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            ctx_names = {a.arg for a in fn.args.args
                         if isinstance(a.annotation, ast.Name) and a.annotation.id == "LoweringContext"}
            for node in ast.walk(fn):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                        and node.value.id in ctx_names and node.attr.startswith("_")):
                    found.append(f"{os.path.basename(path)}:{node.lineno} {node.value.id}.{node.attr}")
    assert found == []


def _walkthrough() -> str:
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        doc = f.read()
    section = doc.split("## Walkthrough", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_architecture_walkthrough_runs():
    """The doc's code: a rule and a lowering for a new op, in an extension object; its asserts
    check that the Linear after the op is split only with the extension, and the outputs match."""
    code = _walkthrough()
    assert "assert T.meta[\"mari_fx.record\"].split_layers == (\"head\",)" in code
    scope = {"__name__": "walkthrough"}
    exec(compile(code, "docs/architecture.md", "exec"), scope)
    T = scope["T"]
    T.graph.lint()
    gated_nodes = [n for n in T.graph.nodes if n.target is scope["gated"]]
    assert sorted(n.meta["mari_fx.rows"] for n in gated_nodes) == ["N", "U"]  # one per piece
    from mari_fx.registry import RULES
    assert RULES.first(scope["gated"]) is None  # the extension changed nothing global


def test_the_repository_imports_new_paths_not_aliases():
    """The flat layout's paths (``mari_fx.analysis.rules`` ...) are aliases for other people's code only."""
    from mari_fx._aliases import ALIASES

    mods = _modules()
    found = []
    for m, path in mods.items():
        pkg = m if path.endswith("__init__.py") else m.rsplit(".", 1)[0]
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            found += [f"{m}: {n}" for n in names if n in ALIASES]
    assert found == []
    import mari_fx.analysis.rules
    import mari_fx.analysis.rules

    assert mari_fx.analysis.rules is mari_fx.analysis.rules and mari_fx.analysis.rules.__spec__.name == "mari_fx.analysis.rules"
