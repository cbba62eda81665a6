"""Open a finished run (or a recipe) for inference: recipe, tokenizer, formatter, models.

The caller builds the recipe's components once (:func:`lorakit.components.build_components`);
:func:`prepare_inference` resolves the model once and keeps everything in one :class:`Loaded`.

``eval``, ``baseline``, ``export`` and ``generate`` all start here, so they load the base and
the adapter exactly the way training did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from lorakit.catalog import Catalog
from lorakit.components import Components
from lorakit.contracts import ModelRef
from lorakit.errors import RunError, cause
from lorakit.export.adapter_io import read_meta, stop_token_ids
from lorakit.recipe import Recipe, load_recipe, validate
from lorakit.recipe_toml import apply_overrides, read_toml
from lorakit.rundir import RunDir, read_json
from lorakit.safe_files import refuse_links


def open_run(run_dir: Path, catalog: Catalog, overrides: tuple[str, ...] = ()) -> Recipe:
    """Rebuild the recipe of a run from its folder: the copy the attempt that trained saved,
    plus that attempt's overrides and its resumes' (an earlier attempt that stopped before a
    checkpoint trained nothing, so its overrides do not count). The result is checked against
    the run's ``resolved.json``: only what may change on resume (how long, how often, [eval],
    [output], [log]) may differ, also with ``overrides``."""
    run = run_folder(run_dir)
    refuse_links(run.path)  # nothing read from, or written through, a link planted in the run
    info = read_json(run.run_json)
    text, data = read_toml(run.recipe)
    history = info.get("history", [])
    starts = [i for i, e in enumerate(history) if e.get("event") in ("start", "restart")]
    trained = history[starts[-1] :] if starts else history
    saved = [o for event in trained for o in event.get("overrides", [])]
    apply_overrides(data, [*saved, *overrides])
    original = Path(info.get("recipe_path") or run.recipe)
    recipe = validate(data, catalog, path=original, text=text, overrides=(*saved, *overrides))
    same_training(run, recipe, f"opening {run.path}")
    return recipe


def run_folder(run_dir: Path, recipe_too: bool = True) -> RunDir:
    """``run_dir`` as a run folder; ``RunError`` when it is none (no ``run.json``).
    ``recipe_too``: the command also takes a recipe file (its fix says so)."""
    run = RunDir(run_dir)
    if not run.exists():
        from lorakit.lora_init import checkpoint_refusal

        checkpoint_refusal(Path(run_dir), "pass the run folder")
        raise RunError(
            f"{run_dir} is not a lorakit run folder (no run.json)",
            fix="pass a folder under runs/ written by `lorakit run`"
            + (", or a recipe .toml" if recipe_too else ""),
        )
    return run


def same_training(run: RunDir, recipe: Recipe, doing: str) -> None:
    """Refuse settings the run's adapter was not trained with (its ``resolved.json``)."""
    run.changes(
        recipe.resolved(),
        doing=doing,
        fix=f"an adapter is scored, exported and used with the settings it was trained with: "
        f"pass the run folder ({run.path}) and only [eval] overrides, or train the changed "
        "recipe under another output.name",
    )


def open_target(
    target: str, catalog: Catalog, overrides: tuple[str, ...] = ()
) -> tuple[Recipe, Path | None]:
    """A recipe file or a run folder -> (recipe, run folder or None). A recipe whose run
    exists must still describe that run's training (an edited format or model is refused,
    naming the keys): only [eval], [output], [log] and how long/often may differ."""
    path = Path(target)
    if path.is_dir():
        return open_run(path, catalog, overrides), path
    recipe = load_recipe(path, overrides, catalog)
    run = RunDir(recipe.run_dir)
    if not run.exists():
        return recipe, None
    refuse_links(run.path)
    same_training(run, recipe, f"{target} describes {run.path}")
    return recipe, run.path


@attrs.define
class Loaded:
    """A recipe's components ready for inference: tokenizer, formatter, stop tokens, device."""

    recipe: Recipe
    components: Components
    tokenizer: Any
    formatter: Any
    end_of_turn: str
    stop_ids: list[int]
    device: str
    _ref: ModelRef | None = None

    @property
    def ref(self) -> ModelRef:
        """The base model, resolved on first use and once (a source may check or convert)."""
        if self._ref is None:
            from lorakit.modeling import resolve_model

            self._ref = resolve_model(self.components.model_source, self.recipe.model.name)
        return self._ref


def prepare_inference(
    recipe: Recipe,
    components: Components,
    adapter_dir: Path | None = None,
    *,
    ref: ModelRef | None = None,
) -> Loaded:
    """Load the tokenizer (the adapter's own copy when it has one, else the base model's) and
    pick the stop tokens. ``ref``: the base model when the caller resolved it already."""
    from lorakit.device import resolve_device
    from lorakit.modeling import load_tokenizer, resolve_model

    ref = ref or resolve_model(components.model_source, recipe.model.name)
    if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        # the adapter's copy of the tokenizer needs the same trust as the model it came from
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(adapter_dir), trust_remote_code=ref.trust_remote_code
            )
        except (OSError, ValueError) as exc:  # a file of it missing or damaged
            raise RunError(
                f"the tokenizer saved with the adapter in {adapter_dir} cannot be loaded "
                f"({cause(exc)})",
                fix="a tokenizer file is missing or damaged: copy the adapter folder again "
                "from where it was trained (tokenizer.json, tokenizer_config.json beside "
                "adapter_config.json)",
            ) from exc
    else:
        tokenizer = load_tokenizer(ref, recipe_dir=recipe.recipe_dir)
    formatter = components.formatter
    meta = read_meta(adapter_dir) if adapter_dir else {}
    if adapter_dir is not None:
        from lorakit.console import note_other_version

        note_other_version(meta.get("lorakit_version"), f"the adapter in {adapter_dir}")
    eot = meta.get("end_of_turn") or formatter.end_of_turn(tokenizer)
    return Loaded(
        recipe=recipe,
        components=as_trained(components, meta.get("compute_dtype")),
        tokenizer=tokenizer,
        formatter=formatter,
        end_of_turn=eot,
        stop_ids=stop_token_ids(tokenizer, eot),
        device=resolve_device(recipe.train.device),
        ref=ref,
    )


def as_trained(components: Components, trained_dtype: str | None) -> Components:
    """``components`` with the quant backend computing in the dtype the adapter was trained in.

    A recipe's ``auto`` compute dtype is bf16 on CPUs with fast bf16 and fp32 elsewhere, so a
    run trained on one machine and evaluated or exported on another would otherwise be scored
    in another dtype than it was trained in.
    """
    from typing import cast

    from lorakit.contracts import ComputeDtypeSwitch, DtypeName
    from lorakit.device import DTYPES

    quant = components.quant
    if trained_dtype in DTYPES and isinstance(quant, ComputeDtypeSwitch):
        name = cast(DtypeName, trained_dtype)
        return attrs.evolve(components, quant=quant.with_compute_dtype(name))
    return components


def load_model(loaded: Loaded, adapter_dir: Path | None, *, quantized: bool = True) -> Any:
    """The base model (quantized as in training unless ``quantized=False``), plus the adapter,
    on ``loaded.device``. A QPiSSA/QOLoRA run's model is its 4-bit residual base plus the
    trained A/B (``lorakit.qpissa``), as it was trained."""
    from lorakit.modeling import load_adapter, load_base_model
    from lorakit.qpissa import compute_residual, load_trained, quantizes_residual

    recipe, components = loaded.recipe, loaded.components
    residual = None
    if quantized and adapter_dir is not None and quantizes_residual(recipe, components.quant):
        residual = compute_residual(loaded.ref, components, recipe.train.seed, recipe.recipe_dir)
    model = load_base_model(
        loaded.ref,
        components.quant,
        loaded.device,
        quantized=quantized,
        recipe_dir=recipe.recipe_dir,
    )
    if residual is not None and adapter_dir is not None:
        model = load_trained(model, adapter_dir, components, recipe.train.seed, residual)
    elif adapter_dir is not None:
        model = load_adapter(model, adapter_dir, trainable=False)
    model.eval()
    return model
