"""``raw_text``: plain continued pretraining on text (markdown, reports, ...).

A raw-text example renders as ``bos + text + eos``; the text and the eos are supervised, so the
model learns the text and to stop after it. BOS is written only when the tokenizer adds one to
plain text. Conversations have no layout here: they are rejected with a pointer to a chat
formatter (``render_prompt`` joins message contents, for generating continuations).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from lorakit.api import DataError, Example, Message, RegisterFormatter, Rendered, Segment, hookimpl

from lorakit_plugins.formatters._turns import bos_for, refuse_tool_trace


@attrs.frozen
class RawTextOptions:
    pass


class RawTextFormatter:
    Options = RawTextOptions

    def __init__(self, options: RawTextOptions):
        self.options = options
        self._bos: dict[int, str] = {}

    def _bos_of(self, tokenizer: Any) -> str:
        if id(tokenizer) not in self._bos:
            self._bos[id(tokenizer)] = bos_for(tokenizer)
        return self._bos[id(tokenizer)]

    def end_of_turn(self, tokenizer: Any) -> str:
        eos = getattr(tokenizer, "eos_token", None)
        if not eos:
            raise DataError(
                "raw_text ends each text with the tokenizer's eos token, but it has none",
                where="[format].plugin",
                fix="use a tokenizer with an eos token",
            )
        return eos

    def render(self, example: Example, tokenizer: Any) -> Rendered:
        if example.messages is not None:
            raise DataError(
                f"raw_text cannot format conversation {example.id} (it has no turn layout)",
                where=str(example.meta.get("source", example.id)),
                fix='use a chat formatter: plugin = "chat_template", "chatml", "mistral_inst" or '
                '"instruction"',
            )
        segs = (
            Segment(self._bos_of(tokenizer)),
            Segment((example.text or "") + self.end_of_turn(tokenizer), True),
        )
        return Rendered(tuple(s for s in segs if s.text))

    def render_prompt(
        self,
        messages: Sequence[Message],
        tokenizer: Any,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        refuse_tool_trace("raw_text", messages, tools, "a generation prompt")
        return self._bos_of(tokenizer) + "\n\n".join(m.content for m in messages)


@hookimpl
def lorakit_register_formatters(register: RegisterFormatter) -> None:
    register("raw_text", RawTextFormatter)
