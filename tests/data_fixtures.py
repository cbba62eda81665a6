"""Fixtures and helpers for the data tests (``tests/test_data_*.py``).

``data_tokenizer``: a real byte-level BPE trained on test text, wrapped in
``transformers.PreTrainedTokenizerFast`` with ``<s>``/``</s>`` (BOS/EOS; its post-processor adds
BOS to plain text, so formatters must write it themselves exactly once), ``<|im_start|>`` and
``<|im_end|>``, and a ChatML chat template. ``data_tokenizer_dir``: the same saved to a folder
(for ``LiteTokenizer`` and ``lorakit check --tokenizer``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, this is a test.",
    "### Instruction:\nTranslate to French\n\n### Response:\nBonjour\n\n",
    "[INST] What is the capital of Japan? [/INST] Tokyo",
    "# Heading\n\nA paragraph of markdown text. Another sentence!\n\n## Sub heading\n- item one\n",
    "system user assistant answer question reply numbers 0123456789 abc xyz",
]


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def data_tokenizer() -> Any:
    return build_tokenizer()


@pytest.fixture(scope="session")
def data_tokenizer_dir(data_tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data_tokenizer")
    data_tokenizer.save_pretrained(str(folder))
    return folder
