"""Plugin contracts are enforced at the boundary, plugins import only lorakit.api, and the core
does not know the built-in plugins by name."""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import attrs
import pytest
from lorakit import api
from lorakit.catalog import build_catalog, make_manager
from lorakit.components import build_components
from lorakit.contracts import Example, Message
from lorakit.data.pipeline import DataReport, read_examples
from lorakit.data.validate import example_problem
from lorakit.errors import PluginError
from lorakit.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
CHAT = (Message("user", "q"), Message("assistant", "a"))


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"id": "", "messages": CHAT}, "non-empty string"),
        ({"id": 3, "messages": CHAT}, "id is 3"),
        ({"id": "x"}, "exactly one of messages or text"),
        ({"id": "x", "messages": CHAT, "text": "t"}, "exactly one of messages or text"),
        ({"id": "x", "messages": [*CHAT]}, "tuple of Message"),
        ({"id": "x", "messages": (Message("function", "t"),)}, "role is 'function'"),
        ({"id": "x", "messages": (Message("user", "q"), Message("tool", "t"))}, "tool result"),
        ({"id": "x", "messages": (*CHAT, Message("system", "s"))}, "system message may only"),
        ({"id": "x", "messages": (Message("assistant", "a"),)}, "must follow a user turn"),
        ({"id": "x", "messages": (Message("user", "q"), *CHAT)}, "two user turns"),
        ({"id": "x", "messages": (Message("user", "q"),)}, "no assistant turn"),
        ({"id": "x", "messages": ({"role": "user"},)}, "not a Message"),
        ({"id": "x", "messages": (Message("user", 5), CHAT[1])}, "content is a int"),  # type: ignore[arg-type]
        ({"id": "x", "text": b"bytes"}, "text is a bytes"),
        ({"id": "x", "text": "\ud800"}, "lone surrogate"),
        ({"id": "x", "text": "t", "meta": {"split": "validation"}}, "meta.split is 'validation'"),
        ({"id": "x", "text": "t", "meta": {"tags": "a,b"}}, "meta.tags must be a list"),
        ({"id": "x", "text": "t", "meta": {"source": 7}}, "meta.source must be a string"),
        ({"id": "x", "text": "t", "meta": {"chunkable": "yes"}}, "meta.chunkable"),
        ({"id": "x", "text": "t", "meta": {"score": math.nan}}, "meta.score is nan"),
        ({"id": "x", "text": "t", "meta": {"a": {"b": [math.inf]}}}, "meta.a.b[0] is inf"),
        ({"id": "x", "text": "t", "meta": {"n": 10**30}}, "meta.n is out of 64-bit range"),
        ({"id": "x", "text": "t", "meta": {"when": object()}}, "meta.when is a object"),
        ({"id": "x", "text": "t", "meta": {"m": {1: "a"}}}, "key 1 that is not a string"),
        ({"id": "x", "text": "t", "meta": "src"}, "meta is a str"),
    ],
)
def test_example_contract_rules(record, problem):
    assert problem in (example_problem(Example(**record)) or "")


def test_good_examples_pass_the_contract():
    meta = {"source": "f:1", "tags": ["a"], "split": "val", "chunkable": True, "x": {"y": [1, 2.5]}}
    assert example_problem(Example(id="a", messages=CHAT, meta=meta)) is None
    assert example_problem(Example(id="b", text="t", meta={"split": None})) is None
    assert example_problem({"id": "c"}) == "yielded a dict, not a lorakit Example"


@attrs.frozen
class _Opts:
    path: str = "data.txt"


def _source(records):
    class Throwaway:
        Options = _Opts

        def __init__(self, options):
            self.options = options

        def read(self, ctx):
            yield from records()

    def lorakit_register_sources(register):
        register("throwaway", Throwaway)

    return SimpleNamespace(lorakit_register_sources=api.hookimpl(lorakit_register_sources))


def _read(tmp_path, records):
    catalog = build_catalog(make_manager([_source(records)]))
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text('[[data.sources]]\nplugin = "throwaway"\n', encoding="utf-8")
    recipe = load_recipe(recipe_file, catalog=catalog)
    sources = build_components(recipe, catalog).sources
    return read_examples(sources, recipe.data, recipe.recipe_dir, DataReport())


def test_a_record_that_breaks_the_contract_names_the_plugin_and_the_record(tmp_path):
    def records():
        yield Example(id="ok", messages=CHAT, meta={"source": "d.csv:2"})
        yield Example(id="r7", messages=CHAT, meta={"source": "d.csv:3", "split": "validation"})

    with pytest.raises(PluginError) as err:
        _read(tmp_path, records)
    text = str(err.value)
    assert "source plugin 'throwaway'" in text and "meta.split is 'validation'" in text
    assert "[data.sources.0]: d.csv:3 id 'r7'" in text and "ctx.reject" in text


def test_a_source_that_crashes_is_reported_as_the_plugins_bug(tmp_path):
    def records():
        yield Example(id="ok", text="t", meta={"source": "d.txt:1"})
        raise KeyError("column")

    with pytest.raises(PluginError) as err:
        _read(tmp_path, records)
    text = str(err.value)
    assert "source plugin 'throwaway'" in text and "KeyError" in text
    assert "after d.txt:1 id 'ok'" in text and "bug in the plugin" in text


def test_a_third_party_split_name_is_a_clear_error_not_a_keyerror(tmp_path):
    """Issue 13 item 10: meta.split = "validation" from a package crashed with a KeyError."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "lorakit_badsplit.py").write_text(
        textwrap.dedent(
            """
            import attrs
            from lorakit.api import Example, Message, hookimpl

            @attrs.frozen
            class Opts:
                n: int = 3

            class Bad:
                Options = Opts
                def __init__(self, options):
                    self.options = options
                def read(self, ctx):
                    for i in range(self.options.n):
                        yield Example(id=f"r{i}", messages=(Message("user", "q"),
                                      Message("assistant", "a")),
                                      meta={"source": f"rows.csv:{i + 2}", "split": "validation"})

            @hookimpl
            def lorakit_register_sources(register):
                register("badsplit", Bad)
            """
        )
    )
    info = site / "lorakit_badsplit-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lorakit-badsplit\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[lorakit]\nbadsplit = lorakit_badsplit\n")
    (tmp_path / "r.toml").write_text('[[data.sources]]\nplugin = "badsplit"\n')
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-m", "lorakit.cli.main", "check", "r.toml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "KeyError" not in done.stderr
    assert "source plugin 'badsplit'" in done.stderr
    assert "package lorakit-badsplit 0.3" in done.stderr
    assert "rows.csv:2 id 'r0'" in done.stderr and "meta.split is 'validation'" in done.stderr


def _lorakit_imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lorakit":
            out.append((node.lineno, str(node.module)))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lorakit"]
    return out


def test_built_in_plugins_import_only_the_public_api():
    files = sorted((REPO / "plugins").rglob("*.py"))
    files += sorted((REPO / "examples" / "plugins").rglob("*.py"))
    assert len(files) > 20
    bad = [
        f"{f.relative_to(REPO)}:{line} imports {module}"
        for f in files
        for line, module in _lorakit_imports(f)
        if module != "lorakit.api"
    ]
    assert not bad, "plugins import from lorakit.api only:\n" + "\n".join(bad)


def test_public_api_is_complete_and_light():
    for name in api.__all__:
        assert getattr(api, name) is not None, name
    code = "import sys, lorakit.api; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_core_never_compares_with_a_built_in_plugin_name():
    """The core asks a plugin (e.g. QuantBackend.quantizes) instead of testing its name."""
    catalog = build_catalog(make_manager())
    builtin = {e.name for e in catalog.all() if e.distribution == "lorakit"}
    assert {"none", "chat_jsonl", "bnb-4bit"} <= builtin
    found = []
    for f in sorted((REPO / "core" / "lorakit").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            names = [s.value for s in sides if isinstance(s, ast.Constant) and s.value in builtin]
            # a plugin's name compared with a plugin choice (``.name``, ``["plugin"]``...)
            if names and any("name" in t or "plugin" in t for t in map(ast.unparse, sides)):
                found.append(f"{f.relative_to(REPO)}:{node.lineno} tests {names[0]!r}")
    assert not found, "\n".join(found)


def _built(kind: str, name: str):
    from lorakit.catalog import default_catalog

    entry = default_catalog().get(kind, name)
    required = {("model", "local"): {"path": "."}, ("model", "hub"): {"id": "org/model"}}
    cls = entry.options_class
    return entry.factory(cls(**required.get((kind, name), {})) if cls is not None else None)


# plugin kind, name -> the optional capabilities the core asks it for
CAPABILITIES = {
    ("quant", "bnb-4bit"): {"FinishesLoading", "DescribesMemory", "ComputeDtypeSwitch"},
    ("quant", "bnb-8bit"): {"DescribesMemory", "ComputeDtypeSwitch"},
    ("quant", "none"): {"DescribesMemory", "ComputeDtypeSwitch"},
    ("peft", "lora"): {"DescribesMemory"},
    ("model", "smollm2-135m-instruct"): {"FindsTokenizer", "ReadsModelConfig"},
    ("model", "local"): {"FindsTokenizer", "ReadsModelConfig"},
    ("model", "hub"): {"FindsTokenizer", "ReadsModelConfig"},
    ("formatter", "chatml"): {"HasSystemPrompt"},
    ("formatter", "chat_template"): {"HasSystemPrompt"},
    ("formatter", "instruction"): {"HasSystemPrompt"},
    ("formatter", "mistral_inst"): {"HasSystemPrompt"},
}
OPTIONAL = [
    "FinishesLoading",
    "DescribesMemory",
    "ComputeDtypeSwitch",
    "FindsTokenizer",
    "ReadsModelConfig",
    "HasSystemPrompt",
]


@pytest.mark.parametrize(("kind", "name"), sorted(CAPABILITIES))
def test_built_in_plugins_have_exactly_their_capabilities(kind, name):
    """The core finds optional methods with ``isinstance(plugin, Capability)``: a built-in
    plugin has the ones it implements and no other (a misspelt method would drop out here)."""
    plugin = _built(kind, name)
    has = {cap for cap in OPTIONAL if isinstance(plugin, getattr(api, cap))}
    assert has == CAPABILITIES[(kind, name)]


def test_capabilities_return_what_the_core_reads():
    quant = _built("quant", "bnb-4bit")
    assert quant.dtype_setting == ("compute_dtype", "auto")
    assert _built("quant", "none").dtype_setting == ("dtype", "auto")
    switched = quant.with_compute_dtype("fp32")
    assert switched.dtype_setting == ("compute_dtype", "fp32")
    assert set(quant.memory_spec()) == {"weights", "double_quant", "dtype"}
    assert set(_built("peft", "lora").memory_spec()) >= {"r", "targets", "dora"}
    assert _built("formatter", "chatml").system_prompt is None


def test_metrics_are_one_of_two_kinds():
    from lorakit.catalog import default_catalog

    for entry in default_catalog().entries["metric"].values():
        metric = entry.factory(entry.options_class() if entry.options_class else None)
        assert metric.kind in ("loss", "generation"), entry.name
        kind = api.LossMetric if metric.kind == "loss" else api.GenerationMetric
        assert isinstance(metric, kind), entry.name


def test_core_finds_optional_methods_by_type_not_by_name():
    """No ``getattr``/``hasattr`` of a plugin method or option in the core: optional methods
    are capabilities (``isinstance``), options the core needs are part of one. The catalog
    alone reads the class attributes every plugin of a kind must have, to refuse a plugin
    without them when it registers."""
    watched = {
        "finish_loading",
        "memory_spec",
        "tokenizer_folder",
        "model_config",
        "system_prompt",
        "requires",
        "compute_dtype",
        "dtype",
        "dtype_setting",
        "quantizes",
        "kind",
        "higher_is_better",
        "with_compute_dtype",
    }
    found = []
    core = REPO / "core" / "lorakit"
    for f in sorted(set(core.rglob("*.py")) - {core / "catalog.py"}):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            if node.func.id not in ("getattr", "hasattr") or len(node.args) < 2:
                continue
            attr = node.args[1]
            if isinstance(attr, ast.Constant) and attr.value in watched:
                found.append(f"{f.relative_to(REPO)}:{node.lineno} {node.func.id} {attr.value!r}")
    assert not found, "\n".join(found)


def _string_constants(node: ast.AST, names: set[str]) -> list[ast.Constant]:
    return [
        n
        for n in ast.walk(node)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names
    ]


def test_core_sets_no_built_in_plugin_as_a_default():
    """Defaults come from plugins that declare themselves the default (``default = True``),
    never from a built-in name in the core: none in module or class attributes (tables,
    ``option`` defaults) or in function defaults."""
    catalog = build_catalog(make_manager())
    builtin = {e.name for e in catalog.all() if e.distribution == "lorakit"}
    # accelerate's own values that happen to equal a plugin's name
    allowed = {("accelerate_keys.py", "none")}
    found = []
    core = REPO / "core" / "lorakit"
    for f in sorted(core.rglob("*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        spots: list[ast.Constant] = []
        bodies = [tree.body] + [n.body for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
        for body in bodies:
            for st in body:
                if isinstance(st, (ast.Assign, ast.AnnAssign)) and st.value is not None:
                    spots += _string_constants(st.value, builtin)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                for d in [*node.args.defaults, *(d for d in node.args.kw_defaults if d)]:
                    spots += _string_constants(d, builtin)
        found += [
            f"{f.relative_to(REPO)}:{c.lineno} {c.value!r}"
            for c in spots
            if (f.name, c.value) not in allowed
        ]
    assert not found, "\n".join(found)


def test_the_built_in_defaults_are_declared_by_the_plugins():
    catalog = build_catalog(make_manager())
    assert {k: catalog.defaults(k) for k in ("model", "formatter", "quant", "peft", "metric")} == {
        "model": ["smollm2-135m-instruct"],
        "formatter": ["chat_template"],
        "quant": ["none"],
        "peft": ["lora"],
        "metric": ["eval_loss", "perplexity"],
    }


def test_two_defaults_for_one_kind_make_a_recipe_name_its_plugin(tmp_path):
    """A third-party package that also declares a default quant backend does not silently
    replace the built-in one: a recipe without [quant] plugin is told to name one."""
    from lorakit.errors import RecipeError

    catalog = build_catalog(make_manager())
    other = catalog.entries["quant"]["bnb-8bit"]
    factory = type("Mine", (other.factory,), {"default": True})
    catalog.entries["quant"]["mine"] = attrs.evolve(
        other, name="mine", factory=factory, distribution="lorakit-mine", version="1.0"
    )
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[data.sources]]\nplugin = "chat_jsonl"\npath = "d.jsonl"\n')
    with pytest.raises(RecipeError, match=r"2 quant plugins declare themselves the default"):
        load_recipe(recipe, (), catalog)
    ok = load_recipe(recipe, ("quant.plugin=none",), catalog)
    assert ok.quant.name == "none"
