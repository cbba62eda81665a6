"""The core's shape: imports point one way, and CONTRIBUTING's house map matches the modules."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

from helpers import REPO

CORE = REPO / "core"
PLUGINS = REPO / "plugins" / "lorakit_plugins"


def _modules() -> dict[str, Path]:
    """Every module of the lorakit package by dotted name (a package by its ``__init__``)."""
    out = {}
    for f in sorted((CORE / "lorakit").rglob("*.py")):
        parts = f.relative_to(CORE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports() -> dict[str, set[str]]:
    """module -> the lorakit modules it imports: at module level, inside functions (a lazy
    import is still a dependency) and for type checking alike. The package itself is left out
    (``from lorakit import __version__``)."""
    modules = _modules()

    def owner(name: str) -> str | None:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in modules and name != "lorakit" else None

    graph: dict[str, set[str]] = {}
    for name, f in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)  # a submodule
        graph[name] = {m for t in found if (m := owner(t)) is not None and m != name}
    return graph


def _reached(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        if (m := todo.pop()) not in seen:
            seen.add(m)
            todo += graph[m]
    return seen


def test_recipe_validation_imports_nothing_above_it():
    """lorakit.recipe validates every section, [eval] and [log] included, without importing the
    modules that use a recipe (issue 20: recipe -> tracking / evaluation was an import cycle)."""
    reached = _reached(_imports(), "lorakit.recipe")
    assert {"lorakit.recipe", "lorakit.sections", "lorakit.catalog"} <= reached
    above = ("tracking", "evaluation", "components", "session", "runner", "load_run", "cli")
    bad = sorted(m for m in reached if m.split(".")[1] in above)
    assert not bad, f"lorakit.recipe imports (directly or not) {bad}"


def test_core_modules_import_one_way():
    """No import cycle between core modules: each can be read knowing only what it imports."""
    graph = _imports()
    cycles = sorted(
        f"{a} <-> {b}" for a in graph for b in graph[a] if a < b and a in _reached(graph, b)
    )
    assert not cycles, "modules that import each other (directly or not):\n" + "\n".join(cycles)


def _house_map() -> list[str]:
    """The paths in the first column of CONTRIBUTING's layout table, relative to the repo
    (``sections.py`` after ``core/lorakit/recipe.py`` is ``core/lorakit/sections.py``)."""
    text = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")
    table = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    paths = []
    for row in re.findall(r"^\| (.+?) \|", table, flags=re.M):
        folder = ""
        for token in re.findall(r"`([^`]+)`", row):
            if "/" in token:
                folder = token if token.endswith("/") else token.rsplit("/", 1)[0] + "/"
                paths.append(token)
            else:
                paths.append(folder + token)
    return paths


def test_house_map_names_every_core_module_and_nothing_else():
    paths = _house_map()
    stale = [p for p in paths if not any(REPO.glob(p.rstrip("/")))]
    assert not stale, f"CONTRIBUTING.md's layout names paths that do not exist: {stale}"
    wanted = [
        f"core/lorakit/{f.name}" + ("/" if f.is_dir() else "")
        for f in sorted((CORE / "lorakit").iterdir())
        if (f.suffix == ".py" and f.name != "__init__.py") or (f / "__init__.py").is_file()
    ]
    missing = [m for m in wanted if not any(fnmatch.fnmatch(m, p) for p in paths)]
    assert not missing, f"add these core modules to CONTRIBUTING.md's layout table: {missing}"


# The modules that run a step of catalog -> recipe -> components, each for a reason of its own.
BUILDERS = {
    "session.py": "the sequence itself, for every verb",
    "load_run.py": "a run folder's saved recipe (open_run, open_target), for open_session(runs=True)",
}


def _build_steps_used(f: Path, root: Path = REPO) -> list[str]:
    """Where ``f`` imports (or reaches as ``module.name``) a step of the build sequence."""
    steps = {
        ("lorakit.recipe", "load_recipe"),
        ("lorakit.recipe", "validate"),
        ("lorakit.components", "build_components"),
        ("lorakit.load_run", "open_run"),
        ("lorakit.load_run", "open_target"),
    }
    unique = {"load_recipe", "build_components", "open_run", "open_target"}
    found = []
    for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            found += [
                f"{node.lineno} imports {a.name}"
                for a in node.names
                if (node.module, a.name) in steps
            ]
        elif isinstance(node, ast.Attribute) and node.attr in unique:
            found.append(f"{node.lineno} uses .{node.attr}")
    return [f"{f.relative_to(root)}:{where}" for where in found]


def test_verbs_open_their_recipe_through_one_function(tmp_path):
    """catalog -> recipe -> components is lorakit.session.open_session, not a copy per verb
    (``lorakit export`` included, issue 20): no module of the core or the built-in plugins
    outside ``BUILDERS`` runs a step of it."""
    allowed = {CORE / "lorakit" / name for name in BUILDERS}
    files = [*sorted((CORE / "lorakit").rglob("*.py")), *sorted(PLUGINS.rglob("*.py"))]
    copies = [use for f in files if f not in allowed for use in _build_steps_used(f)]
    assert not copies, "use lorakit.session.open_session:\n" + "\n".join(copies)
    # the check sees a copy: the sequence as export/folder.py held it before issue 20
    copy = tmp_path / "copy.py"
    copy.write_text(
        "from lorakit.components import build_components\n"
        "from lorakit.load_run import open_run, prepare_inference\n"
        "import lorakit.recipe\n"
        "recipe = lorakit.recipe.load_recipe(path)\n",
        encoding="utf-8",
    )
    assert [u.split(":", 1)[1] for u in _build_steps_used(copy, tmp_path)] == [
        "1 imports build_components",
        "2 imports open_run",
        "4 uses .load_recipe",
    ]


def test_open_session_builds_a_recipes_plugins_once(tmp_path, chat_file):
    from lorakit.session import open_session

    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[[data.sources]]\nplugin = "chat_jsonl"\npath = "{chat_file.name}"\n'
        '[eval]\nmetrics = ["exact_match"]\n[eval.metric_options.exact_match]\nignore_case = true\n',
        encoding="utf-8",
    )
    session = open_session(recipe, ["train.max_steps=3"])
    assert session.recipe.train.max_steps == 3 and session.run_dir is None
    assert list(session.components.metrics) == ["exact_match"]
    assert session.components.metrics["exact_match"].options.ignore_case is True
    assert session.components.loggers == {}  # metrics.jsonl is the core's, not a logger
    # with runs=True a recipe file is still a recipe file; its run does not exist yet
    assert open_session(recipe, runs=True).run_dir is None
