"""Data text that spells one of the tokenizer's special tokens.

The rendered example is tokenized in one call (:mod:`lorakit.data.tokenize`), so the tokenizer
reads ``<|im_end|>`` written inside a message as its end-of-turn token, not as ten characters:
the model would be trained to end its turn in mid-message (or, in a user turn, to see a turn
the data never had). The template puts the special tokens a conversation needs around its
messages; none belongs inside one.

- In a conversation (a message's content, reasoning, tool calls, tool definitions) such text
  is refused (:class:`~lorakit.errors.DataError` naming the example, the message and the
  token).
- In a raw text it is counted and reported as a warning: a text already written in a chat
  format holds these tokens on purpose, prose that mentions them does not, and only the
  user can tell which.

Special tokens are the tokenizer's added tokens marked special (``<|im_start|>``,
``<|endoftext|>``, ``</s>``, ...); added tokens that are ordinary words are not.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

from lorakit.contracts import Example
from lorakit.data.jsonl import json_strings
from lorakit.data.report import DataReport, example_where
from lorakit.errors import DataError

_patterns: weakref.WeakKeyDictionary[Any, re.Pattern[str] | None] = weakref.WeakKeyDictionary()


def special_strings(tokenizer: Any) -> list[str]:
    """The text of every special token of ``tokenizer``, longest first."""
    found = {str(t) for t in getattr(tokenizer, "all_special_tokens", None) or ()}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found |= {str(t.content) for t in decoder.values() if getattr(t, "special", False)}
    return sorted((s for s in found if s), key=lambda s: (-len(s), s))


def _pattern(tokenizer: Any) -> re.Pattern[str] | None:
    try:
        return _patterns[tokenizer]
    except (KeyError, TypeError):
        pass
    strings = special_strings(tokenizer)
    pattern = re.compile("|".join(map(re.escape, strings))) if strings else None
    with contextlib.suppress(TypeError):  # not weakly referable: computed again next time
        _patterns[tokenizer] = pattern
    return pattern


def _conversation_parts(ex: Example) -> Iterator[tuple[str, str]]:
    """(what, text) for every piece of a conversation the template renders from the data."""
    for label, messages in (("message", ex.messages), ("rejected message", ex.rejected)):
        for i, m in enumerate(messages or ()):
            for text in json_strings(m.to_json()):
                yield f"{label} {i + 1} ({m.role})", text
    for text in json_strings(list(ex.tools or ())):
        yield "the tool definitions", text


def conversation_special_token(ex: Example, tokenizer: Any) -> tuple[str, str] | None:
    """(where, token) for the first piece of conversation ``ex`` that spells a special token
    of ``tokenizer``, or None (also for a raw text)."""
    pattern = _pattern(tokenizer)
    if pattern is None or ex.text is not None:
        return None
    for what, text in _conversation_parts(ex):
        found = pattern.search(text)
        if found:
            return what, found.group(0)
    return None


def check_special_text(examples: Iterable[Example], tokenizer: Any, report: DataReport) -> None:
    """Refuse a conversation whose text spells a special token; count raw texts that do (a
    warning in ``report``)."""
    pattern = _pattern(tokenizer)
    if pattern is None:
        return
    for ex in examples:
        if ex.text is not None:
            found = pattern.search(ex.text)
            if found:
                report.note_special_text(found.group(0), ex.id)
            continue
        spelled = conversation_special_token(ex, tokenizer)
        if spelled:
            what, token = spelled
            raise DataError(
                f"{what} holds the text {token!r}, which the tokenizer reads as its special "
                "token, not as text: training on it would teach the model that control token "
                "in mid-message",
                where=example_where(ex),
                fix=f"remove or reword {token!r} there (the chat template adds the special "
                "tokens a conversation needs), or drop the example",
            )
