"""Helpers for the data tests: read contexts, files, recipes, and the CLI in-process."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from lorakit.data.pipeline import DataReport, ReadContext


def context(tmp_path: Path, on_error: str = "fail") -> ReadContext:
    return ReadContext(recipe_dir=tmp_path, on_error=on_error, report=DataReport())


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    return path


def write_recipe(folder: Path, sources: list[dict[str, Any]], **sections: dict[str, Any]) -> Path:
    """A recipe in ``folder`` with ``sources`` and extra sections (written as TOML)."""

    def value(v: Any) -> str:
        return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")

    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {value(v)}" for k, v in table.items()]
    if "data" not in sections:
        lines.append("[data]")
    for src in sources:
        lines.append("[[data.sources]]")
        lines += [f"{k} = {value(v)}" for k, v in src.items()]
    lines.append("[output]")
    lines.append(f"dir = {value(str(folder / 'runs'))}")
    path = folder / "recipe.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cli(*argv: str) -> tuple[int, str, str]:
    """Run ``lorakit`` in-process; return (exit code, stdout, stderr)."""
    from lorakit.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()
