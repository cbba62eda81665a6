"""The tokenizer part of a GGUF: vocabulary, merges, token types, special ids, chat template.

A GGUF carries no ``tokenizer.json``; llama.cpp (and transformers' ``gguf_file=`` loader)
rebuild the tokenizer from metadata under ``tokenizer.ggml.*``. lorakit writes two kinds:

- byte-level BPE (``gpt2``; SmolLM2, Qwen2, Llama 3, Mistral's tekken), described completely by
  tokens, merges and the name of the pre-tokenizer split. The split is identified by comparing
  the run's own pre-tokenizer with the ones llama.cpp knows; one that matches none of them is
  refused rather than written with a split that would tokenize differently from training;
- sentencepiece-style BPE with byte fallback (``llama``; Llama 2, Mistral 7B v0.1-v0.3):
  tokens, scores and token types, see ``gguf_spm``.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from lorakit.errors import ModelError
from lorakit.export import gguf_spm

# llama.cpp pre-tokenizer names whose split regex transformers also knows (looked up there, by
# name, so both sides agree on the regex).
_SPLIT_NAMES = ("llama-bpe", "qwen2", "tekken", "gpt-4o")
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@attrs.frozen
class Vocab:
    """Everything ``tokenizer.ggml.*`` holds, ready for the writer."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    eot_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    model: str = "gpt2"  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SPM)
    scores: list[float] | None = None  # "llama": per-token merge priority
    add_space_prefix: bool | None = None  # "llama": a "▁" before text after the start/specials


def _known_splits() -> dict[str, str]:
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
        )
    except ImportError:  # an older transformers: only the plain GPT-2 split is recognised
        return {}
    return {GGUF_PRE_TOKENIZER_SPLITS[n]: n for n in _SPLIT_NAMES if n in GGUF_PRE_TOKENIZER_SPLITS}


def _is_byte_level(step: dict[str, Any], use_regex: bool) -> bool:
    return (
        step.get("type") == "ByteLevel"
        and not step.get("add_prefix_space", False)
        and bool(step.get("use_regex", True)) == use_regex
    )


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """The llama.cpp name of a byte-level pre-tokenizer (``tokenizer.json`` form), or raise."""
    if pre is not None and _is_byte_level(pre, use_regex=True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if len(steps) == 2 and _is_byte_level(steps[1], use_regex=False):
        split = steps[0]
        regex = (split.get("pattern") or {}).get("Regex")
        if split.get("type") == "Split" and split.get("behavior") == "Isolated" and regex:
            name = _known_splits().get(regex)
            if name:
                return name
    raise ModelError(
        f"the run's tokenizer splits text with a pre-tokenizer lorakit cannot name for GGUF "
        f"({json.dumps(pre)[:160]})",
        fix="export without --gguf (the merged and adapter exports still work); GGUF export "
        "supports byte-level BPE tokenizers with the GPT-2, Llama 3, Qwen2 or tekken split",
    )


def _adds(tokenizer: Any, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0 if first else -1] == token_id


def read_vocab(tokenizer: Any, vocab_size: int, end_of_turn: str | None) -> Vocab:
    """Describe ``tokenizer`` (a fast byte-level BPE tokenizer) for a model with ``vocab_size``
    embedding rows; raise ``ModelError`` for tokenizers GGUF export does not support."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(
            "the run's tokenizer is not a fast (tokenizers) tokenizer; GGUF export needs its "
            "tokenizer.json",
            fix="export without --gguf",
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    spm = gguf_spm.is_sentencepiece(spec)
    if not spm and (model.get("type") != "BPE" or spec.get("normalizer")):
        raise ModelError(
            f"the run's tokenizer is {model.get('type')}; lorakit writes byte-level BPE "
            "(GPT-2 style: SmolLM2, Qwen2, Llama 3) and sentencepiece-style BPE (Llama 2, "
            "Mistral 7B) tokenizers into GGUF",
            fix="export without --gguf, or convert the merged export with llama.cpp's own tools",
        )
    prefix = gguf_spm.prefix_rule(spec) if spm else None
    pre = "default" if spm else pre_tokenizer_name(spec.get("pre_tokenizer"))

    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = dict.fromkeys(by_id, NORMAL)
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if by_id and max(by_id) >= vocab_size:
        raise ModelError(
            f"the tokenizer has token id {max(by_id)} but the model has only {vocab_size} "
            "embedding rows",
            fix="the run's tokenizer does not belong to its model; check the [model] section",
        )
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [types.get(i, UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    scores = None
    if spm:  # llama.cpp's SPM tokenizer reads scores, not merges
        scores, token_types = gguf_spm.scores_and_types(
            spec, tokens, token_types, tokenizer.unk_token_id
        )
        merges = []

    def token_id(token: str | None) -> int | None:
        """The token's id; None where the tokenizer does not have it (it maps an unknown token
        to the unk id, which is then no answer; the unk token itself is one: GPT-2's
        ``<|endoftext|>`` is unk, bos and eos at once)."""
        if not token:
            return None
        value = tokenizer.convert_tokens_to_ids(token)
        if not isinstance(value, int):
            return None
        return None if value == tokenizer.unk_token_id and token != tokenizer.unk_token else value

    bos_id, eos_id = token_id(tokenizer.bos_token), token_id(tokenizer.eos_token)
    eot_id = token_id(end_of_turn)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return Vocab(
        pre=pre,
        tokens=tokens,
        token_types=token_types,
        merges=merges,
        bos_id=bos_id,
        eos_id=eos_id,
        unk_id=tokenizer.unk_token_id,
        pad_id=tokenizer.pad_token_id,
        eot_id=eos_id if eot_id is None else eot_id,  # id 0 is an id
        add_bos=_adds(tokenizer, bos_id, first=True),
        add_eos=_adds(tokenizer, eos_id, first=False),
        chat_template=template,
        model="llama" if spm else "gpt2",
        scores=scores,
        add_space_prefix=prefix,
    )


def add_vocab(writer: Any, vocab: Vocab) -> None:
    """Write ``vocab`` into a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for value, add in (
        (vocab.bos_id, writer.add_bos_token_id),
        (vocab.eos_id, writer.add_eos_token_id),
        (vocab.unk_id, writer.add_unk_token_id),
        (vocab.pad_id, writer.add_pad_token_id),
        (vocab.eot_id, writer.add_eot_token_id),
    ):
        if value is not None:
            add(value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
