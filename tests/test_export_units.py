"""Fast checks of export/generate pieces that need no model: prompts, out folder, model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lorakit.errors import DataError, RunError
from lorakit.export.folder import MARKER, check_out_dir
from lorakit.export.model_card import render_card
from lorakit.generation import read_prompts


def test_prompts_from_flags_text_and_jsonl(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\n  second prompt\n", encoding="utf-8")
    jsonl = tmp_path / "p.jsonl"
    conv = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "reference answer"},
        ]
    }
    jsonl.write_text(
        json.dumps(conv) + "\n" + json.dumps({"prompt": "plain"}) + "\n", encoding="utf-8"
    )
    got = read_prompts(["flag"], text)
    assert [c.messages[-1].content for c in got] == ["flag", "first prompt", "  second prompt"]
    convs = read_prompts([], jsonl)
    # The trailing assistant turn is the reference: it is dropped, the system turn kept.
    assert [(m.role, m.content) for m in convs[0].messages] == [
        ("system", "Be brief."),
        ("user", "Hi"),
    ]
    assert convs[1].messages[0].content == "plain"


def test_bad_prompt_file_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"messages": 3}\n', encoding="utf-8")
    with pytest.raises(DataError) as exc:
        read_prompts([], bad)
    assert f"{bad}:2" in str(exc.value)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl:1"):
        read_prompts([], broken)
    with pytest.raises(DataError, match="no prompt"):
        read_prompts([], None)


def test_out_folder_rules(tmp_path):
    check_out_dir(tmp_path / "new", overwrite=False)  # missing: fine
    empty = tmp_path / "empty"
    empty.mkdir()
    check_out_dir(empty, overwrite=False)  # empty: fine
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / MARKER).write_text("{}")
    with pytest.raises(RunError, match="--overwrite"):
        check_out_dir(ours, overwrite=False)
    check_out_dir(ours, overwrite=True)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "x").write_text("x")
    with pytest.raises(RunError, match="not a lorakit export"):
        check_out_dir(theirs, overwrite=True)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RunError, match="not a folder"):
        check_out_dir(a_file, overwrite=True)

    # an export whose marker lists what it wrote: --overwrite replaces exactly that
    listed = tmp_path / "listed"
    (listed / "adapter").mkdir(parents=True)
    (listed / "adapter" / "adapter_model.safetensors").write_text("x")
    (listed / MARKER).write_text(json.dumps({"files": ["adapter/adapter_model.safetensors"]}))
    check_out_dir(listed, overwrite=True)
    (listed / "NOTES.md").write_text("mine")  # the user's own file, added since
    (listed / "adapter" / "extra.txt").write_text("mine")
    with pytest.raises(RunError, match=r"did not write \(NOTES\.md, adapter/extra\.txt\)"):
        check_out_dir(listed, overwrite=True)


def test_staging_where_it_cannot_be_made_is_a_clear_error(tmp_path):
    """An --out under a file (or in a folder nobody can write to) is refused by name: it was a
    FileExistsError traceback."""
    from lorakit.export.folder import ExportOptions, _staging

    a_file = tmp_path / "file"
    a_file.write_text("x")
    staging = _staging(a_file / "sub" / "out", ExportOptions())
    with pytest.raises(RunError, match="cannot make the folder") as info:
        staging.__enter__()
    assert info.value.where == "--out" and "choose --out" in info.value.fix
    assert a_file.read_text() == "x"


def test_an_exports_leftover_staging_folders_go_only_when_their_process_is_gone(tmp_path):
    """A killed export leaves its staging folder (as large as the export) beside --out; the
    next export to that folder removes it, unless its process still runs (a second export to
    the same folder at the same time)."""
    import os
    import subprocess
    import sys

    from lorakit.export.folder import ExportOptions, _staging

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = int(gone.stdout)
    out = tmp_path / "export"
    left = [tmp_path / f".export.tmp-{dead}-abc", tmp_path / f".export.old-{dead}"]
    running = tmp_path / f".export.tmp-{os.getpid()}-xyz"
    others = [tmp_path / ".export.tmp-nopid", tmp_path / ".other.tmp-1-a"]
    for folder in (*left, running, *others):
        folder.mkdir()
        (folder / "model.safetensors").write_text("x")
    with _staging(out, ExportOptions()) as tmp:
        assert tmp.name.startswith(f".export.tmp-{os.getpid()}-")
    assert not any(p.exists() for p in left)
    assert running.is_dir() and all(p.is_dir() for p in others)


def _card(**kw) -> str:
    args = {
        "kind": "merged",
        "meta": {
            "base_model": "embedded:SmolLM2",
            "quant": {"plugin": "bnb-4bit"},
            "quantized": True,
            "data_fingerprint": "abc123",
        },
        "recipe_text": '[quant]\nplugin = "bnb-4bit"\n',
        "data_report": {"fingerprint": "abc123", "counts": {"train": 3, "val": 1}},
        "eval_report": None,
        "last_eval": None,
        "parity": None,
        "merge_info": {"merge_base": "unquantized fp32", "dtype": "bf16"},
    }
    args.update(kw)
    return render_card(**args)


def test_model_card_tags_qlora_by_what_the_backend_says_not_its_name():
    # A third-party backend named anything but "none" that loads plain weights is not QLoRA.
    meta = {"base_model": "m", "quant": {"plugin": "fp16-only"}, "quantized": False}
    assert "qlora" not in _card(meta=meta).split("---")[1]
    meta = {"base_model": "m", "quant": {"plugin": "none"}, "quantized": True}
    assert "qlora" in _card(meta=meta).split("---")[1]


def test_model_card_handles_missing_and_present_reports():
    card = _card()
    assert "abc123" in card and 'plugin = "bnb-4bit"' in card and "qlora" in card
    assert "**unquantized fp32** base" in card and "cast to bf16" in card
    assert "No evaluation was recorded" in card and "Not measured" in card
    card = _card(last_eval={"eval_loss": 0.5, "step": 3})
    assert "validation loss" in card and "0.5" in card
    # the shape lorakit's evaluation writes: one result per (model, split)
    results = [
        {"split": "val", "adapter": None, "metrics": {"exact_match": 0.25, "eval_loss": 0.9}},
        {"split": "val", "adapter": "runs/x/adapter", "metrics": {"exact_match": 0.75}},
    ]
    card = _card(eval_report={"results": results})
    assert "| split | model | eval_loss | exact_match |" in card
    assert "| val | base | 0.9 | 0.25 |" in card and "| val | fine-tuned | - | 0.75 |" in card, card
    parity = {
        "reference": "fp32 unquantized base + adapter (unmerged)",
        "reference_ppl": 2.5,
        "probes": "3 built-in conversations",
        "n_tokens": 100,
        "n_supervised_tokens": 20,
        "comparisons": {
            "merged": {
                "model": "merged fp32",
                "max_abs_logit_diff": 3e-5,
                "ppl": 2.5,
                "ppl_diff_vs_reference": 0.0,
            },
        },
    }
    card = _card(parity=parity)
    assert "| merged fp32 | 3e-05 | 2.5000 | +0.0000 |" in card


def test_export_and_generate_verbs_are_registered():
    from lorakit.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["export", "runs/x", "--merge", "--dtype", "bf16"])
    assert args.merge and args.dtype == "bf16" and args.out is None
    args = parser.parse_args(
        ["generate", "runs/x", "--prompt", "a", "--prompt", "b", "--temperature", "0.7"]
    )
    assert args.prompt == ["a", "b"] and args.temperature == 0.7


def test_dtype_without_merge_is_a_clear_error(tmp_path, capsys):
    """--dtype fp16 without --merge exported the adapter as trained and said nothing."""
    from lorakit.cli.main import main

    assert main(["export", str(tmp_path), "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "--merge was not given" in err and "--merge --dtype fp16" in err
    assert "Traceback" not in err


def test_merge_base_without_merge_is_a_clear_error(tmp_path, capsys):
    from lorakit.cli.main import main

    assert main(["export", str(tmp_path), "--merge-base", "dequantized"]) == 2
    err = capsys.readouterr().err
    assert (
        "neither --merge nor --gguf was given" in err
        and "add --merge" in err
        and "Traceback" not in err
    )
    assert not list(Path(tmp_path).iterdir())


def test_export_of_a_folder_without_a_run_is_a_clear_error(tmp_path, capsys):
    from lorakit.cli.main import main

    assert main(["export", str(tmp_path)]) == 2
    assert "not a lorakit run folder" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "neither a run folder nor a model folder" in capsys.readouterr().err
    assert not list(Path(tmp_path).iterdir())


@pytest.mark.parametrize(
    "flag, value",
    [("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-0.5"),
     ("--top-p", "nan"), ("--top-p", "0"), ("--top-p", "1.5")],
)  # fmt: skip
def test_generate_refuses_non_finite_or_negative_sampling_settings(tmp_path, cli, flag, value):
    code, _, err = cli("generate", tmp_path, "--prompt", "hi", flag, value)
    assert code == 2
    assert flag in err and repr(value) in err and "Traceback" not in err
