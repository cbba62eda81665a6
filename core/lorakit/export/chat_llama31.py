"""Llama 3.1+ chat templates (Meta's 3.1 and 3.2): a reference renderer and the Go templates.

These templates always open with a dated system header (``Cutting Knowledge Date`` and
``Today Date``, then the system message, empty when there is none), so they never render like
plain Llama 3. With tools they add ``Environment: ipython`` to that header and put the tools,
each as JSON indented by 4, with a calling instruction into the first turn after the system
message; an assistant's tool call is one JSON object ``{"name": ..., "parameters": ...}``
(exactly one call per turn, the template refuses more and drops the turn's text), and a tool
result is an ``ipython`` turn holding the result through ``tojson`` (a string result is
therefore written as a JSON string, quoted).

``modelfile.translate`` recognises the family by what the run's template renders, never by a
name: the date is read from one rendering (3.1 writes its default ``26 Jul 2024`` unless
``date_string`` is given; 3.2 writes the day it renders, through ``strftime_now``), then every
plain probe must render exactly like ``render`` here with that date, and, for the tool
template, every tool probe too. The Go templates pin that date: Ollama has no date function
that writes ``26 Jul 2024``.

The Go template reads Ollama's ``.Tools`` (each printed with Ollama's ``json`` function),
``.Messages`` and ``.ToolCalls``. Ollama's ``json`` is Go's ``encoding/json``: compact, ``<``,
``>``, ``&`` escaped as ``\\u003c``...; Jinja's ``tojson`` writes Python's ``json.dumps``
(indented tools, ``", "`` and ``": "``). So the tools, call arguments and tool results are the
same JSON values written differently; all other text renders byte-identically
(``tests/test_export_ollama_templates.py`` checks both with Go's ``text/template``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from lorakit.export.chat_families import Conversation, Refused, Render
from lorakit.export.chat_tools import PROBES, TOOLS, RenderTools

_CALL_PROMPT = (
    "Given the following functions, please respond with a JSON for a function call "
    "with its proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name '
    "and its value}.Do not use variables.\n\n"
)

# what a date may hold to be pinned in a Go template (and a Modelfile's """ quoting) as text
_DATE = re.compile(r"\nToday Date: ([0-9A-Za-z ,./:-]{1,40})\n")


def _head(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def render(
    messages: Sequence[dict[str, Any]],
    tools: Sequence[Any] | None,
    bos: str,
    date: str,
    generation_prompt: bool = True,
) -> str:
    """Meta's Llama 3.1 template (tools in the first user turn, the default) on ``messages``."""
    msgs = list(messages)
    system = ""
    if msgs and msgs[0]["role"] == "system":
        system = msgs.pop(0)["content"].strip()
    text = bos + _head("system") + ("Environment: ipython\n" if tools is not None else "")
    text += f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n{system}<|eot_id|>"
    if tools is not None:
        if not msgs:
            raise Refused("no first user message to put the tools in")
        first = msgs.pop(0)["content"].strip()
        listed = "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in tools)
        text += _head("user") + _CALL_PROMPT + listed + first + "<|eot_id|>"
    for m in msgs:
        role = m["role"]
        if role not in ("tool", "ipython") and "tool_calls" not in m:
            text += _head(role) + m["content"].strip() + "<|eot_id|>"
        elif "tool_calls" in m:
            if len(m["tool_calls"]) != 1:
                raise Refused("This model only supports single tool-calls at once!")
            fn = m["tool_calls"][0]["function"]
            args = json.dumps(fn["arguments"], ensure_ascii=False)
            text += _head("assistant") + f'{{"name": "{fn["name"]}", "parameters": {args}}}'
            text += "<|eot_id|>"
        else:
            text += _head("ipython") + json.dumps(m["content"], ensure_ascii=False) + "<|eot_id|>"
    return text + (_head("assistant") if generation_prompt else "")


def read_date(render_jinja: Render) -> str | None:
    """The ``Today Date`` the run's template writes, if it writes one that can be pinned."""
    try:
        found = _DATE.search(render_jinja((("user", "Hi there"),), False))
    except Exception:  # the template refuses the probe: not this family
        return None
    return found.group(1) if found else None


def plain(bos: str, date: str) -> Render:
    """The reference for conversations without tools (``modelfile``'s probes)."""

    def render_conv(conv: Conversation, generation_prompt: bool) -> str:
        messages = [{"role": r, "content": c} for r, c in conv]
        return render(messages, None, bos, date, generation_prompt)

    return render_conv


def renders_tools_like_llama31(render_tools: RenderTools, bos: str, date: str) -> bool:
    """Whether the run's template renders every tool probe exactly like Llama 3.1's."""
    for messages in PROBES:
        try:
            got = render_tools(messages, TOOLS)
        except Exception:  # the template refuses tools or the tool role
            return False
        if got != render(messages, TOOLS, bos, date):
            return False
    return True


def go_template(bos: str, date: str, tools: bool) -> str:
    """The Go template starting with ``bos`` ("" when llama.cpp adds it) and the pinned
    ``date``; ``tools``: with the tool prompt, calls and results (else tools are ignored)."""
    go = LLAMA31_TOOLS_GO if tools else LLAMA31_GO
    return go.replace("{BOS}", bos).replace("{DATE}", date)


# The system message is the first message's, when it is one (as in the Jinja template; Ollama
# also sends the Modelfile's SYSTEM as a first system message).
_SYSTEM = """{BOS}
{{- $system := "" }}
{{- $rest := .Messages }}
{{- if and .Messages (eq (index .Messages 0).Role "system") }}
{{- $system = (index .Messages 0).Content }}{{ $rest = slice .Messages 1 }}
{{- end }}"""

LLAMA31_GO = (
    _SYSTEM
    + """<|start_header_id|>system<|end_header_id|>

Cutting Knowledge Date: December 2023
Today Date: {DATE}

{{ $system }}<|eot_id|>
{{- range $rest }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""
)

# Tools go into the first message after the system message, under a user header, as the Jinja
# template does (not into the last user turn, as Ollama's own llama3.1 template does). The Jinja
# template refuses an assistant turn with several calls; this one writes the first.
LLAMA31_TOOLS_GO = (
    _SYSTEM
    + """<|start_header_id|>system<|end_header_id|>

{{ if .Tools }}Environment: ipython
{{ end }}Cutting Knowledge Date: December 2023
Today Date: {DATE}

{{ $system }}<|eot_id|>
{{- range $i, $m := $rest }}
{{- if and (eq $i 0) $.Tools }}<|start_header_id|>user<|end_header_id|>

"""
    + _CALL_PROMPT
    + """{{ range $.Tools }}{{ json . }}

{{ end }}{{ $m.Content }}<|eot_id|>
{{- else if or (eq .Role "tool") (eq .Role "ipython") }}<|start_header_id|>ipython<|end_header_id|>

{{ json .Content }}<|eot_id|>
{{- else if .ToolCalls }}<|start_header_id|>assistant<|end_header_id|>

{{ with index .ToolCalls 0 }}{"name": "{{ .Function.Name }}", "parameters": {{ json .Function.Arguments }}}{{ end }}<|eot_id|>
{{- else }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""
)
