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

import attrs
from lorakit.api import RegisterFormatter, hookimpl, option

from lorakit_plugins.formatters._turns import EosTurnFormatter, Layout

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


class InstructionFormatter(EosTurnFormatter):
    Options = InstructionOptions
    name = "instruction"
    layout = LAYOUT
    no_eos_fix = "use a tokenizer with an eos token"


@hookimpl
def lorakit_register_formatters(register: RegisterFormatter) -> None:
    register("instruction", InstructionFormatter)
