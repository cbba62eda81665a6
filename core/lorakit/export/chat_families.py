"""Chat template families beyond ChatML and ``[INST]``: a reference renderer and a Go template each.

``modelfile.translate`` picks a family only when the run's own chat template renders every probe
conversation exactly like the family's reference renderer here (the family is recognised from
the template's output and the tokenizer's special tokens, never from a plugin or model name).
The Go templates are what Ollama executes; ``tests/test_export_ollama_templates.py`` renders
them with Go's ``text/template`` against the real models' Jinja templates.

- ``llama3``: Llama 3 / 3.0 Instruct (``<|start_header_id|>role<|end_header_id|>``, ``<|eot_id|>``)
- ``gemma``: Gemma 1/2 (system role refused) and Gemma 3 (system folded into the first user turn)
- ``phi3``: Phi-3 / Phi-3.5 (``<|user|>``, ``<|end|>``; eos after a full conversation)

Jinja's ``| trim`` (Llama 3, Gemma) has no Go counterpart: Ollama sends message text as given,
so text with leading or trailing whitespace renders differently there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

Conversation = Sequence[tuple[str, str]]
Render = Callable[[Conversation, bool], str]


class Refused(ValueError):
    """The family's template refuses this conversation (e.g. a system turn for Gemma 2)."""


@attrs.frozen
class Family:
    name: str
    # (bos text, eos text) -> one reference renderer per variant of the family
    variants: Callable[[str, str], list[Render]]
    go: str  # Go template; "{BOS}" is replaced by the BOS text, or "" when llama.cpp adds it


def _llama3(bos: str, eos: str) -> list[Render]:
    def render(conv: Conversation, generation_prompt: bool) -> str:
        text = bos + "".join(
            f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"
            for role, content in conv
        )
        return text + (
            "<|start_header_id|>assistant<|end_header_id|>\n\n" if generation_prompt else ""
        )

    return [render]


LLAMA3_GO = """{BOS}
{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""


def _gemma_variant(bos: str, fold_system: bool) -> Render:
    def render(conv: Conversation, generation_prompt: bool) -> str:
        turns, prefix = list(conv), ""
        if turns and turns[0][0] == "system":
            if not fold_system:
                raise Refused("System role not supported")
            prefix = turns.pop(0)[1] + "\n\n"
        text = bos
        for i, (role, content) in enumerate(turns):
            if (role == "user") != (i % 2 == 0):
                raise Refused("Conversation roles must alternate")
            name = "model" if role == "assistant" else role
            text += (
                f"<start_of_turn>{name}\n{prefix if i == 0 else ''}{content.strip()}<end_of_turn>\n"
            )
        return text + ("<start_of_turn>model\n" if generation_prompt else "")

    return render


def _gemma(bos: str, eos: str) -> list[Render]:
    return [_gemma_variant(bos, False), _gemma_variant(bos, True)]


# A system message goes before the first user turn's text, as Gemma 3's template does (Gemma
# 1/2 refuse one: there this only matters for chats sent with a system prompt).
GEMMA_GO = """{BOS}
{{- $system := "" }}
{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}
{{- $first := true }}
{{- range .Messages }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if and $first $system }}{{ $system }}

{{ end }}{{ .Content }}<end_of_turn>
{{ $first = false }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
"""


def _phi3(bos: str, eos: str) -> list[Render]:
    def render(conv: Conversation, generation_prompt: bool) -> str:
        text = "".join(f"<|{role}|>\n{content}<|end|>\n" for role, content in conv)
        return text + ("<|assistant|>\n" if generation_prompt else eos)

    return [render]


PHI3_GO = """{BOS}
{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}<|assistant|>
"""

FAMILIES = (
    Family("llama3", _llama3, LLAMA3_GO),
    Family("gemma", _gemma, GEMMA_GO),
    Family("phi3", _phi3, PHI3_GO),
)


def go_template(family: Family, bos: str) -> str:
    """The family's Go template, starting with ``bos`` (pass "" when llama.cpp adds the BOS)."""
    return family.go.replace("{BOS}", bos)
