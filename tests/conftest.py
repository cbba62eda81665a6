"""Shared fixtures: a tiny real Llama + trained tokenizer, chat data, and recipe writers.

The tiny model is a real transformers LlamaForCausalLM built from a config with random weights,
and its tokenizer is a real byte-level BPE trained on the test corpus, with a ChatML template.
Training on it goes through real PEFT, TRL and (for QLoRA) bitsandbytes, just fast.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

COLORS = ["red", "blue", "green", "black", "white", "yellow"]
ITEMS = ["car", "cup", "shirt", "lamp", "chair", "book"]


def chat_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c, it, q = rng.choice(COLORS), rng.choice(ITEMS), rng.randint(1, 9)
        out.append(
            {
                "id": f"ex{i}",
                "messages": [
                    {"role": "user", "content": f"Extract: I bought {q} {c} {it}s."},
                    {
                        "role": "assistant",
                        "content": json.dumps({"item": it, "color": c, "qty": q}),
                    },
                ],
            }
        )
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def build_tiny_model(folder: Path) -> Path:
    """Save a tiny random Llama + trained BPE tokenizer with a ChatML template to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [m["content"] for r in chat_records(300) for m in r["messages"]]
    corpus += [
        "user assistant system Extract: I bought",
        "The quick brown fox jumps over the lazy dog.",
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",  # pad == eos on purpose, like SmolLM2
    )
    fast.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def chat_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", chat_records(40))


def tiny_recipe(
    folder: Path, model_dir: Path, data: Path, *, quant: str = "none", extra: str = ""
) -> Path:
    """Write a recipe that trains the tiny model on ``data``; runs go to ``folder/runs``."""
    text = f"""
[model]
plugin = "local"
path = "{model_dir}"

[quant]
plugin = "{quant}"

[peft]
r = 4
alpha = 8
dropout = 0.1

[train]
max_steps = 4
per_device_train_batch_size = 4
learning_rate = 5e-3
save_steps = 2
max_length = 64
seed = 7

[[data.sources]]
plugin = "chat_jsonl"
path = "{data}"

[output]
dir = "{folder / "runs"}"
{extra}
"""
    path = folder / "recipe.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def cli(capsys):
    """Run the lorakit CLI in-process; returns (exit code, stdout, stderr)."""
    from lorakit.cli.main import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"))
    yield


def python() -> str:
    return sys.executable
