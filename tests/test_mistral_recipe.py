"""The shipped 7B recipe really runs: recipes/mistral_qlora.toml end to end on a tiny Mistral.

Every setting comes from the shipped file itself (read at test time, never copied here); the
test writes a derived recipe whose only edit is the [model] table, and passes these overrides:

- ``[model]``: plugin = "local", a tiny random MistralForCausalLM (2 layers, hidden 64) saved in
  tmp with a tokenizer carrying Mistral-7B-Instruct-v0.2's ``[INST]`` chat template (the Hub is
  not reachable from the tests, and 7B would not fit the CI box anyway).
- ``train.optim = "adamw_torch"``: ``paged_adamw_8bit`` pages through CUDA; CPU-only here.
- ``train.max_steps = 2``: the recipe trains 2 epochs; two steps prove the loop and keep it fast.
- ``data.sources.0.path``: the same shipped data file, made absolute because the derived recipe
  lives in tmp (the recipe's path is relative to its own folder).
- ``output.dir``: the run folder goes to tmp, not the repository.

Everything else (4-bit NF4 + double quant, r=16 all-linear, batch 4 x accumulation 4,
gradient checkpointing, max_length 2048, cosine schedule, chat_template formatter, eval metrics
and splits) is the shipped recipe's.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, chat_records

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SHIPPED = REPO / "recipes" / "mistral_qlora.toml"

# Mistral-7B-Instruct-v0.2's tokenizer_config.json chat template (optional system message
# folded into the first [INST]; roles must alternate).
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the "
    "exception of an initial optional system message!') }}{%- endif %}"
    "{%- endfor %}"
)


def build_tiny_mistral(folder: Path, tokenizer: Any = None) -> Path:
    """A random 2-layer MistralForCausalLM + a BPE tokenizer that adds BOS like Mistral's
    (or ``tokenizer``, e.g. a sentencepiece-style one, with the same template)."""
    fast = tokenizer if tokenizer is not None else _byte_level_tokenizer()
    fast.chat_template = MISTRAL_TEMPLATE
    return _build_tiny_mistral_model(folder, fast)


def _byte_level_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    shipped_data = [
        json.loads(line) for line in (REPO / "examples/data/chat.jsonl").read_text().splitlines()
    ]
    corpus = [m["content"] for r in chat_records(100) + shipped_data for m in r["messages"]]
    corpus += ["[INST] [/INST]"]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=500,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    # Mistral's tokenizer adds BOS itself, and its template writes one too (double-BOS trap).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _build_tiny_mistral_model(folder: Path, fast: Any) -> Path:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        sliding_window=None,  # like v0.2
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(str(folder), safe_serialization=True)
    fast.save_pretrained(str(folder))
    return folder


def derived_recipe(tmp_path: Path, model_dir: Path) -> Path:
    """The shipped recipe's text with only its [model] table replaced."""
    text = SHIPPED.read_text(encoding="utf-8")
    model_table = re.compile(r"^\[model\]\n(?:(?!^\[).*\n)*", re.MULTILINE)
    assert len(model_table.findall(text)) == 1, "the shipped recipe has one [model] table"
    local = f'[model]\nplugin = "local"\npath = "{model_dir}"\n\n'
    path = tmp_path / "mistral_qlora.toml"
    path.write_text(model_table.sub(local, text), encoding="utf-8")
    return path


@pytest.mark.slow
def test_shipped_mistral_recipe_runs_end_to_end(tmp_path, cli):
    pytest.importorskip("bitsandbytes")
    shipped = tomllib.loads(SHIPPED.read_text(encoding="utf-8"))
    model_dir = build_tiny_mistral(tmp_path / "tiny-mistral")
    recipe = derived_recipe(tmp_path, model_dir)
    data = (SHIPPED.parent / shipped["data"]["sources"][0]["path"]).resolve()
    overrides = [
        'train.optim="adamw_torch"',
        "train.max_steps=2",
        f"data.sources.0.path={json.dumps(str(data))}",
        f"output.dir={json.dumps(str(tmp_path / 'runs'))}",
    ]
    code, _out, err = cli("run", recipe, *overrides)
    assert code == 0, err
    run = tmp_path / "runs" / shipped["output"]["name"]
    assert "memory plan: peak" in err

    # Every setting but the overridden ones is the shipped recipe's.
    resolved = json.loads((run / "resolved.json").read_text())
    assert resolved["quant"] == {"plugin": "bnb-4bit", **shipped["quant"]}
    for key, value in shipped["peft"].items():
        assert resolved["peft"][key] == value, key
    for key, value in shipped["train"].items():
        if key not in ("optim",):
            assert resolved["train"][key] == value, key
    assert resolved["train"]["max_steps"] == 2

    # It trained with Mistral's [INST] template, a single BOS, and evaluated.
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(s.get("step", 0) for s in steps) == 2
    report = json.loads((run / "eval_report.json").read_text())
    assert "perplexity" in json.dumps(report)
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 16 and adapter_config["lora_alpha"] == 32
    assert (
        "[INST]" in (run / "adapter" / "tokenizer_config.json").read_text()
        or "[INST]" in (run / "adapter" / "chat_template.jinja").read_text()
    )

    # Export: adapter and merged model (QLoRA-aware merge) with the template.
    code, _out, err = cli("export", run, "--merge")
    assert code == 0, err
    merged = run / "export" / "merged"
    assert (merged / "config.json").is_file()
    assert json.loads((merged / "config.json").read_text())["model_type"] == "mistral"
    assert list(merged.glob("*.safetensors"))
