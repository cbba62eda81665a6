"""Export and generate, end to end on the embedded SmolLM2-135M-Instruct (QLoRA, 2 steps).

One run is trained and exported with ``--merge`` per module; the tests then check the merged
model in a fresh process with stock transformers, the exported tokenizer against the training
render, stopping at end-of-turn, and clear errors for corrupted adapters.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import assert_reproduces_bf16_training, chat_records, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.embedded]

RECIPE = """
[quant]
plugin = "bnb-4bit"
[peft]
r = 8
alpha = 16
[train]
max_steps = 2
per_device_train_batch_size = 4
learning_rate = 1e-3
max_length = 96
save_steps = 100
gradient_checkpointing = false
[data]
val_fraction = 0.2
test_fraction = 0.0
[[data.sources]]
plugin = "chat_jsonl"
path = "chat.jsonl"
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, export folder) of a 2-step QLoRA run exported with --merge."""
    from lorakit.cli.main import main

    root = tmp_path_factory.mktemp("export")
    write_jsonl(root / "chat.jsonl", chat_records(24))
    (root / "tiny.toml").write_text(RECIPE, encoding="utf-8")
    runs = root / "runs"
    code = main(["run", str(root / "tiny.toml"), f"output.dir={runs}", "output.name=qlora"])
    assert code == 0
    run = runs / "qlora"
    assert main(["export", str(run), "--merge"]) == 0
    return run, run / "export"


def _reference_logits(run: Path, ids: list[int]) -> dict:
    """Unquantized base + the unmerged adapter, in fp32 and fp64: what the merge must reproduce."""
    import torch
    from lorakit.catalog import default_catalog
    from lorakit.components import build_components
    from lorakit.load_run import open_run
    from lorakit.modeling import load_adapter, load_base_model, resolve_model

    catalog = default_catalog()
    parts = build_components(open_run(run, catalog), catalog)
    ref = resolve_model(parts.model_source)
    base = load_base_model(ref, parts.quant, "cpu", quantized=False, dtype=torch.float32)
    model = load_adapter(base, run / "adapter").eval()
    out = {}
    with torch.inference_mode():
        out["fp32"] = model(input_ids=torch.tensor([ids])).logits[0]
        out["fp64"] = model.to(torch.float64)(input_ids=torch.tensor([ids])).logits[0]
    return out


FRESH = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, out = sys.argv[1], sys.argv[2]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": "Extract: I bought 2 blue cups."}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        # No eos passed: the stop tokens must come from the exported generation_config.
        seq = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0]
        logits64 = model.to(torch.float64)(input_ids=torch.tensor([ids])).logits[0]
    torch.save({"ids": ids, "fp32": logits, "fp64": logits64}, out + ".pt")
    gen = seq[len(ids):].tolist()
    json.dump({"new": gen, "eos": model.generation_config.eos_token_id}, open(out, "w"))
    """
)


def test_merged_model_matches_base_plus_adapter_in_a_fresh_process(exported, tmp_path):
    import torch

    run, export = exported
    out = tmp_path / "fresh.json"
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(export / "merged"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(str(out) + ".pt")
    reference = _reference_logits(run, saved["ids"])
    # The exported fp32 weights, evaluated in fp64 on both sides: only the merge and the
    # save can make a difference here (measured ~2e-5, the fp32 rounding of merged weights).
    exact = float((saved["fp64"] - reference["fp64"]).abs().max())
    assert exact < 1e-4, f"merged vs base + adapter (fp64 evaluation): max |logit diff| {exact}"
    # Evaluated in fp32, arithmetic order adds noise: the same unmerged model differs from
    # itself by ~8e-5 between batch shapes on SmolLM2 (logits reach ~45), so allow a few times it.
    diff = float((saved["fp32"] - reference["fp32"]).abs().max())
    assert diff < 5e-4, f"merged vs base + adapter (fp32): max |logit diff| {diff}"

    # Generation with stock generate() stops at <|im_end|> thanks to generation_config.
    result = json.loads(out.read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(export / "merged"))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eos = result["eos"] if isinstance(result["eos"], list) else [result["eos"]]
    assert im_end in eos
    assert result["new"][-1] == im_end and len(result["new"]) < 48, tok.decode(result["new"])


def test_parity_and_model_card_are_written(exported):
    run, export = exported
    parity = json.loads((export / "parity.json").read_text())
    assert "fp32 unquantized" in parity["reference"]
    assert parity["comparisons"]["merged"]["max_abs_logit_diff"] < 5e-4  # fp32 noise, see above
    quant = parity["comparisons"]["quantized"]
    assert quant["model"].startswith("bnb-4bit")
    assert "quantized_vs_merged_ppl_diff" in parity and parity["n_supervised_tokens"] > 0
    fingerprint = json.loads((run / "data_report.json").read_text())["fingerprint"]
    for card in (export / "merged" / "README.md", export / "adapter" / "README.md"):
        text = card.read_text()
        assert fingerprint in text and "lorakit 0.1.0" in text and "## Parity" in text
        assert "qlora" in text.split("---")[1]  # the backend said it quantizes
        # the run's final evaluation (base and fine-tuned on val) is in the card
        assert "| val | base |" in text and "| val | fine-tuned |" in text, text
    assert "**unquantized fp32** base" in (export / "merged" / "README.md").read_text()
    # safetensors only, and the adapter export is complete on its own.
    assert not list(export.rglob("*.bin")) and not list(export.rglob("*.pt"))
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"):
        assert (export / "adapter" / name).is_file()
    gen = json.loads((export / "adapter" / "generation_config.json").read_text())
    assert 2 in (
        gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    )


def test_dequantized_merge_reproduces_the_trained_quantized_model(exported, tmp_path):
    """--merge-base dequantized: the merged model is the 4-bit base + adapter that was trained."""
    from lorakit.cli.main import main

    run, export = exported
    out = tmp_path / "deq"
    argv = ["export", str(run), "--merge", "--merge-base", "dequantized", "--out", str(out)]
    assert main(argv) == 0
    parity = json.loads((out / "parity.json").read_text())
    assert parity["reference"] == "bnb-4bit base + adapter (as trained)"
    assert parity["merge_base"] == "dequantized bnb-4bit (fp32)"
    rows = parity["comparisons"]
    merged = rows["merged"]
    trained_in = json.loads((run / "adapter" / "lorakit.json").read_text())["compute_dtype"]
    if trained_in == "fp32":
        # Same function as the trained 4-bit model up to fp32 arithmetic order (see above).
        assert "as_trained_fp32" not in rows
        assert merged["max_abs_logit_diff"] < 5e-4, merged
        assert abs(merged["ppl_diff_vs_reference"]) < 1e-3 * parity["reference_ppl"]
    else:
        assert_reproduces_bf16_training(rows)
    # Merging into the original base instead leaves the 4-bit quantization gap.
    original = json.loads((export / "parity.json").read_text())
    gap = abs(original["quantized_vs_merged_ppl_diff"])
    assert abs(merged["ppl_diff_vs_reference"]) < gap, (merged, gap)
    card = (out / "merged" / "README.md").read_text()
    assert "**dequantized bnb-4bit (fp32)** base" in card


def test_exported_tokenizer_renders_exactly_like_training(exported):
    from lorakit.catalog import default_catalog
    from lorakit.components import build_components
    from lorakit.contracts import Example, Message
    from lorakit.load_run import open_run, prepare_inference
    from transformers import AutoTokenizer

    run, export = exported
    catalog = default_catalog()
    recipe = open_run(run, catalog)
    loaded = prepare_inference(recipe, build_components(recipe, catalog), run / "adapter")
    lines = (run / "data" / "splits" / "train.jsonl").read_text().splitlines()
    assert lines
    for folder in (export / "adapter", export / "merged"):
        tok = AutoTokenizer.from_pretrained(str(folder))
        for line in lines:
            rec = json.loads(line)
            msgs = tuple(Message(m["role"], m["content"]) for m in rec["messages"])
            trained = loaded.formatter.render(
                Example(id=rec["id"], messages=msgs), loaded.tokenizer
            ).text
            assert tok.apply_chat_template(rec["messages"], tokenize=False) == trained
            prompt = tok.apply_chat_template(
                rec["messages"][:-1], tokenize=False, add_generation_prompt=True
            )
            assert prompt == loaded.formatter.render_prompt(msgs[:-1], loaded.tokenizer)
            assert (
                tok(trained, add_special_tokens=False)["input_ids"]
                == loaded.tokenizer(trained, add_special_tokens=False)["input_ids"]
            )


def test_generate_on_merged_export_stops_and_compares(exported, capsys):
    from lorakit.cli.main import main

    _run, export = exported
    code = main(
        [
            "generate",
            str(export),
            "--prompt",
            "Answer with one word: what color is the sky on a clear day?",
            "--prompt",
            "Answer with one word: what is the capital of France?",
            "--compare",
            "--json",
            "--max-new-tokens",
            "48",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2
    assert all(r["stopped"] for r in rows), rows
    assert all("base_output" in r for r in rows)


# --------------------------------------------------------------------------- corrupted adapters


def _copy_run(run: Path, dest: Path) -> Path:
    ignore = shutil.ignore_patterns("checkpoints", "export")
    return Path(shutil.copytree(run, dest / run.name, ignore=ignore))


def _nan_adapter(weights: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(weights))
    assert torch.isnan(load_file(str(weights))[key]).any()


def _truncate(weights: Path) -> None:
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [_truncate, _nan_adapter], ids=["truncated", "nan"])
@pytest.mark.parametrize("verb", ["export", "generate"])
def test_corrupted_adapter_is_a_clear_error(exported, tmp_path, capsys, damage, verb):
    from lorakit.cli.main import main

    run = _copy_run(exported[0], tmp_path)
    weights = run / "adapter" / "adapter_model.safetensors"
    damage(weights)
    args = (
        ["export", str(run), "--merge"]
        if verb == "export"
        else ["generate", str(run), "--prompt", "hi"]
    )
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert str(weights) in err and "fix:" in err
    assert "Traceback" not in err
    assert not (run / "export").exists()


# --------------------------------------------------------------------------- the out folder


def test_export_never_overwrites_silently(exported, tmp_path, capsys):
    from lorakit.cli.main import main

    run, export = exported
    # A previous lorakit export: refused without --overwrite, replaced with it.
    assert main(["export", str(run)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (export / "merged").is_dir()  # untouched by the refusal
    out = tmp_path / "again"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # a file the user added to the export is not deleted with it: named, and the export kept
    (out / "adapter" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 2
    assert "adapter/notes.txt" in capsys.readouterr().err
    assert (out / "adapter" / "notes.txt").read_text() == "mine"
    (out / "adapter" / "notes.txt").unlink()
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 0
    # A folder lorakit did not write is never replaced, even with --overwrite.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["export", str(run), "--out", str(foreign), "--overwrite"]) == 2
    assert "not a lorakit export" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_lora_on_a_tied_head_or_embedding_merges_into_that_side_only(target):
    """SmolLM2 ties its head to its embeddings. LoRA on one of them trained a delta for that
    side only; merged into the shared tensor it changed both (the parity check then refused
    every such export). Untied first, the merged model computes what the adapter did."""
    import torch
    from lorakit.export.merge import merge_adapter, untie_adapted_embeddings
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def tied_model(targets=(target,)):
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config).eval()
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
        for name, p in peft.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                torch.nn.init.normal_(p, std=0.5)  # a trained adapter, not zeros
        return peft.eval()

    ids = torch.arange(1, 17)[None]
    model = tied_model()
    with torch.no_grad():
        want = model(ids).logits
    assert untie_adapted_embeddings(model)
    assert not model.config.tie_word_embeddings
    merged = merge_adapter(model)
    head, embed = merged.get_output_embeddings(), merged.get_input_embeddings()
    assert head.weight is not embed.weight
    with torch.no_grad():
        assert (merged(ids).logits - want).abs().max() < 1e-4
    if target == "lm_head":  # without untying, the shared tensor takes the delta on both sides
        careless = merge_adapter(tied_model())
        with torch.no_grad():
            assert (careless(ids).logits - want).abs().max() > 1e-2
    assert not untie_adapted_embeddings(tied_model(["q_proj"]))  # neither side adapted
