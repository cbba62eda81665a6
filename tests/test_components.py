"""A recipe's plugins are built once (``build_components``), and the functions below the runner
take those objects, so each works with a plugin object built by hand: no Recipe, no Catalog."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import attrs
import pytest
from helpers import chat_records, write_jsonl
from lorakit import api
from lorakit.catalog import Entry, build_catalog, default_catalog, make_manager
from lorakit.components import build_components
from lorakit.contracts import ModelRef
from lorakit.data.pipeline import DataReport, load_splits
from lorakit.errors import PluginError, RecipeError
from lorakit.recipe import load_recipe
from lorakit_plugins.peft.lora import Lora, LoraOptions
from lorakit_plugins.sources.chat_jsonl import ChatJsonlOptions, ChatJsonlSource


class Float64Backend:
    """A quant backend built by hand: loads the weights in float64, records finish_loading."""

    quantizes = False

    def __init__(self) -> None:
        self.finished: list[str] = []

    def load_kwargs(self, device: str) -> dict:
        import torch

        return {"dtype": torch.float64}

    def compute_dtype(self, device: str):
        import torch

        return torch.float64

    def prepare_for_training(self, model, gradient_checkpointing: bool):
        return model

    def finish_loading(self, model, device: str):
        self.finished.append(device)
        return model


def test_model_functions_take_plugin_objects_built_without_a_recipe(tiny_model_dir):
    import torch
    from lorakit.modeling import attach_new_adapter, load_base_model, load_tokenizer

    ref = ModelRef(path=str(tiny_model_dir))
    backend = Float64Backend()
    model = load_base_model(ref, backend, "cpu")
    assert next(model.parameters()).dtype == torch.float64, "the backend's load_kwargs decide"
    assert backend.finished == ["cpu"]

    plain = load_base_model(ref, backend, "cpu", quantized=False, dtype=torch.float32)
    assert next(plain.parameters()).dtype == torch.float32
    assert backend.finished == ["cpu"], "finish_loading is only for models loaded quantized"

    peft_method = Lora(LoraOptions(r=2, alpha=4, target_modules=["q_proj"]))
    tuned = attach_new_adapter(plain, peft_method, seed=0)
    adapted = {
        n.split(".lora_A")[0].rsplit(".", 1)[-1]
        for n, _ in tuned.named_parameters()
        if ".lora_A" in n
    }
    assert adapted == {"q_proj"}, "the PEFT method object decides what is adapted"
    assert load_tokenizer(ref).pad_token is not None


def test_load_splits_takes_sources_built_without_a_recipe(tmp_path):
    from lorakit.components import SourceComponent
    from lorakit.sections import DataSection

    write_jsonl(tmp_path / "chat.jsonl", chat_records(12))
    source = ChatJsonlSource(ChatJsonlOptions(path="chat.jsonl"))
    entry = Entry(kind="source", name="chat_jsonl", factory=ChatJsonlSource, plugin="by hand")
    part = SourceComponent(key="[data.sources.0]", name="chat_jsonl", source=source, entry=entry)
    report = DataReport()
    splits = load_splits([part], DataSection(val_fraction=0.25), tmp_path, report)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 12
    assert report.per_source == {"0:chat_jsonl": 12}


@attrs.frozen
class _Opts:
    level: int = api.option(1, doc="must not be 13")


def _picky(kind: str, **class_attrs):
    """A throwaway plugin class whose constructor rejects ``level = 13`` (and crashes on 99)."""

    def __init__(self, options):
        if options.level == 99:
            raise KeyError("a bug")
        if options.level == 13:
            raise ValueError(f"{kind} cannot run at level 13; use another level")
        self.options = options

    return type(f"Picky{kind}", (), {"Options": _Opts, "__init__": __init__, **class_attrs})


def _catalog():
    quant = _picky("quant", quantizes=False)
    peft = _picky("peft")
    plugin = SimpleNamespace(
        lorakit_register_quantizers=api.hookimpl(lambda register: register("picky", quant)),
        lorakit_register_peft_methods=api.hookimpl(lambda register: register("picky", peft)),
    )
    return build_catalog(make_manager([plugin]))


def _recipe(tmp_path, catalog, quant_level: int, peft_level: int):
    write_jsonl(tmp_path / "chat.jsonl", chat_records(4))
    path = tmp_path / "r.toml"
    path.write_text(
        f'[quant]\nplugin = "picky"\nlevel = {quant_level}\n'
        f'[peft]\nplugin = "picky"\nlevel = {peft_level}\n'
        '[[data.sources]]\nplugin = "chat_jsonl"\npath = "chat.jsonl"\n',
        encoding="utf-8",
    )
    return load_recipe(path, catalog=catalog)


def test_build_components_reports_every_rejected_option_at_once(tmp_path):
    catalog = _catalog()
    recipe = _recipe(tmp_path, catalog, 13, 13)  # the options validate; the factories refuse
    with pytest.raises(RecipeError) as info:
        build_components(recipe, catalog)
    problems = info.value.problems
    assert len(problems) == 2, problems
    assert problems[0].startswith("[quant]: quant plugin 'picky'") and "level 13" in problems[0]
    assert problems[1].startswith("[peft]: peft plugin 'picky'") and "level 13" in problems[1]

    good = build_components(_recipe(tmp_path, catalog, 1, 2), catalog)
    assert (good.quant.options.level, good.peft.options.level) == (1, 2)
    assert [s.name for s in good.sources] == ["chat_jsonl"]


def test_build_components_names_a_plugin_that_crashes(tmp_path):
    catalog = _catalog()
    with pytest.raises(
        PluginError, match=r"(?s)\[quant\]: quant plugin 'picky'.*KeyError.*level 13"
    ) as info:
        build_components(_recipe(tmp_path, catalog, 99, 13), catalog)
    assert isinstance(info.value.__cause__, KeyError), "--debug shows the plugin's traceback"


def test_a_target_module_that_matches_nothing_is_refused_before_training(tiny_model_dir):
    import torch
    from lorakit.errors import ModelError
    from lorakit.modeling import attach_new_adapter, load_base_model

    ref = ModelRef(path=str(tiny_model_dir))
    plain = load_base_model(ref, Float64Backend(), "cpu", quantized=False, dtype=torch.float32)
    lora = Lora(LoraOptions(r=2, alpha=4, target_modules=["q_proj", "bogus"]))
    with pytest.raises(ModelError) as info:
        attach_new_adapter(plain, lora, seed=0)
    text = str(info.value) + str(info.value.fix)
    assert "'bogus'" in text and "q_proj" in text and "v_proj" in text
    assert "'q_proj'" not in str(info.value), "only the unmatched names are named"


REMOTE_TOKENIZER = """
from transformers import PreTrainedTokenizerFast


class RemoteTokenizer(PreTrainedTokenizerFast):
    pass
"""


def test_the_adapters_tokenizer_loads_with_the_runs_trust_remote_code(tmp_path, tiny_model_dir):
    """A run of a model with trust_remote_code = true keeps a tokenizer that needs it: eval,
    export and generate (prepare_inference) load it with the same trust, not without."""
    import json
    import shutil

    from helpers import tiny_recipe
    from lorakit.catalog import default_catalog
    from lorakit.load_run import prepare_inference
    from lorakit.recipe import load_recipe

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_model_dir, adapter, ignore=shutil.ignore_patterns("*.safetensors"))
    (adapter / "remote_tok.py").write_text(REMOTE_TOKENIZER, encoding="utf-8")
    config = json.loads((adapter / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "remote_tok.RemoteTokenizer"]}
    config["tokenizer_class"] = "RemoteTokenizer"
    (adapter / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(4))
    path = tiny_recipe(tmp_path, tiny_model_dir, data)
    path.write_text(
        path.read_text().replace('plugin = "local"', 'plugin = "local"\ntrust_remote_code = true')
    )
    catalog = default_catalog()
    recipe = load_recipe(path, (), catalog)
    loaded = prepare_inference(recipe, build_components(recipe, catalog), adapter)
    assert type(loaded.tokenizer).__name__ == "RemoteTokenizer"


def test_an_adapter_from_another_lorakit_version_is_noted_once(tmp_path, tiny_model_dir, capsys):
    import json
    import shutil

    from helpers import tiny_recipe
    from lorakit.catalog import default_catalog
    from lorakit.export.adapter_io import META
    from lorakit.load_run import prepare_inference
    from lorakit.recipe import load_recipe

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_model_dir, adapter, ignore=shutil.ignore_patterns("*.safetensors"))
    (adapter / META).write_text(json.dumps({"lorakit_version": "0.0.1"}), encoding="utf-8")
    catalog = default_catalog()
    recipe = load_recipe(tiny_recipe(tmp_path, tiny_model_dir, tmp_path / "d.jsonl"), (), catalog)
    parts = build_components(recipe, catalog)
    prepare_inference(recipe, parts, adapter)
    prepare_inference(recipe, parts, adapter)
    err = capsys.readouterr().err
    assert err.count("made by lorakit 0.0.1") == 1, err


def test_the_embedded_models_conversion_never_deletes_a_folder_another_process_put_in_place(
    tmp_path,
):
    """Two processes may convert the embedded model at once (two runs started together on a
    fresh machine, two test workers): the one that finishes second keeps the first one's
    folder, which the first may be loading from; a folder a killed conversion left incomplete
    is replaced."""
    from lorakit_plugins.models.smollm2 import COMPLETE, put_in_place

    def conversion(name: str, complete: bool = True) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_text(name)
        if complete:
            (folder / COMPLETE).write_text("converted\n")
        return folder

    target = tmp_path / "smollm2-135m-instruct"
    first = conversion("first")
    put_in_place(first, target)
    assert (target / "model.safetensors").read_text() == "first" and not first.exists()

    second = conversion("second")
    put_in_place(second, target)
    assert (target / "model.safetensors").read_text() == "first"
    assert second.exists()  # the caller deletes its own temp folder

    (target / COMPLETE).unlink()  # as a conversion killed halfway leaves it
    third = conversion("third")
    put_in_place(third, target)
    assert (target / "model.safetensors").read_text() == "third" and (target / COMPLETE).is_file()


def test_a_local_model_path_is_read_from_the_recipe_folder(tmp_path, tiny_model_dir, monkeypatch):
    """``[model] path = "../model"`` meant the working directory's ../model: a recipe run
    from another folder trained on whatever folder had that name there. Relative paths are
    the recipe folder's, as data paths are; the working directory only serves a path the
    recipe folder does not have (recipes written for the old reading keep working)."""
    import shutil

    from lorakit.modeling import resolve_model

    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / "model")
    (project / "recipes").mkdir()
    write_jsonl(project / "chat.jsonl", chat_records(4))
    recipe = project / "recipes" / "r.toml"
    recipe.write_text(
        '[model]\nplugin = "local"\npath = "../model"\n'
        '[[data.sources]]\nplugin = "chat_jsonl"\npath = "../chat.jsonl"\n'
    )
    elsewhere = tmp_path / "elsewhere" / "cwd"
    shutil.copytree(tiny_model_dir, elsewhere.parent / "model")  # a decoy at cwd's ../model
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    parts = build_components(load_recipe(recipe), default_catalog())
    assert Path(resolve_model(parts.model_source).path) == (project / "model").resolve()
    # a folder only the working directory has is still found there
    (project / "model").rename(project / "moved")
    parts = build_components(load_recipe(recipe), default_catalog())
    assert Path(resolve_model(parts.model_source).path) == (elsewhere.parent / "model").resolve()
