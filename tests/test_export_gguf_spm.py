"""GGUF export of sentencepiece-style tokenizers (Llama 2, Mistral 7B v0.1-v0.3): issue 25, item 1.

The tokenizers are built here the way transformers converts a SentencePiece BPE model: pieces
spelled with ``▁``, 256 ``<0xNN>`` byte tokens, ``byte_fallback``, and merges generated from the
piece scores (``generate_merges``). Two prefix styles: ``Metaspace(prepend_scheme="first")``
(transformers 5's ``LlamaTokenizer``) and the older ``legacy`` normalizer (``Prepend("▁")``),
which real Mistral 7B files use. With the ``sentencepiece`` package installed, one more test
trains a real SentencePiece model and converts it with transformers.
"""

from __future__ import annotations

import json

import pytest
from helpers import chat_records, tiny_recipe, write_jsonl
from test_mistral_recipe import MISTRAL_TEMPLATE, build_tiny_mistral

TEXTS = [
    "Extract: I bought 3 red cups.",
    "  two leading spaces and trailing  ",
    "<s>[INST] Hi there [/INST] Hello!</s>[INST] and ü é 漢字 ☃? [/INST]",
    'tabs\tand\nnewlines {"qty": 3}',
]


def spm_tokenizer(legacy: bool = False):
    """A Llama/Mistral-style tokenizer: BPE pieces with ▁, byte fallback, SPM-ordered merges."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    corpus = [m["content"] for r in chat_records(200) for m in r["messages"]]
    corpus += ["[INST] Hi there [/INST]", "The quick brown fox jumps over the lazy dog."]
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=True)
    trainer_tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False)
    )
    learned = sorted(trainer_tok.get_vocab().items(), key=lambda kv: kv[1])
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [t for t, _ in learned if t not in pieces]
    vocab = {t: i for i, t in enumerate(pieces)}
    scores = {t: -float(i) for i, t in enumerate(pieces) if i >= 259}  # SPM: earlier = better
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab, scores),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,  # like Llama 2 and Mistral 7B (their templates write <s> too)
    )
    if legacy:  # Mistral 7B's tokenizer.json: every piece of text gets the ▁ prefix
        backend = tok.backend_tokenizer
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        backend.pre_tokenizer = None
    tok.chat_template = MISTRAL_TEMPLATE
    return tok


@pytest.mark.parametrize("legacy", [False, True])
def test_sentencepiece_vocab_fields(legacy):
    from lorakit.export.gguf_spm import BYTE, CONTROL, UNKNOWN, choose_space_prefix
    from lorakit.export.gguf_vocab import read_vocab

    tok = spm_tokenizer(legacy)
    vocab = read_vocab(tok, len(tok) + 3, "</s>")
    assert vocab.model == "llama" and vocab.pre == "default" and vocab.merges == []
    assert vocab.add_space_prefix is legacy  # the tokenizer's own rule
    assert vocab.token_types[tok.convert_tokens_to_ids("<0x0A>")] == BYTE
    assert vocab.token_types[tok.unk_token_id] == UNKNOWN
    assert vocab.token_types[tok.eos_token_id] == CONTROL
    assert vocab.tokens[-1] == f"[PAD{len(tok) + 2}]" and vocab.token_types[-1] == 5
    assert vocab.scores is not None and len(vocab.scores) == len(vocab.tokens)
    assert vocab.add_bos and not vocab.add_eos
    if legacy:  # llama.cpp's rule exactly: its split (from these fields) gives the same ids
        prefix, record = choose_space_prefix(vocab, TEXTS, tok)
        assert prefix is True and record["identical_token_ids"] == len(TEXTS)


def test_llamacpp_split_chooses_no_prefix_for_chat_prompts_of_a_first_only_tokenizer():
    from lorakit.errors import RunError
    from lorakit.export.gguf_spm import choose_space_prefix
    from lorakit.export.gguf_vocab import read_vocab

    tok = spm_tokenizer(legacy=False)
    vocab = read_vocab(tok, len(tok), "</s>")
    chat = [t for t in TEXTS if t.startswith("<s>")]
    prefix, _ = choose_space_prefix(vocab, chat, tok)
    assert prefix is False  # after <s> no ▁ in training: llama.cpp must not add one
    # raw text at the start needs the prefix, text after <s> must not have it: no single
    # add_space_prefix makes llama.cpp agree on both, and the export says so
    with pytest.raises(RunError, match="different token ids"):
        choose_space_prefix(vocab, TEXTS, tok)


def test_unreproducible_normalizer_is_refused():
    from lorakit.errors import ModelError
    from lorakit.export.gguf_vocab import read_vocab
    from tokenizers import normalizers

    tok = spm_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.NFKC()
    with pytest.raises(ModelError, match=r"llama\.cpp's tokenizer does not"):
        read_vocab(tok, len(tok), "</s>")


def test_real_sentencepiece_model_converted_by_transformers(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from lorakit.export.gguf_spm import choose_space_prefix
    from lorakit.export.gguf_vocab import read_vocab
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(m["content"] for r in chat_records(300) for m in r["messages"]), encoding="utf-8"
    )
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        minloglevel=2,
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
    )
    folder = tmp_path / "tok"
    folder.mkdir()
    (tmp_path / "sp.model").rename(folder / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "bos_token": "<s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "</s>"}))
    tok = AutoTokenizer.from_pretrained(str(folder))  # converted to tokenizer.json form
    vocab = read_vocab(tok, len(tok), "</s>")
    assert vocab.model == "llama" and len(vocab.tokens) == 400
    # Known llama.cpp difference: text that *starts* with spaces gets one more "▁" there than
    # transformers gives it; chat prompts start with <s>, so the export's probes never do.
    texts = [t for t in TEXTS if not t.startswith(" ")]
    prefix, record = choose_space_prefix(vocab, texts, tok)
    assert prefix is True and record["identical_token_ids"] == len(texts)


@pytest.mark.slow  # trains the tiny Mistral
def test_sentencepiece_mistral_gguf_round_trip(tmp_path, cli):
    """The recipe test's tiny Mistral with a legacy sentencepiece tokenizer (like Mistral 7B
    v0.2): trained, exported to GGUF, read back, tokenizer and template checked."""
    from gguf import GGUFReader

    model = build_tiny_mistral(tmp_path / "model", tokenizer=spm_tokenizer(legacy=True))
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    code, _out, err = cli("run", tiny_recipe(tmp_path, model, data))
    assert code == 0, err
    run = tmp_path / "runs" / "recipe"
    code, _out, err = cli("export", run, "--gguf", "--gguf-type", "f32")
    assert code == 0, err
    gguf = run / "export" / "gguf"
    parity = json.loads((gguf / "parity.json").read_text())
    assert parity["comparisons"]["gguf_f32"]["within_tolerance"]
    assert parity["tokenizer"]["identical_token_ids"] == parity["tokenizer"]["probes"] > 40
    assert parity["tokenizer"]["add_space_prefix"] is True
    assert parity["chat_template"]["identical"] == parity["chat_template"]["train_examples_checked"]
    assert parity["chat_template"]["ollama_template"] == "mistral_inst"
    reader = GGUFReader(str(gguf / "recipe-F32.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in fields
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.token_type"][fields["tokenizer.ggml.tokens"].index("<0x41>")] == 6
    modelfile = (gguf / "Modelfile").read_text()
    assert "[INST]" in modelfile and "{{ .Content }} [/INST]" in modelfile
