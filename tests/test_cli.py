"""The CLI: errors in one or two lines, non-zero exit, no traceback, no torch for check."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import run_probe
from lorakit.errors import RecipeError

BAD = """
# a recipe with three mistakes
[quant]
plugin = "bnb-4bti"
[peft]
r = "8"
[train]
lerning_rate = 1e-4
[[data.sources]]
plugin = "chat_jsonl"
path = "chat.jsonl"
"""


def test_check_reports_all_problems_without_torch(tmp_path):
    (tmp_path / "bad.toml").write_text(BAD)
    res = run_probe("check", "bad.toml", cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "3 problems in recipe" in res.stderr
    assert '[quant].plugin: unknown quant plugin "bnb-4bti"' in res.stderr
    assert '[peft].r: expected an integer, got "8"' in res.stderr
    assert "[train].lerning_rate: unknown key, did you mean learning_rate?" in res.stderr
    assert "HEAVY:\n" in res.stderr, "check must not import torch/transformers"


def test_check_good_recipe_reads_data_without_torch(tmp_path, chat_file):
    recipe = tmp_path / "ok.toml"
    recipe.write_text(f'[[data.sources]]\nplugin = "chat_jsonl"\npath = "{chat_file}"\n')
    res = run_probe("check", str(recipe), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "40 examples" in res.stdout
    assert "torch" not in res.stderr.split("HEAVY:")[1]


def test_plugins_and_help_do_not_import_torch(tmp_path):
    expected = {
        ("plugins",): "chat_jsonl",
        ("--help",): "check",
        ("run", "--help"): "--resume-from-checkpoint",
        ("--version",): "lorakit 0.1.0",
    }
    for args, shown in expected.items():
        res = run_probe(*args, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert shown in res.stdout, res.stdout
        assert res.stderr.endswith("HEAVY:\n"), f"{args} imported {res.stderr}"


def test_debug_is_an_option_before_or_after_the_verb(cli, tmp_path):
    (tmp_path / "bad.toml").write_text(BAD)
    code, _, err = cli("check", tmp_path / "bad.toml")
    assert code == 2 and "3 problems in recipe" in err
    for argv in (
        ["--debug", "check", tmp_path / "bad.toml"],
        ["check", tmp_path / "bad.toml", "--debug"],
    ):
        with pytest.raises(RecipeError, match="3 problems"):
            cli(*argv)
    # after `--` the word is an (invalid) override, not the flag: a clean error, no traceback
    code, _, err = cli("check", tmp_path / "bad.toml", "--", "--debug")
    assert code == 2 and "override '--debug': expected KEY.PATH=VALUE" in err


def test_missing_recipe_file(cli, tmp_path):
    code, _, err = cli("check", str(tmp_path / "nope.toml"))
    assert code == 2 and "no such recipe file" in err and "Traceback" not in err


def test_debug_shows_traceback(tmp_path):
    (tmp_path / "bad.toml").write_text(BAD)
    res = subprocess.run(
        [sys.executable, "-m", "lorakit.cli.main", "--debug", "check", "bad.toml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_console_script_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "lorakit")
    res = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "run" in res.stdout and "check" in res.stdout


@pytest.mark.parametrize("count", ["-2", "-1", "two"])
def test_check_show_takes_a_count_of_zero_or_more(cli, tmp_path, chat_file, count):
    """--show -2 printed every example but the last two (a negative slice)."""
    recipe = tmp_path / "ok.toml"
    recipe.write_text(f'[[data.sources]]\nplugin = "chat_jsonl"\npath = "{chat_file}"\n')
    code, out, err = cli("check", recipe, "--show", count)
    assert code == 2 and "Traceback" not in err and not out
    assert f"argument --show: '{count}' is not a number of examples: use 0 or more" in err


def test_a_reader_that_stops_early_is_no_error(tmp_path):
    """``lorakit plugins | head -1``: the pipe closes before lorakit has written everything;
    that ends lorakit quietly (141, as a shell reports SIGPIPE), not with a traceback."""
    main = "import sys; from lorakit.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", main, "plugins"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # before lorakit writes its first line (it is still importing)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err
    assert "Traceback" not in err
