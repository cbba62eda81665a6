"""Open a finished run (or a recipe) for inference: recipe, tokenizer, formatter, models.

``eval``, ``baseline``, ``export`` and ``generate`` all start here, so they load the base and
the adapter exactly the way training did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from lorakit.catalog import Catalog
from lorakit.errors import RunError
from lorakit.export.adapter_io import read_meta, stop_token_ids
from lorakit.recipe import Recipe, load_recipe, read_toml, validate
from lorakit.rundir import RunDir, read_json


def open_run(run_dir: Path, catalog: Catalog, overrides: tuple[str, ...] = ()) -> Recipe:
    """Rebuild the recipe of a run from its folder (the copy it saved, plus its overrides)."""
    run = RunDir(run_dir)
    if not run.exists():
        raise RunError(
            f"{run_dir} is not a lorakit run folder (no run.json)",
            fix="pass a folder under runs/ written by `lorakit run`, or a recipe .toml",
        )
    info = read_json(run.run_json)
    from lorakit.recipe import apply_overrides

    text, data = read_toml(run.recipe)
    saved = [o for event in info.get("history", []) for o in event.get("overrides", [])]
    apply_overrides(data, [*saved, *overrides])
    original = Path(info.get("recipe_path") or run.recipe)
    return validate(data, catalog, path=original, text=text, overrides=(*saved, *overrides))


def open_target(
    target: str, catalog: Catalog, overrides: tuple[str, ...] = ()
) -> tuple[Recipe, Path | None]:
    """A recipe file or a run folder -> (recipe, run folder or None)."""
    path = Path(target)
    if path.is_dir():
        return open_run(path, catalog, overrides), path
    recipe = load_recipe(path, overrides, catalog)
    run = RunDir(recipe.run_dir)
    return recipe, (run.path if run.exists() else None)


@attrs.define
class Loaded:
    recipe: Recipe
    tokenizer: Any
    formatter: Any
    end_of_turn: str
    stop_ids: list[int]
    device: str


def prepare_inference(recipe: Recipe, catalog: Catalog, adapter_dir: Path | None = None) -> Loaded:
    from lorakit.device import resolve_device
    from lorakit.modeling import load_tokenizer

    if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    else:
        tokenizer = load_tokenizer(recipe, catalog)
    formatter = recipe.format.build(catalog)
    eot = read_meta(adapter_dir).get("end_of_turn") if adapter_dir else None
    eot = eot or formatter.end_of_turn(tokenizer)
    return Loaded(
        recipe=recipe,
        tokenizer=tokenizer,
        formatter=formatter,
        end_of_turn=eot,
        stop_ids=stop_token_ids(tokenizer, eot),
        device=resolve_device(recipe.train.device),
    )


def load_model(
    recipe: Recipe,
    catalog: Catalog,
    device: str,
    adapter_dir: Path | None,
    *,
    quantized: bool = True,
) -> Any:
    """The base model (quantized as in training unless ``quantized=False``), plus the adapter."""
    from lorakit.modeling import load_adapter, load_base_model

    model = load_base_model(recipe, catalog, device, quantized=quantized)
    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir, trainable=False)
    model.eval()
    return model
