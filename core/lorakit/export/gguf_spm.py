"""SentencePiece-style tokenizers (Llama 2, Mistral 7B v0.1-v0.3) in a GGUF, and how llama.cpp
will split text with them.

In ``tokenizer.json`` these are a BPE model with ``byte_fallback`` over ``▁``-spelled pieces
(``LlamaTokenizerFast``). llama.cpp's ``llama`` tokenizer does not read merges: it starts from
UTF-8 characters and repeatedly joins the adjacent pair whose joined text is a token with the
highest **score** (leftmost on ties); characters no token holds become ``<0xNN>`` byte tokens.
So the GGUF carries, per token, a score: minus the rank of the first merge that makes it, which
makes "highest score" the order the run's merges apply in (0 for tokens no merge makes: single
characters, bytes, specials). Token types: ``<0xNN>`` BYTE, the unknown token UNKNOWN, special
added tokens CONTROL, other added tokens USER_DEFINED.

The space before a word: llama.cpp writes ``▁`` for every space, and (``add_space_prefix``)
one more at the start of each piece of text that follows the start or a special token.
Tokenizers differ here: a ``Prepend("▁")`` normalizer (the older ``legacy`` files) prefixes
every such piece, exactly llama.cpp's rule; a ``Metaspace(prepend_scheme="first")`` prefixes only
the very start of the input, which in a chat prompt is a special token, so no piece gets one.
``choose_space_prefix`` picks the value under which ``LlamaCppSpm`` (a reimplementation of
llama.cpp's split, from the GGUF's own fields) gives the run tokenizer's ids on every probe, or
refuses: nothing is guessed.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

from lorakit.errors import ModelError, RunError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"


def is_sentencepiece(spec: dict[str, Any]) -> bool:
    model = spec.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def prefix_rule(spec: dict[str, Any]) -> bool:
    """Whether the run's tokenizer adds ``▁`` to every piece of text (True) or only the start
    of the input (False); raise for normalizers or splits llama.cpp cannot reproduce."""
    normalizer = spec.get("normalizer")
    steps = normalizer.get("normalizers", [normalizer]) if normalizer else []  # Sequence or one
    kinds = [(s.get("type"), s.get("prepend") or s.get("content")) for s in steps]
    pre: dict[str, Any] = spec.get("pre_tokenizer") or {}
    if kinds == [("Prepend", SPACE), ("Replace", SPACE)] and not pre:
        return True  # legacy: every piece of text gets the prefix (llama.cpp's own rule)
    metaspace = pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE
    if not kinds and metaspace and not pre.get("split", True):
        return pre.get("prepend_scheme", "always") != "first"
    raise ModelError(
        "the run's sentencepiece tokenizer normalizes or splits text in a way llama.cpp's "
        f"tokenizer does not (normalizer {normalizer}, pre-tokenizer {pre})",
        fix="export without --gguf (the merged and adapter exports still work)",
    )


def scores_and_types(
    spec: dict[str, Any], tokens: list[str], types: list[int], unk_id: int | None
) -> tuple[list[float], list[int]]:
    """Per token: its score (minus the rank of the merge that makes it) and llama.cpp type."""
    rank: dict[str, int] = {}
    for i, merge in enumerate(spec["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, i)
    scores, out = [], []
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        scores.append(-float(rank[token]) if token in rank and kind == NORMAL else 0.0)
        if kind == NORMAL and len(token) == 6 and token.startswith("<0x") and token[-1] == ">":
            kind = BYTE
        if i == unk_id:
            kind = UNKNOWN
        out.append(kind)
    return scores, out


class LlamaCppSpm:
    """llama.cpp's ``llama`` (SPM) tokenizer, rebuilt from a GGUF's tokenizer fields, with
    special tokens parsed in the text (as llama.cpp does for a chat-templated prompt)."""

    def __init__(
        self, tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], prefix: bool
    ):
        self.ids = {t: i for i, t in enumerate(tokens) if types[i] != UNUSED}
        self.scores = scores
        self.prefix = prefix
        specials = [t for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)]
        self.specials = sorted(specials, key=len, reverse=True)

    def __call__(self, text: str) -> list[int]:
        out: list[int] = []
        after_special = True
        for piece, special in self._partition(text):
            if special:
                out.append(self.ids[piece])
                after_special = True
                continue
            if self.prefix and after_special:
                piece = " " + piece
            out += self._spm(piece.replace(" ", SPACE))
            after_special = False
        return out

    def _partition(self, text: str) -> list[tuple[str, bool]]:
        parts: list[tuple[str, bool]] = []
        start = i = 0
        while i < len(text):
            hit = next((s for s in self.specials if text.startswith(s, i)), None)
            if hit is None:
                i += 1
                continue
            if i > start:
                parts.append((text[start:i], False))
            parts.append((hit, True))
            i = start = i + len(hit)
        if start < len(text):
            parts.append((text[start:], False))
        return parts

    def _spm(self, text: str) -> list[int]:
        symbols = list(text)
        alive = [True] * len(symbols)
        nxt = list(range(1, len(symbols) + 1))
        prv = list(range(-1, len(symbols) - 1))
        queue: list[tuple[float, int, int, str]] = []

        def push(left: int) -> None:
            right = nxt[left]
            if left < 0 or right >= len(symbols):
                return
            joined = symbols[left] + symbols[right]
            if joined in self.ids:
                heapq.heappush(queue, (-self.scores[self.ids[joined]], left, right, joined))

        for i in range(len(symbols) - 1):
            push(i)
        while queue:
            _, left, right, joined = heapq.heappop(queue)
            if not (alive[left] and alive[right]) or symbols[left] + symbols[right] != joined:
                continue  # a stale pair: one side was merged since
            if nxt[left] != right:
                continue
            symbols[left] = joined
            alive[right] = False
            nxt[left] = nxt[right]
            if nxt[left] < len(symbols):
                prv[nxt[left]] = left
            if prv[left] >= 0:
                push(prv[left])
            push(left)
        out: list[int] = []
        for i, symbol in enumerate(symbols):
            if not alive[i]:
                continue
            if symbol in self.ids:
                out.append(self.ids[symbol])
            else:
                out += [self.ids[f"<0x{b:02X}>"] for b in symbol.encode("utf-8")]
        return out


def choose_space_prefix(
    vocab: Any, texts: Sequence[str], original: Any
) -> tuple[bool, dict[str, Any]]:
    """The ``add_space_prefix`` under which llama.cpp splits every text like the run's
    tokenizer (its own rule tried first), and the check's record; raise ``RunError`` if none."""
    wants = [original(t, add_special_tokens=False)["input_ids"] for t in texts]
    first = bool(vocab.add_space_prefix)
    for prefix in (first, not first):
        split = LlamaCppSpm(vocab.tokens, vocab.scores, vocab.token_types, prefix)
        try:
            same = all(split(t) == want for t, want in zip(texts, wants, strict=True))
        except KeyError:  # a character without a byte token: this vocabulary cannot hold it
            same = False
        if same:
            return prefix, {
                "reader": "lorakit's reimplementation of llama.cpp's SPM tokenizer",
                "add_space_prefix": prefix,
                "probes": len(texts),
                "identical_token_ids": len(texts),
            }
    raise RunError(
        "llama.cpp would split the probe conversations into different token ids from the run's "
        "sentencepiece tokenizer (with and without its space prefix); nothing was exported",
        fix="export without --gguf (the merged export is unaffected), and report this with the "
        "run's tokenizer.json",
    )


def _probe_texts(run: Any, loaded: Any) -> list[str]:
    """Texts llama.cpp will tokenize: the probe conversations and the train split rendered as
    in training, full and as generation prompts."""
    from lorakit.contracts import Example, Message
    from lorakit.export.parity import BUILTIN_PROBES, split_examples
    from lorakit.fidelity import served_prompt

    examples = (
        [
            Example(id=f"probe{i}", messages=tuple(Message(r, c) for r, c in conv))
            for i, conv in enumerate(BUILTIN_PROBES)
        ]
        + split_examples(run.path, "val")
        + split_examples(run.path, "train", 50)
    )
    texts = []
    for ex in examples:
        texts.append(loaded.formatter.render(ex, loaded.tokenizer).text)
        if ex.messages and ex.messages[-1].role == "assistant":
            texts.append(
                served_prompt(loaded.formatter, ex.messages[:-1], loaded.tokenizer, ex.tools)
            )
    return texts


def space_prefix_for_run(run: Any, loaded: Any, vocab: Any) -> tuple[Any, dict[str, Any] | None]:
    """A ``gguf_vocab.Vocab``: for sentencepiece, with the space prefix under which llama.cpp splits the
    run's texts as training did, and that check's record; other vocabularies as they are."""
    if vocab.model != "llama":
        return vocab, None
    import attrs

    prefix, spm_check = choose_space_prefix(vocab, _probe_texts(run, loaded), loaded.tokenizer)
    return attrs.evolve(vocab, add_space_prefix=prefix), spm_check
