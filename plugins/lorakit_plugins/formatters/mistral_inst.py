"""``mistral_inst``: the Mistral/Llama-2 instruction layout::

    <s>[INST] {system}\n\n{user} [/INST] {assistant}</s>[INST] {user} [/INST] {assistant}</s>

A system message is folded into the first user turn. Supervised: a space, the assistant reply
and the tokenizer's eos (the space belongs to the reply: it is the first thing the model
generates after ``[/INST]``, and most tokenizers merge it into the reply's first token). BOS is
written only when the tokenizer adds one to plain text. Raw-text examples: ``bos + text + eos``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from lorakit import hookimpl
from lorakit.contracts import Example, Message, Rendered
from lorakit.errors import DataError
from lorakit.options import option

from lorakit_plugins.formatters._turns import Layout, TurnRenderer

LAYOUT = Layout(
    system="{content}\n\n",  # only used when a conversation has no user turn after the system
    user="[INST] {content} [/INST]",
    assistant_open="",
    assistant_close="",
    assistant_lead=" ",
    system_into_user="\n\n",
)


@attrs.frozen
class MistralInstOptions:
    system_prompt: str | None = option(
        None, doc="system text put before the first user turn when a conversation has none"
    )


class MistralInstFormatter:
    Options = MistralInstOptions

    def __init__(self, options: MistralInstOptions):
        self.options = options
        self.turns = TurnRenderer(LAYOUT, options.system_prompt)

    def end_of_turn(self, tokenizer: Any) -> str:
        eos = getattr(tokenizer, "eos_token", None)
        if not eos:
            raise DataError(
                "mistral_inst ends replies with the tokenizer's eos token, but it has none",
                where="[format].plugin",
                fix='use plugin = "chatml" or "chat_template"',
            )
        return eos

    def render(self, example: Example, tokenizer: Any) -> Rendered:
        eot = self.end_of_turn(tokenizer)
        return self.turns.render(example, eot, eot, tokenizer)

    def render_prompt(self, messages: Sequence[Message], tokenizer: Any) -> str:
        return self.turns.render_prompt(messages, self.end_of_turn(tokenizer), tokenizer)


@hookimpl
def lorakit_register_formatters(register):
    register("mistral_inst", MistralInstFormatter)
