"""The package's shape: no import cycles (module-level and function-level imports alike), no private names
imported across modules, one stage table that the README and the rules follow."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PKG = ROOT / "src" / "dflash"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every dflash import anywhere in the module."""
    tree = ast.parse(MODULES[name].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("dflash")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dflash"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub, []) if sub in MODULES else (node.module, [a.name]))
    return out


def graph() -> dict[str, set[str]]:
    """module -> modules it imports (a submodule import also runs its packages' __init__)."""
    edges = {}
    for name in MODULES:
        deps = set()
        for mod, _ in _imports(name):
            parts = mod.split(".")
            deps |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)} & set(MODULES)
        edges[name] = deps - {name}
    return edges


def test_no_import_cycles():
    edges, state, cycles = graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(edges[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_cycle_detection_sees_function_level_imports(tmp_path):
    """The walk reads imports inside functions too (a loop hidden behind a local import counts)."""
    assert "dflash.launch.ray_train" in graph()["dflash.stages.train"]


def test_no_private_names_across_modules():
    bad = [f"{name} imports {n} from {mod}" for name in MODULES for mod, names in _imports(name) for n in names
           if n.startswith("_") and mod != name]
    assert not bad, bad


def test_every_stage_has_a_module_and_a_rule_and_the_readme_shows_the_table():
    from dflash.stages import REPORT, STAGES, markdown_table

    for st in (*STAGES, REPORT):
        assert f"dflash.stages.{st.name}" in MODULES, st.name
        assert (ROOT / "rules" / f"{st.name}.smk").is_file(), st.name
    assert markdown_table() in (ROOT / "README.md").read_text()


def test_tests_copy_the_same_files_from_a_plain_source_copy(monkeypatch):
    """From a release archive (no .git) the tests copy the files git would list."""
    import conftest

    with_git = conftest.source_files()
    exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self: self.name != ".git" and exists(self))
    assert conftest.source_files() == sorted(with_git)
