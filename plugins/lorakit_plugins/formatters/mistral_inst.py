"""``mistral_inst``: the Mistral/Llama-2 instruction layout::

    <s>[INST] {system}\n\n{user} [/INST] {assistant}</s>[INST] {user} [/INST] {assistant}</s>

A system message is folded into the first user turn. Supervised: a space, the assistant reply
and the tokenizer's eos (the space belongs to the reply: it is the first thing the model
generates after ``[/INST]``, and most tokenizers merge it into the reply's first token). BOS is
written only when the tokenizer adds one to plain text. Raw-text examples: ``bos + text + eos``.
"""

from __future__ import annotations

import attrs
from lorakit.api import RegisterFormatter, hookimpl, option

from lorakit_plugins.formatters._turns import EosTurnFormatter, Layout

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


class MistralInstFormatter(EosTurnFormatter):
    Options = MistralInstOptions
    name = "mistral_inst"
    layout = LAYOUT
    no_eos_fix = 'use plugin = "chatml" or "chat_template"'


@hookimpl
def lorakit_register_formatters(register: RegisterFormatter) -> None:
    register("mistral_inst", MistralInstFormatter)
