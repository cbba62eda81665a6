"""An Ollama ``Modelfile`` for an exported GGUF: FROM, TEMPLATE, SYSTEM, PARAMETER stop.

Ollama templates are Go templates, not Jinja, so the run's chat template has to be translated.
lorakit does not parse Jinja: it recognises a template by what it renders. Each known family
(ChatML, Mistral ``[INST]`` here; Llama 3, Gemma, Phi-3 in ``chat_families``; Llama 3.1+ in
``chat_llama31``; with tools: Qwen 2.5 in ``chat_tools``, Llama 3.1+) has a reference renderer and
a Go template; a family is chosen only when the run's template renders every probe conversation exactly like the
reference. Anything else gets no TEMPLATE line and a comment saying so, never a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from lorakit.export import chat_llama31, chat_tools
from lorakit.export.chat_families import FAMILIES, Conversation, Refused, Render, go_template

_PROBES: tuple[Conversation, ...] = (
    (("user", "Hi there"),),
    (("user", "Hi there"), ("assistant", "Hello!")),
    (("system", "Be brief."), ("user", "2 + 2 ="), ("assistant", "4"), ("user", "and 3 + 3?")),
    (("user", "one"), ("assistant", "two"), ("user", "three")),
)

CHATML_GO = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

# The system message (if any) is folded into the first user turn, as Mistral's templates do.
MISTRAL_GO = """{{- $system := "" }}
{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}
{{- $first := true }}{BOS}
{{- range .Messages }}
{{- if eq .Role "user" }}{LEAD}[INST] {{ if and $first $system }}{{ $system }}

{{ end }}{{ .Content }} [/INST]{{ $first = false }}
{{- else if eq .Role "assistant" }} {{ .Content }}{EOS}
{{- end }}
{{- end }}"""


@attrs.frozen
class Translation:
    family: str | None  # "chatml(_tools)", "mistral_inst", "llama3_1(_tools)", a chat_families name
    template: str | None  # the Go template
    system: str | None  # a default system prompt the Jinja template inserts
    reason: str = ""  # why there is no template


def _chatml(default_system: str | None) -> Render:
    def render(conv: Conversation, generation_prompt: bool) -> str:
        turns = list(conv)
        if default_system is not None and (not turns or turns[0][0] != "system"):
            turns.insert(0, ("system", default_system))
        text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
        return text + ("<|im_start|>assistant\n" if generation_prompt else "")

    return render


def _mistral(bos: str, eos: str, lead: str = "") -> Render:
    """``lead``: what comes before each ``[INST]`` (Mistral 7B v0.2's template writes a space)."""

    def render(conv: Conversation, generation_prompt: bool) -> str:
        system = next((c for r, c in conv if r == "system"), None)
        text, first = bos, True
        for role, content in conv:
            if role == "user":
                system_lead = f"{system}\n\n" if first and system else ""
                text += f"{lead}[INST] {system_lead}{content} [/INST]"
                first = False
            elif role == "assistant":
                text += f" {content}{eos}"
        return text

    return render


def _default_system(render_jinja: Render) -> str | None:
    """The system prompt a ChatML template adds to conversations that have none, if any."""
    text = render_jinja((("user", "Hi there"),), False)
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>\n" in text:
        return text[len(head) : text.index("<|im_end|>\n")]
    return None


def _matches(render_jinja: Render, reference: Render) -> bool:
    """Every probe renders the same, or is refused by both (Gemma 2 refuses a system turn)."""
    refusals = checks = 0
    for conv in _PROBES:
        for generation_prompt in (False, True):
            if conv[-1][0] == "assistant" and generation_prompt:
                continue
            checks += 1
            try:
                want = reference(conv, generation_prompt)
            except Refused:
                want = None
                refusals += 1
            try:
                got = render_jinja(conv, generation_prompt)
            except Exception:  # the template rejects a probe (roles, alternation)
                got = None
            if got != want:
                return False
    return refusals < checks  # a family that refuses every probe proves nothing


def translate(
    render_jinja: Render,
    bos: str,
    eos: str,
    add_bos: bool,
    render_tools: chat_tools.RenderTools | None = None,
) -> Translation:
    """Recognise the template behind ``render_jinja`` (conversation, generation prompt -> text).

    ``bos``/``eos`` are the tokenizer's special token texts; ``add_bos`` whether llama.cpp adds
    BOS itself (then the Go template must not write it again); ``render_tools`` renders
    conversations with tools (Qwen 2.5's and Llama 3.1's tool prompts are recognised with it)."""
    system = _default_system(render_jinja)
    if _matches(render_jinja, _chatml(system)):
        if system is not None and '"""' in system:
            return Translation(None, None, None, 'its default system prompt contains """')
        if render_tools is not None and chat_tools.renders_like_qwen(render_tools, system):
            return Translation("chatml_tools", chat_tools.go_template(system), system)
        return Translation("chatml", CHATML_GO, system)
    for start in (bos, ""):
        for lead in ("", " "):
            if _matches(render_jinja, _mistral(start, eos, lead)):
                go = MISTRAL_GO.replace("{EOS}", eos).replace("{BOS}", "" if add_bos else start)
                return Translation("mistral_inst", go.replace("{LEAD}", lead), None)
    for family in FAMILIES:
        for start in ("", bos):  # without a BOS first: Phi-3's template writes none
            if any(_matches(render_jinja, ref) for ref in family.variants(start, eos)):
                return Translation(family.name, go_template(family, "" if add_bos else start), None)
    date = chat_llama31.read_date(render_jinja)  # Llama 3.1+: the dated system header
    for start in (bos, ""):
        if date is not None and _matches(render_jinja, chat_llama31.plain(start, date)):
            tools = render_tools is not None and chat_llama31.renders_tools_like_llama31(
                render_tools, start, date
            )
            go = chat_llama31.go_template("" if add_bos else start, date, tools)
            return Translation("llama3_1_tools" if tools else "llama3_1", go, None)
    return Translation(
        None,
        None,
        None,
        "it renders none of ChatML, Mistral [INST], Llama 3, Llama 3.1, Gemma or Phi-3"
        " conversations exactly",
    )


def jinja_renderer(tokenizer: Any) -> Render:
    """Render with ``tokenizer``'s own chat template (transformers' Jinja sandbox)."""

    def render(conv: Conversation, generation_prompt: bool) -> str:
        messages = [{"role": r, "content": c} for r, c in conv]
        return str(
            tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        )

    return render


def jinja_tools_renderer(tokenizer: Any) -> chat_tools.RenderTools:
    """The generation prompt of messages with tools, by ``tokenizer``'s own chat template."""

    def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
        return str(
            tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True
            )
        )

    return render


def _comment(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in text.splitlines()]


def render_modelfile(
    *,
    gguf_file: str,
    translation: Translation,
    stop_tokens: Sequence[str],
    chat_template: str | None,
    header: str,
    others: Sequence[str] = (),
    adapter: str | None = None,
) -> str:
    """The Modelfile text; ``others`` are sibling GGUF files (other types) to mention,
    ``adapter`` a LoRA GGUF that Ollama applies on top of ``gguf_file`` (a base-only export)."""
    lines = [*_comment(header), "", f"FROM ./{gguf_file}"]
    if others:
        lines.append(f"# other types in this folder: {', '.join(others)} (change FROM to use one)")
    if adapter is not None:
        lines += [
            "# the run's LoRA adapter, applied by Ollama on top of the base above",
            f"ADAPTER ./{adapter}",
        ]
    if translation.template is not None:
        lines += ["", f"# TEMPLATE: the run's chat template ({translation.family}), in Go syntax"]
        lines.append(f'TEMPLATE """{translation.template}"""')
        if translation.system is not None:
            lines += [
                "# the chat template's default system prompt (Ollama adds it when a chat has none)"
            ]
            lines.append(f'SYSTEM """{translation.system}"""')
    else:
        lines += [
            "",
            "# TEMPLATE: NOT WRITTEN. lorakit could not translate the run's chat template to Ollama's",
            f"# Go template syntax ({translation.reason}). Without a TEMPLATE Ollama sends prompts",
            "# unformatted and the model will not answer as trained: write one by hand from the",
            "# chat template below (it is also in the GGUF's tokenizer.chat_template).",
            *_comment(chat_template or "(the run has no chat template)"),
        ]
    lines.append("")
    for token in stop_tokens:
        lines.append(f"PARAMETER stop {_quote(token)}")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
