"""``chatml``: the ChatML layout, fixed (independent of the tokenizer's own template)::

    <|im_start|>system
    {system}<|im_end|>
    <|im_start|>user
    {user}<|im_end|>
    <|im_start|>assistant
    {assistant}<|im_end|>

Supervised: each assistant reply and its ``<|im_end|>``. The tokenizer must have
``<|im_end|>`` as a single token. BOS is written only when the tokenizer adds one to plain
text. Raw-text examples: ``bos + text + eos`` (eos: the tokenizer's, else ``<|im_end|>``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from lorakit.api import Example, Message, RegisterFormatter, Rendered, hookimpl, option

from lorakit_plugins.formatters._turns import Layout, TurnRenderer, eos_for, require_single_token

EOT = "<|im_end|>"
LAYOUT = Layout(
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_open="<|im_start|>assistant\n",
    assistant_close="\n",
)


@attrs.frozen
class ChatmlOptions:
    system_prompt: str | None = option(
        None, doc="system message added to conversations that have none (unset: none added)"
    )


class ChatmlFormatter:
    Options = ChatmlOptions

    def __init__(self, options: ChatmlOptions):
        self.options = options
        self.turns = TurnRenderer(LAYOUT, options.system_prompt, "chatml")
        self._checked: set[int] = set()

    @property
    def system_prompt(self) -> str | None:
        return self.options.system_prompt

    def end_of_turn(self, tokenizer: Any) -> str:
        if id(tokenizer) not in self._checked:
            require_single_token(tokenizer, EOT, "chatml")
            self._checked.add(id(tokenizer))
        return EOT

    def render(self, example: Example, tokenizer: Any) -> Rendered:
        eot = self.end_of_turn(tokenizer)
        return self.turns.render(example, eot, eos_for(tokenizer, eot), tokenizer)

    def render_prompt(
        self,
        messages: Sequence[Message],
        tokenizer: Any,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        return self.turns.render_prompt(messages, self.end_of_turn(tokenizer), tokenizer, tools)


@hookimpl
def lorakit_register_formatters(register: RegisterFormatter) -> None:
    register("chatml", ChatmlFormatter)
