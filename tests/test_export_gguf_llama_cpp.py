"""The round trip through llama.cpp itself (issue 25, item 6).

Exported GGUF files are loaded by llama.cpp's ``libllama`` (ctypes, in a child process) and
compared with the merged model in transformers: token ids, logits on the probes, next-token
logits and greedy generations, into ``parity.json``'s ``llama_cpp``. The round trip needs a
llama.cpp library (``LORAKIT_LLAMA_CPP``, see docs/export.md) and skips without one, like the
K-quant test; the lookup itself is tested everywhere.
"""

from __future__ import annotations

import json

import pytest
from helpers import build_tiny_model, chat_records, tiny_recipe, write_jsonl


def _library_or_none():
    from lorakit.export.llama_cpp import find_library

    return find_library().library


def test_library_lookup_order_and_the_note_without_one(monkeypatch, tmp_path):
    from lorakit.export.llama_cpp import ENV, QUANTIZE_ENV, find_library

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv(QUANTIZE_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    found = find_library()
    assert found.library is None and ENV in found.note and "@node-llama-cpp" in found.note

    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "libllama-common.so").write_bytes(b"")  # not the library
    (lib / "libllama.v0.5.0.so").write_bytes(b"")
    monkeypatch.setenv(QUANTIZE_ENV, str(lib))  # the quantizer's library serves too
    assert find_library().library == lib / "libllama.v0.5.0.so"
    monkeypatch.setenv(ENV, str(tmp_path / "missing"))  # an explicit setting wins, and is checked
    found = find_library()
    assert found.library is None and "missing is neither" in found.note

    monkeypatch.delenv(ENV)
    monkeypatch.delenv(QUANTIZE_ENV)
    exe = tmp_path / "bin" / "llama-quantize"  # a llama.cpp build: bin/ and lib/
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (tmp_path / "lib" / "libllama.so").write_bytes(b"")
    monkeypatch.setenv("PATH", str(exe.parent))
    assert find_library().library == tmp_path / "lib" / "libllama.so"


def test_common_prefix_and_summary_line():
    from lorakit.export.gguf_llama_cpp import _common_prefix, summary, warnings

    assert _common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and _common_prefix([], [1]) == 0
    row = {
        "file": "x.gguf",
        "token_ids": {"texts": 4, "identical": 3, "differ": ["abc"]},
        "logits": {
            "max_abs_logit_diff": 0.5,
            "max_rel_logit_diff": 0.02,
            "argmax_agreement": 0.9,
            "ppl_rel_diff": 0.01,
            "within_tolerance": False,
        },
        "next_token": {"top1_agreement": 1.0},
        "greedy": {"identical": 2, "prompts": 3, "max_new_tokens": 16},
    }
    line = summary(row, "q8_0")
    assert "token ids 3/4 identical" in line and "greedy 2/3 identical" in line
    assert len(warnings(row, "q8_0")) == 2


@pytest.mark.slow  # trains the tiny model, exports it and runs llama.cpp
@pytest.mark.skipif(
    _library_or_none() is None,
    reason="needs llama.cpp's libllama (LORAKIT_LLAMA_CPP, see docs/export.md)",
)
def test_exported_gguf_runs_in_llama_cpp_like_in_transformers(tmp_path):
    from lorakit.cli.main import main

    model = build_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    assert main(["run", str(tiny_recipe(tmp_path, model, data))]) == 0
    run = tmp_path / "runs" / "recipe"
    assert main(["export", str(run), "--gguf", "--gguf-type", "f32", "--gguf-type", "q8_0"]) == 0
    record = json.loads((run / "export" / "gguf" / "parity.json").read_text())["llama_cpp"]
    assert "skipped" not in record, record
    f32, q8 = record["files"]["f32"], record["files"]["q8_0"]
    for row in (f32, q8):
        assert row["token_ids"]["identical"] == row["token_ids"]["texts"] > 3, row["token_ids"]
        assert row["logits"]["within_tolerance"], row["logits"]
    # f32: llama.cpp computes the transformers model to float rounding (measured 0.10% of the
    # logit scale here, 0.14% on SmolLM2; q8_0 1.6%)
    assert f32["logits"]["max_rel_logit_diff"] < 5e-3 and f32["logits"]["argmax_agreement"] == 1
    assert f32["next_token"]["top1_agreement"] == 1
    assert f32["greedy"]["identical"] == f32["greedy"]["prompts"] == 3
    assert q8["logits"]["max_abs_logit_diff"] > f32["logits"]["max_abs_logit_diff"]
