"""``lorakit export --gguf --base-only``: the base as trained, for the adapter GGUF (issue 25).

The tiny Llama of ``helpers`` is trained 4 steps unquantized and as QLoRA (bnb-4bit, fp32
compute) and exported with ``--gguf --base-only --gguf-type f32 --gguf-type q8_0``. The files
are checked independently here: the f32 base file holds exactly the weights the run trained on
(the dequantized 4-bit base for QLoRA, not the original checkpoint), and that file read back
with the run's adapter attached computes what the trained model computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import build_tiny_model, chat_records, tiny_recipe, write_jsonl

IDS = [1, 5, 17, 40, 99, 2, 7, 33]


@pytest.fixture(scope="module", params=["none", "bnb-4bit"])
def base_export(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(quant plugin, run folder, export folder) of a 4-step run exported base-only."""
    from lorakit.cli.main import main

    root = tmp_path_factory.mktemp(f"gguf-base-{request.param}")
    model = build_tiny_model(root / "model")
    data = write_jsonl(root / "chat.jsonl", chat_records(40))
    assert main(["run", str(tiny_recipe(root, model, data, quant=request.param))]) == 0
    run = root / "runs" / "recipe"
    argv = [
        "export",
        str(run),
        "--gguf",
        "--base-only",
        "--gguf-type",
        "f32",
        "--gguf-type",
        "q8_0",
    ]
    assert main(argv) == 0
    return request.param, run, run / "export"


def _loaded(run: Path):
    from lorakit.catalog import default_catalog
    from lorakit.components import build_components
    from lorakit.load_run import open_run, prepare_inference

    catalog = default_catalog()
    recipe = open_run(run, catalog)
    return prepare_inference(recipe, build_components(recipe, catalog), run / "adapter")


def _logits(model, ids=IDS):
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.mark.slow  # trains the tiny model (once per quant backend)
def test_base_only_files_modelfile_and_parity(base_export):
    quant, _run, export = base_export
    gguf = export / "gguf"
    assert sorted(p.name for p in gguf.iterdir()) == [
        "Modelfile",
        "README.md",
        "parity.json",
        "recipe-base-F32.gguf",
        "recipe-base-Q8_0.gguf",
        "recipe-lora-F32.gguf",
    ]
    modelfile = (gguf / "Modelfile").read_text()
    assert (
        "FROM ./recipe-base-F32.gguf" in modelfile and "ADAPTER ./recipe-lora-F32.gguf" in modelfile
    )
    parity = json.loads((gguf / "parity.json").read_text())
    assert parity["base_only"] and parity["reference"].startswith("base as trained")
    rows = parity["comparisons"]
    assert rows["gguf_f32"]["max_abs_logit_diff"] < 1e-5
    assert rows["gguf_q8_0"]["within_tolerance"]
    # the base file + the run's adapter reproduces the trained model
    assert rows["gguf_f32"]["with_adapter"]["max_abs_logit_diff"] < 1e-3
    assert rows["gguf_q8_0"]["with_adapter"]["max_abs_logit_diff"] > 0
    assert parity["adapter_gguf"]["written"]
    # QLoRA: the dequantized base + adapter was checked against the 4-bit model as trained
    assert ("unmerged" in parity["trained"]["comparisons"]) == (quant == "bnb-4bit")
    assert json.loads((export / "lorakit_export.json").read_text())["gguf_base_only"] is True


@pytest.mark.slow  # trains the tiny model (once per quant backend)
def test_base_file_holds_the_weights_the_run_trained_on(base_export):
    """Independently of the export's checks: the weights in the f32 file are the original
    checkpoint for a LoRA run and the dequantized 4-bit base for QLoRA; with the adapter on top
    they compute the trained model (the 4-bit base + adapter as lorakit loads it)."""
    import torch
    from lorakit.load_run import load_model
    from lorakit.modeling import load_adapter
    from transformers import AutoModelForCausalLM

    quant, run, export = base_export
    gguf = AutoModelForCausalLM.from_pretrained(
        str(export / "gguf"), gguf_file="recipe-base-F32.gguf", dtype=torch.float32
    )
    original = AutoModelForCausalLM.from_pretrained(
        str(run.parents[1] / "model"), dtype=torch.float32
    )
    name = "model.layers.0.mlp.down_proj.weight"
    in_file, in_checkpoint = gguf.state_dict()[name], original.state_dict()[name]
    if quant == "none":
        assert torch.equal(in_file, in_checkpoint)
    else:
        # 4-bit rounding: close to the checkpoint, never equal to it
        assert not torch.equal(in_file, in_checkpoint)
        assert float((in_file - in_checkpoint).abs().max()) < 0.2 * float(in_checkpoint.abs().max())
    trained = load_model(_loaded(run), run / "adapter", quantized=True)
    with_adapter = load_adapter(gguf, run / "adapter").eval()
    assert float((_logits(trained) - _logits(with_adapter)).abs().max()) < 1e-3


def test_base_only_needs_gguf_and_merges_nothing(tmp_path, capsys):
    from lorakit.cli.main import main

    assert main(["export", str(tmp_path), "--base-only"]) == 2
    assert "--gguf was not given" in capsys.readouterr().err
    argv = ["export", str(tmp_path), "--gguf", "--base-only", "--merge-base", "dequantized"]
    assert main(argv) == 2
    assert "merges nothing" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
