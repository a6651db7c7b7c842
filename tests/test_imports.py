"""The project's import graph: no module imports, at its top or inside a function, a module that
imports it back (directly or around a longer loop), and the world stays behind data.py."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {".venv", ".ci-venv", ".git", "data", "output", "runs", ".gpu"}


def project_modules():
    """{module name: path} of every .py file of the project (tests included)."""
    mods = {}
    for folder, dirs, files in os.walk(ROOT):
        # not the data or run folders, nor a virtual environment of any name (it holds pyvenv.cfg)
        dirs[:] = [d for d in dirs if d not in SKIP and not d.startswith(".")
                   and not os.path.exists(os.path.join(folder, d, "pyvenv.cfg"))]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                mods[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return mods


def import_graph():
    """{module: set of project modules it imports anywhere in its body}."""
    mods = project_modules()
    graph = {}
    for name, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in mods and m != name}
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert {"data", "train", "world.mini_world", "engine.inputs"} <= set(graph)  # the walk found the project
    assert cycles(graph) == []


def test_the_world_is_reached_through_data_only():
    """train.py, engine/ and tools/ read the mini world as a dataset of data.py's table: none of them
    imports the world's modules."""
    graph = import_graph()
    readers = [m for m in graph if m == "train" or m.startswith(("engine.", "tools."))]
    assert {m: sorted(i for i in graph[m] if i.startswith("world")) for m in readers
            if any(i.startswith("world") for i in graph[m])} == {}
    assert "world.mini_world" in graph["data"] and "data" not in graph["world.mini_world"]
