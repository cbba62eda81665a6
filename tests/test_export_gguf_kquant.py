"""K-quant GGUF types through llama.cpp's quantizer (issue 25, item 2).

The round trip needs a llama.cpp quantizer (``LORAKIT_LLAMA_QUANTIZE`` or ``llama-quantize`` on
PATH, see docs/export.md) and skips without one. It trains a tiny Llama whose rows are 256
values wide (K-quant blocks are 256 values; narrower tensors fall back to other types) and
exports ``--gguf-type q4_k_m --gguf-type q6_k``; the files are read back by transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import build_tiny_model, chat_records, tiny_recipe, write_jsonl


def _quantizer_or_none():
    from lorakit.errors import RunError
    from lorakit.export.llama_quantize import find_quantizer

    try:
        return find_quantizer()
    except RunError:
        return None


def test_no_quantizer_is_a_clear_error_with_the_install_line(monkeypatch, tmp_path):
    from lorakit.errors import RunError
    from lorakit.export.gguf_export import preflight_types
    from lorakit.export.llama_quantize import ENV

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert preflight_types(["f16", "q8_0"]) is None  # lorakit's own types need nothing
    with pytest.raises(RunError) as exc:
        preflight_types(["f16", "q4_k_m"])
    assert "llama-quantize" in str(exc.value) and "npm install" in exc.value.fix
    monkeypatch.setenv(ENV, str(tmp_path / "missing"))
    with pytest.raises(RunError, match=f"{ENV}=.*missing is neither"):
        preflight_types(["q6_k"])


def test_a_quantizer_that_cannot_run_is_named_before_the_export(monkeypatch, tmp_path):
    from lorakit.errors import RunError
    from lorakit.export.gguf_export import preflight_types
    from lorakit.export.llama_quantize import ENV, Quantizer, quantize

    script = tmp_path / "llama-quantize"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    monkeypatch.setenv(ENV, str(script))
    with pytest.raises(RunError, match="is not executable"):  # was a PermissionError traceback
        preflight_types(["q4_k_m"])
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"\x7fELF" + bytes(60))  # executable bit, but no program this machine runs
    foreign.chmod(0o755)
    target = tmp_path / "out.gguf"
    with pytest.raises(RunError, match="could not be started") as err:
        quantize(Quantizer(foreign, "executable"), tmp_path / "in.gguf", target, "q4_k_m")
    assert "built for this machine" in err.value.fix and not target.exists()


def test_quantizer_is_found_in_a_folder_or_on_path(monkeypatch, tmp_path):
    from lorakit.export.llama_quantize import ENV, find_quantizer

    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "libllama-common.so").write_bytes(b"")
    (lib / "libllama.v0.5.0.so").write_bytes(b"")
    monkeypatch.setenv(ENV, str(lib))
    assert find_quantizer() == type(find_quantizer())(lib / "libllama.v0.5.0.so", "library")
    exe = tmp_path / "bin" / "llama-quantize"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("PATH", str(exe.parent))
    assert find_quantizer() == type(find_quantizer())(exe, "executable")


def test_k_quant_needs_gguf_types_the_cli_knows(cli, tmp_path):
    code, _out, err = cli("export", tmp_path, "--gguf-type", "q4_k_m")
    assert code == 2 and "--gguf was not given" in err  # a known type, refused for the flag


def _wide_tiny_model(folder: Path) -> Path:
    """The helpers' tiny Llama, 256 wide, so that llama.cpp's K-quant blocks fit its rows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tiny_model(folder)
    config = LlamaConfig.from_pretrained(str(folder))
    config.hidden_size, config.intermediate_size = 256, 512
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


@pytest.mark.slow  # trains the tiny model and runs llama.cpp
@pytest.mark.skipif(
    _quantizer_or_none() is None,
    reason="needs llama.cpp's quantizer (LORAKIT_LLAMA_QUANTIZE or llama-quantize on PATH)",
)
def test_k_quants_round_trip(tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader
    from lorakit.cli.main import main

    model = _wide_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    assert main(["run", str(tiny_recipe(tmp_path, model, data))]) == 0
    run = tmp_path / "runs" / "recipe"
    argv = ["export", str(run), "--gguf", "--gguf-type", "q4_k_m", "--gguf-type", "q6_k"]
    assert main(argv) == 0
    gguf = run / "export" / "gguf"
    assert not list(gguf.glob(".*"))  # the f32 source files are gone
    parity = json.loads((gguf / "parity.json").read_text())
    for gguf_type, kind in (("q4_k_m", "Q4_K"), ("q6_k", "Q6_K")):
        row = parity["comparisons"][f"gguf_{gguf_type}"]
        assert row["within_tolerance"] and row["max_abs_logit_diff"] > 0, row
        assert "llama.cpp" in parity["files"][gguf_type]["quantizer"]
        reader = GGUFReader(str(gguf / f"recipe-{gguf_type.upper()}.gguf"))
        types = {t.tensor_type for t in reader.tensors}
        assert GGMLQuantizationType[kind] in types, types
    q4, q6 = (parity["comparisons"][f"gguf_{t}"] for t in ("q4_k_m", "q6_k"))
    assert q6["max_abs_logit_diff"] < q4["max_abs_logit_diff"]
