"""What a command works on: the plugin catalog, the recipe and its plugins, opened in one call.

Every verb that takes a recipe or a run folder starts with :func:`open_session`: it loads the
catalog, validates the recipe (:mod:`lorakit.recipe`; from a recipe file, or from a run folder's
saved copy and overrides) and builds the plugins once (:func:`lorakit.components.build_components`).
Nothing here imports torch: ``lorakit check`` and ``lorakit plan`` start here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import attrs

from lorakit.catalog import Catalog, default_catalog
from lorakit.components import Components, build_components
from lorakit.recipe import Recipe, load_recipe


@attrs.frozen
class Session:
    catalog: Catalog
    recipe: Recipe
    components: Components
    # the run the target names or describes, when it exists (``runs=True`` only), else None
    run_dir: Path | None = None


def open_session(
    target: str | Path,
    overrides: Sequence[str] = (),
    *,
    runs: bool = False,
    catalog: Catalog | None = None,
) -> Session:
    """Open ``target`` with ``overrides`` (``KEY.PATH=VALUE``) applied.

    ``target`` is a recipe file; with ``runs`` it may also be a run folder (its saved recipe, as
    the run trained it), and a recipe whose run exists must still describe that run's training
    (:func:`lorakit.load_run.open_target`). Raises one ``RecipeError`` listing every problem."""
    catalog = catalog or default_catalog()
    run_dir: Path | None = None
    if runs:
        from lorakit.load_run import open_target

        recipe, run_dir = open_target(str(target), catalog, tuple(overrides))
    else:
        recipe = load_recipe(target, overrides, catalog)
    return Session(catalog, recipe, build_components(recipe, catalog), run_dir)
