"""GGUF export: writer, tokenizer metadata, Modelfile templates, refusals, and round trips.

The round-trip tests (slow) train the tiny Llama of ``helpers`` once per module and export it with
``--gguf --gguf-type f32 --gguf-type q8_0``; the files are read back independently here
(``gguf.GGUFReader`` and transformers' ``gguf_file=`` loader). One slow test does the same on
the embedded SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import CHATML, build_tiny_model, chat_records, tiny_recipe, write_jsonl

# --------------------------------------------------------------------------- helpers


def _fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _jinja(template: str, bos: str = "<s>", eos: str = "</s>"):
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(conv, generation_prompt):
        messages = [{"role": r, "content": c} for r, c in conv]
        out, _ = render_jinja_template(
            conversations=[messages],
            chat_template=template,
            add_generation_prompt=generation_prompt,
            bos_token=bos,
            eos_token=eos,
        )
        return out[0]

    return render


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, export folder): the tiny Llama trained 4 steps, exported as f32 + q8_0."""
    from lorakit.cli.main import main

    root = tmp_path_factory.mktemp("gguf")
    model = build_tiny_model(root / "model")
    data = write_jsonl(root / "chat.jsonl", chat_records(40))
    assert main(["run", str(tiny_recipe(root, model, data))]) == 0
    run = root / "runs" / "recipe"
    argv = ["export", str(run), "--gguf", "--gguf-type", "f32", "--gguf-type", "q8_0"]
    assert main(argv) == 0
    return run, run / "export"


def _copy_run(run: Path, dest: Path) -> Path:
    return Path(shutil.copytree(run, dest / run.name, ignore=shutil.ignore_patterns("export")))


# --------------------------------------------------------------------------- tiny round trip


@pytest.mark.slow  # trains the tiny model (once per module)
def test_gguf_files_metadata_and_modelfile(tiny_export):
    from transformers import AutoTokenizer

    run, export = tiny_export
    gguf = export / "gguf"
    names = sorted(p.name for p in gguf.iterdir())
    assert names == [
        "Modelfile",
        "README.md",
        "parity.json",
        "recipe-F32.gguf",
        "recipe-Q8_0.gguf",
        "recipe-lora-F32.gguf",
    ]
    tok = AutoTokenizer.from_pretrained(str(run / "adapter"))
    fields = _fields(gguf / "recipe-Q8_0.gguf")
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "model"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.chat_template"] == tok.chat_template
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.eot_token_id"] == im_end
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert not fields["tokenizer.ggml.add_bos_token"]  # the tiny tokenizer adds no BOS
    assert fields["tokenizer.ggml.tokens"][im_end] == "<|im_end|>"
    assert fields["tokenizer.ggml.token_type"][im_end] == 3  # control: kept whole by llama.cpp
    assert len(fields["tokenizer.ggml.tokens"]) == fields["llama.vocab_size"]

    modelfile = (gguf / "Modelfile").read_text()
    assert "FROM ./recipe-F32.gguf" in modelfile and "recipe-Q8_0.gguf" in modelfile
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "SYSTEM" not in modelfile
    card = (gguf / "README.md").read_text()
    assert "# GGUF model trained with lorakit" in card and "recipe-Q8_0.gguf" in card
    assert "argmax agrees" in card and "ollama create" in card
    assert json.loads((export / "lorakit_export.json").read_text())["gguf"] == ["f32", "q8_0"]


@pytest.mark.slow  # trains the tiny model (once per module)
def test_gguf_parity_numbers_per_type(tiny_export):
    _run, export = tiny_export
    parity = json.loads((export / "gguf" / "parity.json").read_text())
    rows = parity["comparisons"]
    assert parity["reference"].startswith("merged fp32")
    assert rows["unmerged"]["max_abs_logit_diff"] < 1e-3
    f32, q8 = rows["gguf_f32"], rows["gguf_q8_0"]
    # f32 holds the very same weights: transformers reads back bit-identical logits.
    assert f32["max_abs_logit_diff"] < 1e-5 and f32["argmax_agreement"] == 1.0
    # q8_0 rounds the weights: not identical, but within its tolerance.
    assert q8["max_abs_logit_diff"] > 0 and q8["within_tolerance"]
    assert q8["max_rel_logit_diff"] <= q8["tolerance"]["max_rel"]
    assert q8["argmax_agreement"] > 0.9
    assert parity["tokenizer"]["identical_token_ids"] == parity["n_probes"]
    assert parity["files"]["q8_0"]["bytes"] < parity["files"]["f32"]["bytes"] / 3
    adapter = parity["adapter_gguf"]
    assert adapter["written"] and adapter["max_abs_delta_diff"] < 1e-6


@pytest.mark.slow  # trains the tiny model (once per module)
def test_gguf_reads_back_as_the_merged_model(tiny_export, tmp_path):
    """Independently of the export's own check: transformers' GGUF model == merged safetensors."""
    import torch
    from lorakit.cli.main import main
    from transformers import AutoModelForCausalLM

    run, export = tiny_export
    out = tmp_path / "merged"
    assert main(["export", str(run), "--merge", "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32)
    gguf = AutoModelForCausalLM.from_pretrained(
        str(export / "gguf"), gguf_file="recipe-F32.gguf", dtype=torch.float32
    )
    ids = torch.tensor([[1, 5, 17, 40, 99, 2, 7]])
    with torch.inference_mode():
        diff = (merged(ids).logits - gguf(ids).logits).abs().max()
    assert float(diff) < 1e-5


@pytest.mark.slow  # trains the tiny model (once per module)
def test_merge_and_gguf_share_one_fp32_merge(tiny_export, tmp_path, monkeypatch):
    """``--merge --gguf`` loads and merges the fp32 base once (a 28 GB load for a 7B model),
    and writes the GGUF files from it before ``--merge`` casts it: with ``--dtype bf16`` the
    f32 file is still the fp32 merge, byte for byte the one ``--gguf`` alone writes."""
    import lorakit.export.merge as merge
    from gguf import GGUFReader
    from lorakit.cli.main import main
    from safetensors import safe_open

    merges = []
    real = merge.merge_fp32

    def counted(*args, **kwargs):
        merges.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(merge, "merge_fp32", counted)
    run, export = tiny_export
    out = tmp_path / "both"
    argv = ["export", str(run), "--merge", "--dtype", "bf16", "--gguf", "--gguf-type", "f32"]
    assert main([*argv, "--out", str(out)]) == 0
    assert len(merges) == 1
    alone = {t.name: t.data for t in GGUFReader(str(export / "gguf" / "recipe-F32.gguf")).tensors}
    both = {t.name: t.data for t in GGUFReader(str(out / "gguf" / "recipe-F32.gguf")).tensors}
    assert alone.keys() == both.keys()
    assert all((alone[k] == both[k]).all() for k in alone)
    (weights,) = (out / "merged").glob("*.safetensors")
    with safe_open(str(weights), "pt") as f:
        names = f.keys()  # a safe_open handle is not iterable
        assert {str(f.get_slice(k).get_dtype()) for k in names} == {"BF16"}
    parity = json.loads((out / "parity.json").read_text())
    assert parity["dtype"] == "bf16" and "merged_in_memory" in parity["comparisons"]


@pytest.mark.slow  # trains the tiny model (once per module)
def test_export_of_dot_names_its_files_after_the_run(tiny_export, tmp_path, monkeypatch):
    """``cd RUN && lorakit export . --gguf`` wrote "-F32.gguf" and a Modelfile without a name."""
    from lorakit.cli.main import main

    run, _ = tiny_export
    monkeypatch.chdir(run)
    out = tmp_path / "dot"
    assert main(["export", ".", "--gguf", "--gguf-type", "f32", "--out", str(out)]) == 0
    assert (out / "gguf" / "recipe-F32.gguf").is_file()
    assert "ollama create recipe " in (out / "gguf" / "Modelfile").read_text()


@pytest.mark.slow  # trains the tiny model (once per module)
def test_gguf_chat_template_renders_every_training_example(tiny_export):
    from lorakit.catalog import default_catalog
    from lorakit.components import build_components
    from lorakit.contracts import Example, Message
    from lorakit.load_run import open_run, prepare_inference
    from transformers import AutoTokenizer

    run, export = tiny_export
    catalog = default_catalog()
    recipe = open_run(run, catalog)
    loaded = prepare_inference(recipe, build_components(recipe, catalog), run / "adapter")
    gguf_tok = AutoTokenizer.from_pretrained(str(export / "gguf"), gguf_file="recipe-Q8_0.gguf")
    lines = (run / "data" / "splits" / "train.jsonl").read_text().splitlines()
    assert len(lines) > 20
    for line in lines:
        rec = json.loads(line)
        msgs = tuple(Message(m["role"], m["content"]) for m in rec["messages"])
        trained = loaded.formatter.render(Example(id=rec["id"], messages=msgs), loaded.tokenizer)
        assert gguf_tok.apply_chat_template(rec["messages"], tokenize=False) == trained.text
        ids = gguf_tok(trained.text, add_special_tokens=False)["input_ids"]
        assert ids == loaded.tokenizer(trained.text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- refusals


@pytest.mark.slow  # trains the tiny model (once per module)
def test_existing_export_is_refused_and_untouched(tiny_export, capsys):
    from lorakit.cli.main import main

    run, export = tiny_export
    before = (export / "gguf" / "recipe-F32.gguf").stat().st_mtime_ns
    assert main(["export", str(run), "--gguf"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err
    assert (export / "gguf" / "recipe-F32.gguf").stat().st_mtime_ns == before


@pytest.mark.slow  # trains the tiny model (once per module)
def test_unsupported_architecture_is_named_and_nothing_written(tiny_export, tmp_path, capsys):
    from lorakit.cli.main import main

    run = _copy_run(tiny_export[0], tmp_path)
    original = tiny_export[0].parents[1] / "model"
    model = Path(shutil.copytree(original, tmp_path / "model"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "qwen3"}))
    # a run of that model: its recipe, resolved settings and adapter all name the copy
    for name in ("recipe.toml", "resolved.json", "adapter/lorakit.json"):
        text = (run / name).read_text()
        assert str(original) in text, name
        (run / name).write_text(text.replace(str(original), str(model)))
    assert main(["export", str(run), "--gguf"]) == 2
    err = capsys.readouterr().err
    assert "'qwen3' architecture" in err and "fix:" in err and "Traceback" not in err
    assert not (run / "export").exists()
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow  # trains the tiny model (once per module)
def test_nan_adapter_is_refused_before_writing(tiny_export, tmp_path, capsys):
    import torch
    from lorakit.cli.main import main
    from safetensors.torch import load_file, save_file

    run = _copy_run(tiny_export[0], tmp_path)
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(weights))
    assert torch.isnan(load_file(str(weights))[key]).any()
    assert main(["export", str(run), "--gguf"]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "Traceback" not in err
    assert not (run / "export").exists()


def test_writer_refuses_nan_and_f16_overflow(tiny_model_dir, tmp_path):
    import torch
    from lorakit.errors import RunError
    from lorakit.export.gguf_vocab import read_vocab
    from lorakit.export.gguf_writer import write_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    vocab = read_vocab(tok, model.config.vocab_size, "<|im_end|>")
    weight = model.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        weight[3, 3] = 1e6  # fine in f32 and q8_0 (scaled per block), Inf in f16
    write_gguf(model, vocab, tmp_path / "ok.gguf", "q8_0", name="t")
    with pytest.raises(RunError, match="overflows float16"):
        write_gguf(model, vocab, tmp_path / "f16.gguf", "f16", name="t")
    with torch.no_grad():
        weight[3, 3] = float("nan")
    with pytest.raises(RunError, match=r"layers\.1\.mlp\.up_proj\.weight holds NaN"):
        write_gguf(model, vocab, tmp_path / "nan.gguf", "f32", name="t")
    assert not (tmp_path / "nan.gguf").exists()


def test_check_layout_names_what_it_cannot_represent():
    from lorakit.errors import ModelError
    from lorakit.export.gguf_writer import check_layout
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    with pytest.raises(ModelError, match="'gpt2' architecture"):
        check_layout(GPT2Config())
    scaled = LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ModelError, match="rope scaling 'linear'"):
        check_layout(scaled)
    with pytest.raises(ModelError, match="sliding-window"):
        check_layout(Qwen2Config(use_sliding_window=True, sliding_window=128))
    assert check_layout(Qwen2Config()).permute_qk is False
    # Mistral runs as llama in llama.cpp (full attention): its context stops at the window.
    mistral = check_layout(MistralConfig(max_position_embeddings=32768, sliding_window=4096))
    assert (mistral.arch, mistral.context_length, mistral.permute_qk) == ("llama", 4096, True)


def test_rotary_reorder_is_undone_by_transformers_loader():
    import numpy as np
    from lorakit.export.gguf_writer import rotary_to_interleaved
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)  # 4 heads of dim 8
    moved = rotary_to_interleaved(w, 4)
    assert not np.array_equal(moved, w)
    # head 0: rows (0, 4), (1, 5), ... interleaved: first the halves' first elements.
    assert moved[:, 0].tolist()[:8] == [0, 12, 3, 15, 6, 18, 9, 21]
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 4})
    assert np.array_equal(processor.process(moved, "blk.0.attn_q.weight").weights, w)


def test_tolerances_are_enforced():
    import torch
    from lorakit.errors import RunError
    from lorakit.export.gguf_parity import check_tolerance

    reference = [torch.tensor([[10.0, -20.0], [1.0, 2.0]])]
    row = {"max_abs_logit_diff": 0.5, "ppl": 2.0}
    check_tolerance(row, "q8_0", reference, 2.0)  # 2.5% of the logit scale 20
    assert row["within_tolerance"] and row["max_rel_logit_diff"] == pytest.approx(0.025)
    with pytest.raises(RunError, match="beyond its tolerance"):
        check_tolerance({"max_abs_logit_diff": 0.5, "ppl": 2.0}, "f16", reference, 2.0)
    with pytest.raises(RunError, match="perplexity changes"):
        check_tolerance({"max_abs_logit_diff": 0.1, "ppl": 2.5}, "q8_0", reference, 2.0)
    with pytest.raises(RunError, match="nothing was exported"):
        check_tolerance({"max_abs_logit_diff": 2e-3, "ppl": 2.0}, "f32", reference, 2.0)


def test_gguf_type_without_gguf_is_a_clear_error(tmp_path, capsys):
    from lorakit.cli.main import main

    assert main(["export", str(tmp_path), "--gguf-type", "q8_0"]) == 2
    assert "--gguf was not given" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- tokenizer, templates


def test_pre_tokenizer_names():
    from lorakit.errors import ModelError
    from lorakit.export.gguf_vocab import pre_tokenizer_name
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    qwen = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated"},
            {**byte_level, "use_regex": False},
        ],
    }
    assert pre_tokenizer_name(qwen) == "qwen2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits"}, byte_level]}
    with pytest.raises(ModelError, match="pre-tokenizer"):
        pre_tokenizer_name(digits)
    with pytest.raises(ModelError, match="pre-tokenizer"):
        pre_tokenizer_name({**byte_level, "add_prefix_space": True})


SMOL_STYLE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] + '\n\n' %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + (sys if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_STYLE = (
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] + '<|eot_id|>' }}{% endfor %}"
)
UNKNOWN_STYLE = (
    "{% for m in messages %}{{ '### ' + m['role'] + ':\n' + m['content'] + '\n\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
)


def test_modelfile_template_translation():
    from lorakit.export.modelfile import translate

    chatml = translate(_jinja(CHATML), "<s>", "</s>", add_bos=False)
    assert (chatml.family, chatml.system) == ("chatml", None)
    smol = translate(_jinja(SMOL_STYLE), "<s>", "</s>", add_bos=False)
    assert (smol.family, smol.system) == ("chatml", "You are a helpful assistant.")
    mistral = translate(_jinja(MISTRAL_STYLE), "<s>", "</s>", add_bos=True)
    assert mistral.family == "mistral_inst" and mistral.template is not None
    assert "</s>" in mistral.template and "<s>" not in mistral.template  # llama.cpp adds BOS
    no_bos = translate(_jinja(MISTRAL_STYLE), "<s>", "</s>", add_bos=False)
    assert no_bos.template is not None and "<s>" in no_bos.template
    # Llama 3 headers without the generation prompt: not what Llama 3's template renders
    assert translate(_jinja(LLAMA3_STYLE), "<s>", "</s>", add_bos=False).family is None
    other = translate(_jinja(UNKNOWN_STYLE), "<s>", "</s>", add_bos=False)
    assert other.family is None and other.template is None and "none of" in other.reason


def test_untranslatable_template_says_so_in_the_modelfile():
    from lorakit.export.modelfile import render_modelfile, translate

    text = render_modelfile(
        gguf_file="x-F16.gguf",
        translation=translate(_jinja(UNKNOWN_STYLE), "<s>", "</s>", add_bos=False),
        stop_tokens=["<|eot_id|>", "<|end_of_text|>"],
        chat_template=UNKNOWN_STYLE,
        header="test",
    )
    assert "TEMPLATE:" in text and "NOT WRITTEN" in text
    assert "\nTEMPLATE " not in text  # no TEMPLATE instruction at all, only the comment
    assert "# {% for m in messages %}{{ '### ' + m['role']" in text
    assert 'PARAMETER stop "<|eot_id|>"\nPARAMETER stop "<|end_of_text|>"' in text


def test_adapter_gguf_refuses_what_llamacpp_cannot_hold():
    from lorakit.export.gguf_adapter import lora_scale, unsupported_reason

    base = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "bias": "none"}
    assert unsupported_reason(base) is None
    assert "DoRA" in unsupported_reason({**base, "use_dora": True})
    assert "biases" in unsupported_reason({**base, "bias": "all"})
    assert "modules_to_save" in unsupported_reason({**base, "modules_to_save": ["lm_head"]})
    assert "per-module" in unsupported_reason({**base, "rank_pattern": {"q_proj": 4}})
    assert lora_scale(base) == 2.0
    assert lora_scale({**base, "use_rslora": True}) == 8.0


def test_an_adapter_with_lora_on_the_embeddings_skips_the_adapter_gguf(tmp_path):
    """PEFT saves LoRA on an embedding as lora_embedding_A/B (and may save a layer whole),
    which llama.cpp's LoRA format cannot hold: the adapter GGUF is skipped with the reason, as
    for DoRA, instead of failing the whole export (the merged GGUF holds everything)."""
    import torch
    from lorakit.export.gguf_adapter import unsupported_tensors
    from safetensors.torch import save_file

    lora = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 4),
    }
    save_file(lora, str(tmp_path / "adapter_model.safetensors"))
    assert unsupported_tensors(tmp_path) is None
    embed = {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 32)}
    save_file({**lora, **embed}, str(tmp_path / "adapter_model.safetensors"))
    reason = unsupported_tensors(tmp_path)
    assert reason and "embed_tokens.lora_embedding_A" in reason and "merged GGUF" in reason


# --------------------------------------------------------------------------- embedded SmolLM2


SMOL_RECIPE = """
[quant]
plugin = "none"
[peft]
r = 8
alpha = 16
[train]
max_steps = 3
per_device_train_batch_size = 4
learning_rate = 1e-3
max_length = 96
save_steps = 100
gradient_checkpointing = false
[eval]
metrics = ["eval_loss"]
baseline = false
[[data.sources]]
plugin = "chat_jsonl"
path = "chat.jsonl"
"""


@pytest.mark.slow
@pytest.mark.embedded
def test_smollm2_gguf_round_trip(tmp_path):
    """Train SmolLM2 a few steps, export f32 and q8_0, read both back, check parity."""
    from lorakit.cli.main import main
    from transformers import AutoTokenizer

    write_jsonl(tmp_path / "chat.jsonl", chat_records(24))
    (tmp_path / "smol.toml").write_text(SMOL_RECIPE, encoding="utf-8")
    argv = ["run", str(tmp_path / "smol.toml"), f"output.dir={tmp_path / 'runs'}"]
    assert main([*argv, "output.name=smol"]) == 0
    run = tmp_path / "runs" / "smol"
    assert main(["export", str(run), "--gguf", "--gguf-type", "f32", "--gguf-type", "q8_0"]) == 0
    gguf = run / "export" / "gguf"
    parity = json.loads((gguf / "parity.json").read_text())
    rows = parity["comparisons"]
    assert rows["gguf_f32"]["max_abs_logit_diff"] < 1e-3
    assert rows["gguf_f32"]["argmax_agreement"] == 1.0
    q8 = rows["gguf_q8_0"]
    assert q8["within_tolerance"] and q8["argmax_agreement"] > 0.9, q8
    assert parity["chat_template"]["identical"] == parity["chat_template"]["train_examples_checked"]
    assert parity["chat_template"]["train_examples_checked"] > 10

    fields = _fields(gguf / "smol-Q8_0.gguf")
    tok = AutoTokenizer.from_pretrained(str(run / "adapter"))
    assert fields["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.chat_template"] == tok.chat_template
    assert fields["llama.vocab_size"] == 49152 and "output.weight" not in _tensor_names(gguf)
    modelfile = (gguf / "Modelfile").read_text()
    assert (
        "TEMPLATE" in modelfile
        and 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile
    )
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert parity["adapter_gguf"]["written"]


def _tensor_names(folder: Path) -> set[str]:
    from gguf import GGUFReader

    return {t.name for t in GGUFReader(str(folder / "smol-F32.gguf")).tensors}


def test_a_special_token_that_is_also_unk_keeps_its_id():
    """GPT-2-style tokenizers (and SmolLM2's base) use ``<|endoftext|>`` as unk, bos and eos at
    once. Its id is the unk id, and it must still be written as BOS and EOS (llama.cpp falls
    back to its own defaults where they are missing, and stops on the wrong token); an id of 0
    is an id, not a missing one. A token the tokenizer does not have is left out."""
    from helpers import _train_bpe
    from lorakit.export.gguf_vocab import read_vocab
    from transformers import PreTrainedTokenizerFast

    corpus = [m["content"] for r in chat_records(50) for m in r["messages"]]
    trained = _train_bpe(corpus, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], 300)
    end = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=trained, unk_token=end, bos_token=end, eos_token=end
    )
    assert tok.unk_token_id == tok.bos_token_id == tok.eos_token_id == 0
    vocab = read_vocab(tok, len(tok), "<|im_end|>")
    assert (vocab.bos_id, vocab.eos_id, vocab.unk_id) == (0, 0, 0)
    assert vocab.eot_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert read_vocab(tok, len(tok), end).eot_id == 0  # raw text: the end of turn is eos
    assert read_vocab(tok, len(tok), "<|no_such_token|>").eot_id == 0  # unknown: eos instead
