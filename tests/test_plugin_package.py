"""A third-party package that has nothing but an entry point is found and usable."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

PLUGIN = '''
"""A third-party data source: tab-separated question/answer pairs."""
from pathlib import Path

import attrs

from lorakit.api import Example, Message, hookimpl


@attrs.frozen
class TsvOptions:
    path: str


class TsvPairs:
    Options = TsvOptions

    def __init__(self, options):
        self.options = options

    def read(self, ctx):
        file = ctx.recipe_dir / self.options.path
        for n, line in enumerate(file.read_text().splitlines(), 1):
            q, a = line.split("\\t")
            yield Example(id=f"tsv{n}", messages=(Message("user", q), Message("assistant", a)),
                          meta={"source": f"{file}:{n}"})


@hookimpl
def lorakit_register_sources(register):
    register("tsv_pairs", TsvPairs)
'''


def install_fake_package(site: Path) -> None:
    """Lay the package out exactly as pip installs it: module + dist-info with entry_points."""
    (site / "lorakit_tsv.py").write_text(PLUGIN)
    info = site / "lorakit_tsv-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lorakit-tsv\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[lorakit]\ntsv = lorakit_tsv\n")
    (info / "RECORD").write_text("")


def run_cli(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "lorakit.cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def test_entry_point_only_plugin_is_listed_and_usable(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install_fake_package(site)
    listed = run_cli(["plugins"], site, tmp_path)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "tsv_pairs" in line)
    assert row.split()[:2] == ["source", "tsv_pairs"] and "lorakit-tsv 1.2.3" in row

    (tmp_path / "pairs.tsv").write_text("2+2?\t4\ncapital of France?\tParis\n3+3?\t6\n")
    (tmp_path / "r.toml").write_text(
        textwrap.dedent(
            """
            # uses a third-party source
            [[data.sources]]
            plugin = "tsv_pairs"
            path = "pairs.tsv"
            [data]
            val_fraction = 0.0
            test_fraction = 0.0
            """
        )
    )
    checked = run_cli(["check", "r.toml"], site, tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "tsv_pairs" in checked.stdout and "train 3" in checked.stdout.replace(":", "")


def test_plugins_lists_all_seven_kinds(cli):
    code, out, _ = cli("plugins")
    assert code == 0
    kinds = {line.split()[0] for line in out.splitlines()[1:] if line.strip()}
    assert kinds == {"model", "source", "formatter", "quant", "peft", "metric", "logger"}
    assert "lorakit 0.1.0" in out
