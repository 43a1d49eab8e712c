"""The package's shape: imports only downward in the layer order of ARCHITECTURE.md, no import cycles (module-level
and function-level imports alike), no private names imported across modules, one stage table that the README and
the rules follow."""

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
    assert "dflash.training.ray_train" in graph()["dflash.stages.train"]


# ARCHITECTURE.md's layer order, lowest first: a module imports only from its own layer or a lower one. The layer
# of a module is its top-level name under dflash (a folder or a module); the package's __init__ is in none.
LAYERS = (
    ("errors", "checksums", "ports", "processes"),
    ("data",),
    ("plan",),
    ("modeling", "decoding", "training", "results"),
    ("stages",),
    ("launch", "cli"),
)


def layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1:
        return None
    found = [i for i, names in enumerate(LAYERS) if parts[1] in names]
    assert found, f"{module}: dflash.{parts[1]} is in no layer of LAYERS (add it, and to ARCHITECTURE.md)"
    return found[0]


def test_layers_are_the_ones_architecture_md_states():
    text = " ".join((ROOT / "ARCHITECTURE.md").read_text().split())
    stated = " < ".join(", ".join(f"`{n}`" for n in names) for names in LAYERS)
    assert stated in text, f"ARCHITECTURE.md should state the layer order: {stated}"


def test_imports_go_only_downward():
    """No module imports from a layer above its own (function-level imports included)."""
    edges = graph()
    up = [f"{name} (layer {layer(name)}) imports {dep} (layer {layer(dep)})" for name in sorted(edges)
          for dep in sorted(edges[name]) if layer(name) is not None and layer(dep) is not None
          and layer(dep) > layer(name)]
    assert not up, "imports from a higher layer:\n" + "\n".join(up)


def test_layer_check_sees_an_upward_import():
    assert layer("dflash.stages.train") > layer("dflash.training.loop") > layer("dflash.plan.keys")
    assert layer("dflash.launch.commands") > layer("dflash.stages.runner") > layer("dflash.plan.stages")


def _closure(start: str) -> set[str]:
    edges, seen, todo = graph(), set(), [start]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo += edges[mod]
    return seen


def _third_party(name: str) -> set[str]:
    tree = ast.parse(MODULES[name].read_text())
    return {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names} | {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_loading_a_drafter_needs_neither_jsonschema_nor_the_stage_table():
    needed = _closure("dflash.modeling.drafter")
    assert not needed & {"dflash.plan.config", "dflash.plan.stages", "dflash.plan.keys"}, sorted(needed)
    assert not [m for m in needed if "jsonschema" in _third_party(m)]


def test_no_private_names_across_modules():
    bad = [f"{name} imports {n} from {mod}" for name in MODULES for mod, names in _imports(name) for n in names
           if n.startswith("_") and mod != name]
    assert not bad, bad


def test_every_stage_has_a_module_and_a_rule_and_the_readme_shows_the_table():
    """Each stage's code is dflash.stages.<name>; its rules come from the table (rules/stages.smk loops over STAGES,
    rules/report.smk holds the report's); the README shows the table as `dflash stages` prints it."""
    from dflash.plan.stages import REPORT, STAGES, markdown_table

    for st in (*STAGES, REPORT):
        assert f"dflash.stages.{st.name}" in MODULES, st.name
    snakefile = (ROOT / "Snakefile").read_text()
    assert 'include: "rules/stages.smk"' in snakefile and 'include: "rules/report.smk"' in snakefile
    rules = (ROOT / "rules" / "stages.smk").read_text()
    assert "for s in STAGES if not s.engine" in rules and "for s in STAGES if s.engine" in rules
    assert not [p.name for p in (ROOT / "rules").glob("*.smk") if p.stem in {s.name for s in STAGES}]
    assert markdown_table() in (ROOT / "README.md").read_text()


def test_the_schema_has_a_resources_entry_per_stage_of_the_table():
    from dflash.plan.config import load_schema
    from dflash.plan.stages import RESOURCE_ENTRIES, STAGES

    run = load_schema()["$defs"]["run"]["properties"]
    assert tuple(run["resources"]["properties"]) == RESOURCE_ENTRIES
    assert set(RESOURCE_ENTRIES) <= {s.name for s in STAGES}


def test_every_report_file_has_a_caption():
    """rules/report.smk names the report's outputs from TABLES and FIGURES, each with workflow/report/<name>.rst."""
    from dflash.results.report import FIGURES, REFERENCE_TABLES, TABLES

    assert set(REFERENCE_TABLES) <= set(TABLES)
    names = [*TABLES, *(f"{n}_fig" if n in TABLES else n for n in (f.removesuffix(".png") for f in FIGURES))]
    assert all((ROOT / "workflow" / "report" / f"{n}.rst").is_file() for n in ["report", *names]), names


def test_tests_copy_the_same_files_from_a_plain_source_copy(monkeypatch):
    """From a release archive (no .git) the tests copy the files git would list."""
    import conftest

    with_git = conftest.source_files()
    exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self: self.name != ".git" and exists(self))
    assert conftest.source_files() == sorted(with_git)
