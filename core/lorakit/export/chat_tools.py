"""ChatML with tools (Qwen 2.5 style): a reference renderer and the Go template Ollama runs.

Qwen 2.5's chat template lists the tools in the system turn (``<tools>`` with one JSON per
line), writes an assistant's tool calls as ``<tool_call>`` JSON, and groups consecutive tool
results into one user turn of ``<tool_response>`` blocks. ``modelfile.translate`` writes this
Go template instead of plain ChatML only when the run's template renders the tool probes below
exactly like ``render`` here (recognised by its output, never by a model name).

The Go template reads what Ollama passes: ``.Tools`` (each ``.Function`` printed as JSON),
``.Messages`` with ``.ToolCalls`` (``.Function.Name``, ``.Function.Arguments`` printed as
JSON). Ollama prints JSON with Go's ``encoding/json``: compact, keys of maps sorted (in the
order given since Ollama's ordered maps, January 2026), ``<``, ``>`` and ``&`` escaped as
``\\u003c``...; the Jinja template's ``tojson`` writes Python's
``json.dumps`` (``", "``, ``": "``, keys in the order given). So the JSON in Ollama's prompt is
the same JSON value written differently; everything around it renders byte-identically
(``tests/test_export_ollama_templates.py`` checks both with Go's ``text/template``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

# (messages as chat templates take them, tools) -> the generation prompt
RenderTools = Callable[[list[dict[str, Any]], list[dict[str, Any]]], str]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]

_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}

PROBES: tuple[list[dict[str, Any]], ...] = (
    [{"role": "user", "content": "Weather in Paris?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [_CALL]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"wind": 3}'},
        {"role": "assistant", "content": "21 degrees."},
        {"role": "user", "content": "Thanks"},
    ],
)


def render(messages: Sequence[dict[str, Any]], tools: Sequence[Any], default_system: str) -> str:
    """Qwen 2.5's generation prompt with ``tools`` (JSON as Jinja's ``tojson`` writes it)."""
    msgs = list(messages)
    system = default_system
    if msgs and msgs[0]["role"] == "system":
        system = msgs[0]["content"]
    head = (
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    )
    text = f"<|im_start|>system\n{system}{head}"
    text += "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
    text += (
        "\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    )
    prev = ""
    for i, m in enumerate(msgs):
        role = m["role"]
        if prev == "tool" and role != "tool":
            text += "<|im_end|>\n"
        if i == 0 and role == "system":
            pass
        elif role == "tool":
            text += ("<|im_start|>user" if prev != "tool" else "") + (
                f"\n<tool_response>\n{m['content']}\n</tool_response>"
            )
        elif role == "assistant" and m.get("tool_calls"):
            text += "<|im_start|>assistant" + (f"\n{m['content']}" if m["content"] else "")
            for call in m["tool_calls"]:
                fn = call["function"]
                args = json.dumps(fn["arguments"], ensure_ascii=False)
                text += (
                    f'\n<tool_call>\n{{"name": "{fn["name"]}", "arguments": {args}}}\n</tool_call>'
                )
            text += "<|im_end|>\n"
        else:
            text += f"<|im_start|>{role}\n{m['content']}<|im_end|>\n"
        prev = role
    if prev == "tool":
        text += "<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


def renders_like_qwen(render_tools: RenderTools, default_system: str | None) -> bool:
    """Whether the run's template renders every tool probe exactly like Qwen 2.5's."""
    for messages in PROBES:
        try:
            got = render_tools(messages, TOOLS)
        except Exception:  # the template refuses tools or the tool role
            return False
        if got != render(messages, TOOLS, default_system or ""):
            return False
    return True


def go_template(default_system: str | None) -> str:
    """The Go template; ``default_system`` is what the Jinja template writes without a system
    turn (Ollama sends the Modelfile's SYSTEM as one anyway)."""
    return QWEN_TOOLS_GO.replace("{SYSTEM}", json.dumps(default_system or "", ensure_ascii=False))


QWEN_TOOLS_GO = """{{- $system := {SYSTEM} }}
{{- if and .Messages (eq (index .Messages 0).Role "system") }}{{ $system = (index .Messages 0).Content }}{{ end }}
{{- if .Tools }}<|im_start|>system
{{ $system }}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{{ else }}<|im_start|>system
{{ $system }}<|im_end|>
{{ end }}
{{- $prev := "" }}
{{- range $i, $m := .Messages }}
{{- if and (ne .Role "tool") (eq $prev "tool") }}<|im_end|>
{{ end }}
{{- if and (eq $i 0) (eq .Role "system") }}
{{- else if eq .Role "tool" }}{{ if ne $prev "tool" }}<|im_start|>user{{ end }}
<tool_response>
{{ .Content }}
</tool_response>
{{- else if and (eq .Role "assistant") .ToolCalls }}<|im_start|>assistant
{{- if .Content }}
{{ .Content }}{{ end }}
{{- range .ToolCalls }}
<tool_call>
{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
</tool_call>
{{- end }}<|im_end|>
{{ else }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- $prev = .Role }}
{{- end }}
{{- if eq $prev "tool" }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
