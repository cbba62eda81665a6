"""Resolve the files a data source reads."""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import DataError


def resolve(recipe_dir: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else recipe_dir / p


def expand_files(
    recipe_dir: Path, path: str, glob: str, key: str, exclude: tuple[str, ...] = ()
) -> list[Path]:
    """One file, or the files under a folder matching ``glob`` (sorted, so order is stable)."""
    root = resolve(recipe_dir, path)
    if root.is_file():
        return [root]
    refuse_special(root, key)
    if not root.exists():
        raise DataError(
            f"{root} does not exist",
            where=f"[data.sources].{key}",
            fix="paths are relative to the recipe file's folder; check the spelling",
        )
    files = sorted(
        f for f in root.glob(glob) if f.is_file() and not any(f.match(x) for x in exclude)
    )
    if not files:
        raise DataError(
            f"folder {root} has no files matching {glob!r}",
            where=f"[data.sources].{key}",
            fix="point at the right folder, or set glob to the pattern your files follow",
        )
    return files


def refuse_special(path: Path, key: str) -> None:
    """A FIFO, socket or device (``/dev/zero``) would block or never end: refuse it by name."""
    if path.exists() and not path.is_file() and not path.is_dir():
        raise DataError(
            f"{path} is not a regular file (a FIFO, socket or device)",
            where=f"[data.sources].{key}",
            fix="point at a data file or a folder of them",
        )
