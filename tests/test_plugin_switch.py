"""Entry points that fail to load or to register stop nothing; LORAKIT_PLUGINS /
LORAKIT_DISABLE_PLUGINS choose what loads; a name registered twice names the packages to
uninstall.

Each test installs a real distribution for ``importlib.metadata`` to find: a ``.dist-info``
folder with an ``entry_points.txt`` on ``sys.path``, as pip would leave it.
"""

from __future__ import annotations

import textwrap

import pytest
from helpers import write_recipe


def _install(root, dist: str, entry_points: dict[str, str], modules: dict[str, str] = {}):  # noqa: B006
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[lorakit]\n{lines}")
    for name, code in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(code))


@pytest.fixture()
def site(tmp_path, monkeypatch):
    """A folder on sys.path for fake installed packages, and a fresh default catalog."""
    from lorakit.catalog import reset_default_catalog

    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv("LORAKIT_PLUGINS", raising=False)
    monkeypatch.delenv("LORAKIT_DISABLE_PLUGINS", raising=False)
    reset_default_catalog()
    yield folder
    reset_default_catalog()


def _recipe(tmp_path, source: str):
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"id": "a", "messages": [{"role": "user", "content": "hi"}, '
        '{"role": "assistant", "content": "hello"}]}\n'
    )
    return write_recipe(tmp_path, [{"plugin": source, "path": str(data)}])


def test_a_broken_plugin_is_listed_and_stops_nothing(site, tmp_path, cli, monkeypatch):
    _install(site, "lorakit-broken", {"source_broken": "no_such_module_for_lorakit"})
    code, out, err = cli("plugins")
    assert code == 0, err
    assert "source_broken (lorakit-broken 0.1) failed to load: ModuleNotFoundError" in out
    assert "chat_jsonl" in out  # everything else still loads
    assert "LORAKIT_DISABLE_PLUGINS=source_broken" in err  # said once, with the way out

    code, _, err = cli("check", _recipe(tmp_path, "chat_jsonl"))
    assert code == 0, err
    code, _, err = cli("check", _recipe(tmp_path, "broken"))
    assert code == 2 and "Traceback" not in err
    assert 'unknown source plugin "broken"' in err
    assert "not loaded: plugin source_broken (lorakit-broken 0.1) failed to load" in err

    from lorakit.catalog import reset_default_catalog

    monkeypatch.setenv("LORAKIT_DISABLE_PLUGINS", "lorakit-broken")
    reset_default_catalog()
    code, out, err = cli("plugins")
    assert code == 0 and "source_broken (lorakit-broken 0.1) switched off" in out
    assert "failed to load" not in out + err


_METRIC = """
import attrs
from lorakit.api import hookimpl

class Extra:
    Options = attrs.make_class("ExtraOptions", {})
    kind = "loss"
    higher_is_better = False

    def __init__(self, options):
        pass

    def score(self, nll, n):
        return 0.0

@hookimpl
def lorakit_register_metrics(register):
    for name in NAMES:
        register(name, Extra)
"""


def _install_metrics(site, dist: str, entry_point: str, names: list[str]) -> None:
    module = entry_point + "_module"
    _install(site, dist, {entry_point: module}, {module: f"NAMES = {names!r}\n{_METRIC}"})


def test_lorakit_plugins_limits_third_party_plugins(site, cli, monkeypatch):
    _install_metrics(site, "lorakit-extra", "metric_extra", ["extra"])
    from lorakit.catalog import default_catalog, reset_default_catalog

    assert "extra" in default_catalog().names("metric")
    monkeypatch.setenv("LORAKIT_PLUGINS", "")  # no third-party plugin; built-ins still load
    reset_default_catalog()
    catalog = default_catalog()
    assert "extra" not in catalog.names("metric") and "json_match" in catalog.names("metric")
    monkeypatch.setenv("LORAKIT_PLUGINS", "metric_extra")
    reset_default_catalog()
    assert "extra" in default_catalog().names("metric")


def test_a_name_registered_twice_names_both_packages(site, cli):
    _install(
        site,
        "lorakit-dup",
        {"source_dup": "lorakit_dup_source"},
        {
            "lorakit_dup_source": """
            from lorakit.api import hookimpl
            from lorakit_plugins.sources.chat_jsonl import ChatJsonlSource

            @hookimpl
            def lorakit_register_sources(register):
                register("chat_jsonl", ChatJsonlSource)
            """
        },
    )
    code, _, err = cli("plugins")
    assert code == 2 and "Traceback" not in err
    assert "registered twice" in err and "package lorakit 0.1.0" in err
    assert "package lorakit-dup 0.1" in err and "pip uninstall" in err


_SOURCE = """
import attrs
from lorakit.api import hookimpl


class Good:
    Options = attrs.make_class("GoodOptions", {})
"""


@pytest.mark.parametrize(
    ("module", "code", "reason"),
    [
        (
            "fake_raises",
            """
            @hookimpl
            def lorakit_register_formatters(register):
                register("fakefmt", Good)  # dropped too: the plugin is skipped whole

            @hookimpl
            def lorakit_register_sources(register):
                register("csvx", Good)
                raise RuntimeError("hook exploded")
            """,
            "RuntimeError: hook exploded",
        ),
        (
            "fake_none_options",
            """
            class Bad:
                Options = None

            @hookimpl
            def lorakit_register_formatters(register):
                register("fakefmt", Good)

            @hookimpl
            def lorakit_register_sources(register):
                register("csvx", Bad)
            """,
            "source 'csvx' from source_csvx has no attrs Options class",
        ),
        (
            "fake_plain_options",
            """
            class Bad:
                class Options:  # a plain class, not attrs
                    pass

            @hookimpl
            def lorakit_register_sources(register):
                register("fakefmt_unused", Good)
                register("csvx", Bad)
            """,
            "source 'csvx' from source_csvx has no attrs Options class",
        ),
    ],
)
def test_a_plugin_that_fails_to_register_is_skipped_and_named(
    site, tmp_path, cli, module, code, reason
):
    _install(
        site,
        "fake-badreg",
        {"source_csvx": module},
        {module: _SOURCE + textwrap.dedent(code)},
    )
    code_, out, err = cli("plugins")
    assert code_ == 0 and "Traceback" not in err, err
    assert f"plugin source_csvx (fake-badreg 0.1) failed to register: {reason}" in out
    assert "chat_jsonl" in out and "fakefmt" not in out  # the others load; it loads nothing
    assert "`pip uninstall fake-badreg`" in err and "LORAKIT_DISABLE_PLUGINS=source_csvx" in err

    code_, _, err = cli("check", _recipe(tmp_path, "chat_jsonl"))
    assert code_ == 0, err
    code_, _, err = cli("check", _recipe(tmp_path, "csvx"))
    assert code_ == 2 and "Traceback" not in err
    assert 'source plugin "csvx" is not loaded: plugin source_csvx (fake-badreg 0.1)' in err
    assert reason in err and "pip uninstall fake-badreg" in err and "pip install -U" in err


def test_a_built_in_plugin_that_fails_to_register_is_lorakits_bug(site, cli):
    _install(
        site,
        "lorakit",
        {"source_fake_builtin": "fake_builtin_raises"},
        {
            "fake_builtin_raises": """
            from lorakit.api import hookimpl

            @hookimpl
            def lorakit_register_sources(register):
                raise RuntimeError("hook exploded")
            """
        },
    )
    code, _, err = cli("plugins")
    assert code == 2 and "Traceback" not in err
    assert "built-in plugin source_fake_builtin (lorakit 0.1) failed to register" in err
    assert "RuntimeError: hook exploded" in err and "bug in lorakit" in err
    assert "LORAKIT_DISABLE_PLUGINS=source_fake_builtin" in err


@pytest.mark.parametrize("name", ["chat_jsonl", "Chat-JSONL", "source_chat_jsonl"])
def test_disable_takes_the_name_a_recipe_uses_or_the_entry_point(
    site, tmp_path, cli, monkeypatch, name
):
    monkeypatch.setenv("LORAKIT_DISABLE_PLUGINS", name)
    code, out, err = cli("plugins", "--kind", "source")
    assert code == 0 and "matches no plugin" not in err, err
    rows = [line.split()[1] for line in out.split("\n\n")[0].splitlines()[1:]]
    assert "chat_jsonl" not in rows and "sharegpt" in rows
    assert "switched off" in out.split("\n\n")[1]
    code, _, err = cli("check", _recipe(tmp_path, "chat_jsonl"))
    assert code == 2 and "Traceback" not in err
    # by its name, the name is known to be switched off; by entry point, it was never imported
    by_entry_point = name.startswith("source_")
    said = "source_chat_jsonl" if by_entry_point else 'source plugin "chat_jsonl" is not loaded'
    assert said in err and "switched off" in err


def test_a_plugin_name_switches_off_that_name_only(site, cli, monkeypatch):
    _install_metrics(site, "lorakit-two", "metric_two", ["first", "second"])
    monkeypatch.setenv("LORAKIT_DISABLE_PLUGINS", "first")
    code, out, err = cli("plugins", "--kind", "metric")
    assert code == 0, err
    assert "metric first of plugin metric_two (lorakit-two 0.1) switched off" in out
    second = next(line for line in out.splitlines() if line.startswith("metric     second"))
    assert second.split() == ["metric", "second", "metric_two", "lorakit-two", "0.1"]


def test_lorakit_plugins_takes_a_plugin_name(site, monkeypatch):
    _install_metrics(site, "lorakit-pick", "metric_pick", ["picked", "not_picked"])
    _install_metrics(site, "lorakit-other", "metric_other", ["other"])
    monkeypatch.setenv("LORAKIT_PLUGINS", "picked")
    from lorakit.catalog import default_catalog

    catalog = default_catalog()
    names = catalog.names("metric")
    assert "picked" in names and "json_match" in names  # built-ins always load
    assert "not_picked" not in names and "other" not in names
    assert "plugin metric_other (lorakit-other 0.1) switched off" in [
        s.line() for s in catalog.skipped
    ]
    assert catalog.unmatched == []


def test_a_name_that_matches_nothing_is_said_once_with_the_closest(site, cli, monkeypatch):
    monkeypatch.setenv("LORAKIT_DISABLE_PLUGINS", "chat_jsnl")
    monkeypatch.setenv("LORAKIT_PLUGINS", "zzz_nothing")
    code, out, err = cli("plugins")
    assert code == 0
    assert "LORAKIT_DISABLE_PLUGINS: 'chat_jsnl' matches no plugin" in err
    assert "did you mean 'chat_jsonl'?" in err
    assert "LORAKIT_PLUGINS: 'zzz_nothing' matches no plugin" in err
    assert "chat_jsonl" in out  # nothing was switched off
    code, _, err = cli("plugins")
    assert code == 0 and "matches no plugin" not in err  # once per process
