"""``instruction``: the Alpaca layout, for base models without a chat template::

    {system}

    ### Instruction:
    {user}

    ### Response:
    {assistant}</s>

Later turns repeat the Instruction/Response blocks. Supervised: each response and the
tokenizer's eos. BOS is written only when the tokenizer adds one to plain text. Raw-text
examples: ``bos + text + eos``.
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
    system="{content}\n\n",
    user="### Instruction:\n{content}\n\n",
    assistant_open="### Response:\n",
    assistant_close="\n\n",
)


@attrs.frozen
class InstructionOptions:
    system_prompt: str | None = option(
        None,
        doc='preamble for conversations without a system message, e.g. "Below is an '
        "instruction that describes a task. Write a response that appropriately completes "
        'the request." (unset: none)',
    )


class InstructionFormatter:
    Options = InstructionOptions

    def __init__(self, options: InstructionOptions):
        self.options = options
        self.turns = TurnRenderer(LAYOUT, options.system_prompt)

    def end_of_turn(self, tokenizer: Any) -> str:
        eos = getattr(tokenizer, "eos_token", None)
        if not eos:
            raise DataError(
                "instruction ends responses with the tokenizer's eos token, but it has none",
                where="[format].plugin",
                fix="use a tokenizer with an eos token",
            )
        return eos

    def render(self, example: Example, tokenizer: Any) -> Rendered:
        eot = self.end_of_turn(tokenizer)
        return self.turns.render(example, eot, eot, tokenizer)

    def render_prompt(self, messages: Sequence[Message], tokenizer: Any) -> str:
        return self.turns.render_prompt(messages, self.end_of_turn(tokenizer), tokenizer)


@hookimpl
def lorakit_register_formatters(register):
    register("instruction", InstructionFormatter)
