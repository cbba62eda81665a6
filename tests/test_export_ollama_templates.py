"""Ollama TEMPLATEs against the real models' chat templates (issue 25, item 5).

The templates are the chat templates of the models' ``tokenizer_config.json``
(Meta-Llama-3-8B-Instruct, Llama 3.1 and 3.2 Instruct, Gemma 1/2, Gemma 3, Phi-3-mini, Phi-3.5-mini,
Qwen2.5-Instruct), read from the installed trl package, which ships them byte-identical for its
own identity checks (``trl/chat_templates``), so this repository keeps no copies. Each is recognised by what it renders and
translated to a Go template; the Go template is then executed with Go's own ``text/template``
(what Ollama runs) and must give the text transformers renders as the generation prompt, on
conversations with and without a system turn, single and multi-turn. That test skips without
``go`` (Debian: ``apt-get install golang-go``).
"""

from __future__ import annotations

import importlib.resources
import json
import shutil
import subprocess
from pathlib import Path

import pytest

FIXTURES = Path(str(importlib.resources.files("trl") / "chat_templates"))

# fixture -> (bos, eos, family) as the models' tokenizers define them
MODELS = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", "llama3"),
    "gemma": ("<bos>", "<eos>", "gemma"),
    "gemma3": ("<bos>", "<eos>", "gemma"),
    "phi3": ("<s>", "<|endoftext|>", "phi3"),
    "phi3_5": ("<s>", "<|endoftext|>", "phi3"),
    "qwen2_5": ("", "<|im_end|>", "chatml"),
    "llama3_1": ("<|begin_of_text|>", "<|eot_id|>", "llama3_1"),
    "llama3_2": ("<|begin_of_text|>", "<|eot_id|>", "llama3_1"),
}
# Llama 3.2 writes the day it renders (strftime_now): pinned, as its template allows, so that a
# test crossing midnight cannot fail; Llama 3.1 renders its own default date, 26 Jul 2024.
CONTEXT = {"llama3_2": {"date_string": "05 Mar 2025"}}

CONVERSATIONS = [
    [("user", "What is 2 + 2?")],
    [("system", "You answer in French."), ("user", "Hello & <welcome>!")],
    [("user", "one"), ("assistant", "two"), ("user", 'say "three"\nthen {{ four }}')],
    [
        ("system", "Be brief.\nVery brief."),
        ("user", "Name a colour."),
        ("assistant", "Red."),
        ("user", "Another?"),
    ],
]


def _hf(template: str, bos: str, eos: str, conv, generation_prompt: bool = True, **context) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": r, "content": c} for r, c in conv]
    out, _ = render_jinja_template(
        conversations=[messages],
        chat_template=template,
        add_generation_prompt=generation_prompt,
        bos_token=bos,
        eos_token=eos,
        **context,
    )
    return out[0]


def _translate(name: str, add_bos: bool):
    from lorakit.export.modelfile import translate

    bos, eos, _ = MODELS[name]
    template = (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")
    context = CONTEXT.get(name, {})
    return translate(lambda c, g: _hf(template, bos, eos, c, g, **context), bos, eos, add_bos)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_chat_templates_are_recognised(name):
    translation = _translate(name, add_bos=False)
    assert translation.family == MODELS[name][2], translation.reason
    assert translation.template is not None
    if name == "qwen2_5":  # ChatML with a default system prompt, written as SYSTEM
        assert (
            translation.system
            == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        )
    if name.startswith("llama3_"):  # the date the template rendered, pinned
        date = CONTEXT.get(name, {}).get("date_string", "26 Jul 2024")
        assert f"Today Date: {date}\n" in translation.template
        assert ".Tools" not in translation.template  # no tool renderer given: tools ignored


def test_family_is_read_from_the_rendering_not_from_a_name():
    """A template that writes Llama 3 headers but drops the eot token is not Llama 3."""
    from lorakit.export.modelfile import translate

    template = (FIXTURES / "llama3.jinja").read_text().replace("+ '<|eot_id|>'", "")
    bos = "<|begin_of_text|>"
    translation = translate(lambda c, g: _hf(template, bos, "", c, g), bos, "", add_bos=False)
    assert translation.family is None and translation.template is None


GO_MAIN = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct{ Role, Content string }
type Case struct {
	Template string
	Messages []Message
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		t := template.Must(template.New("t").Parse(c.Template))
		var b strings.Builder
		if err := t.Execute(&b, map[string]any{"Messages": c.Messages}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def _go_render(tmp_path: Path, cases: list[dict], program: str = GO_MAIN) -> list[str]:
    """Each case's template executed by Go's text/template (``program`` reads them on stdin)."""
    main = tmp_path / "render.go"
    main.write_text(program, encoding="utf-8")
    done = subprocess.run(
        ["go", "run", str(main)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(done.stdout)


@pytest.mark.slow  # compiles a Go program
@pytest.mark.skipif(
    shutil.which("go") is None, reason="needs Go (Debian: apt-get install golang-go)"
)
def test_go_templates_render_like_the_real_chat_templates(tmp_path):
    cases, expected = [], []
    for name, (bos, eos, _family) in sorted(MODELS.items()):
        template = (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")
        for add_bos in (False, True):
            translation = _translate(name, add_bos)
            assert translation.template is not None
            for conv in CONVERSATIONS:
                try:
                    want = _hf(template, bos, eos, conv, **CONTEXT.get(name, {}))
                except Exception:  # Gemma 1/2 refuse a system turn: nothing to compare with
                    assert name == "gemma" and conv[0][0] == "system"
                    continue
                if translation.system is not None and conv[0][0] != "system":
                    conv = [("system", translation.system), *conv]  # Ollama adds SYSTEM
                if add_bos and bos and want.startswith(bos):
                    want = want[len(bos) :]  # llama.cpp adds the BOS token itself
                cases.append(
                    {
                        "Template": translation.template,
                        "Messages": [{"Role": r, "Content": c} for r, c in conv],
                    }
                )
                expected.append((name, add_bos, conv, want))
    assert len(cases) >= 56
    for got, (name, add_bos, conv, want) in zip(_go_render(tmp_path, cases), expected, strict=True):
        assert got == want, (name, add_bos, conv)


# --------------------------------------------------------------------------- tools

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather & wind <now> in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "e.g. Zürich"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                "required": ["a", "b"],
            },
        },
    },
]


def _call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_CONVERSATIONS = [
    [{"role": "user", "content": "Weather in Paris?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 2?"}],
    [
        {"role": "user", "content": "Weather in Zürich & Bern?"},
        {
            "role": "assistant",
            "content": "Checking <both>.",
            "tool_calls": [
                _call("get_weather", city="Zürich", unit="c"),
                _call("get_weather", city="Bern"),
            ],
        },
        {"role": "tool", "content": '{"temp": 21, "sky": "clear & dry"}'},
        {"role": "tool", "content": '{"temp": 19}'},
    ],
    [
        {"role": "system", "content": "Use tools.\nAlways."},
        {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("add", a=2, b=3)]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "5."},
        {"role": "user", "content": 'And "4 + 4"?'},
    ],
]


def _hf_tools(template: str, messages, tools) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    out, _ = render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=template,
        add_generation_prompt=True,
        bos_token="",
        eos_token="<|im_end|>",
    )
    return out[0]


def _translate_with_tools(template: str):
    from lorakit.export.modelfile import translate

    return translate(
        lambda c, g: _hf(template, "", "<|im_end|>", c, g),
        "",
        "<|im_end|>",
        False,
        lambda m, t: _hf_tools(template, m, t),
    )


def test_qwen_tool_template_is_recognised_and_plain_chatml_is_not_taken_for_it():
    from helpers import CHATML

    qwen = _translate_with_tools((FIXTURES / "qwen2_5.jinja").read_text(encoding="utf-8"))
    assert qwen.family == "chatml_tools" and ".Tools" in qwen.template and qwen.system
    plain = _translate_with_tools(CHATML)  # ChatML that ignores tools: the plain template
    assert plain.family == "chatml" and ".Tools" not in plain.template
    # a Qwen template whose tool results are not grouped in one user turn is not Qwen's
    changed = (FIXTURES / "qwen2_5.jinja").read_text().replace("<tool_response>", "<result>")
    assert _translate_with_tools(changed).family == "chatml"


def _canonical_json(text: str) -> str:
    """Each JSON object and string in ``text`` rewritten canonically (sorted keys, Python's
    spacing and escapes): the one thing Ollama writes differently (Go's compact encoding/json,
    ``&`` as ``\\u0026``) from Jinja's ``tojson`` (indented or spaced)."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i] in '{"':
            try:
                value, end = decoder.raw_decode(text, i)
            except ValueError:
                value, end = None, i
            if end > i:
                out.append(json.dumps(value, sort_keys=True, ensure_ascii=False))
                i = end
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


GO_TOOLS_MAIN = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

// Ollama's api types as its templates see them: tool functions and call arguments print as
// JSON (encoding/json), messages carry ToolCalls.
type Args map[string]any

func (a Args) String() string { b, _ := json.Marshal(a); return string(b) }

type CallFunction struct {
	Name      string `json:"name"`
	Arguments Args   `json:"arguments"`
}
type ToolCall struct {
	Function CallFunction `json:"function"`
}
type Message struct {
	Role, Content string
	ToolCalls     []ToolCall
}
type ToolFunction struct {
	Name        string          `json:"name"`
	Description string          `json:"description"`
	Parameters  json.RawMessage `json:"parameters"`
}

func (f ToolFunction) String() string { b, _ := json.Marshal(f); return string(b) }

type Tool struct {
	Type     string       `json:"type"`
	Function ToolFunction `json:"function"`
}
type Case struct {
	Template string
	Messages []Message
	Tools    []Tool
}

// Ollama's template function json (template/template.go)
var funcs = template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		t := template.Must(template.New("t").Funcs(funcs).Parse(c.Template))
		var b strings.Builder
		if err := t.Execute(&b, map[string]any{"Messages": c.Messages, "Tools": c.Tools}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def _go_tools_render(tmp_path: Path, cases: list[dict]) -> list[str]:
    return _go_render(tmp_path, cases, GO_TOOLS_MAIN)


def _go_messages(conv) -> list[dict]:
    """Messages as Ollama's api.Message (role, content, tool calls) for the Go program."""
    return [
        {
            "Role": m["role"],
            "Content": m["content"],
            "ToolCalls": [{"function": c["function"]} for c in m.get("tool_calls", [])],
        }
        for m in conv
    ]


@pytest.mark.slow  # compiles a Go program
@pytest.mark.skipif(
    shutil.which("go") is None, reason="needs Go (Debian: apt-get install golang-go)"
)
def test_go_tool_template_renders_like_qwen_chat_template(tmp_path):
    template = (FIXTURES / "qwen2_5.jinja").read_text(encoding="utf-8")
    translation = _translate_with_tools(template)
    assert translation.family == "chatml_tools"
    cases, expected = [], []
    for conv in TOOL_CONVERSATIONS:
        for tools in (TOOLS, None):
            want = _hf_tools(template, conv, tools)
            if conv[0]["role"] != "system":  # Ollama sends the Modelfile's SYSTEM first
                conv = [{"role": "system", "content": translation.system}, *conv]
            messages = _go_messages(conv)
            cases.append({"Template": translation.template, "Messages": messages, "Tools": tools})
            expected.append((conv, tools, want))
    rendered = _go_tools_render(tmp_path, cases)
    with_json = 0
    for got, (conv, tools, want) in zip(rendered, expected, strict=True):
        assert _canonical_json(got) == _canonical_json(want), conv
        if tools is None and not any(m.get("tool_calls") for m in conv):
            assert got == want, conv  # no JSON from Ollama: byte-identical
        else:
            assert "<tool" in want
            with_json += 1
            assert got != want  # Go's compact JSON: the documented difference
    assert with_json == len(TOOL_CONVERSATIONS) + 2  # each with tools, two with calls without


# --------------------------------------------------------------------------- Llama 3.1+ tools

LLAMA = ("<|begin_of_text|>", "<|eot_id|>")


def _hf_llama(template: str, messages, tools, generation_prompt=True, **context) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    out, _ = render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=template,
        add_generation_prompt=generation_prompt,
        bos_token=LLAMA[0],
        eos_token=LLAMA[1],
        **context,
    )
    return out[0]


def _translate_llama(template: str, add_bos: bool = False, **context):
    from lorakit.export.modelfile import translate

    def plain(conv, generation_prompt):
        messages = [{"role": r, "content": c} for r, c in conv]
        return _hf_llama(template, messages, None, generation_prompt, **context)

    return translate(
        plain, *LLAMA, add_bos, lambda m, t: _hf_llama(template, m, t, True, **context)
    )


@pytest.mark.parametrize("name", ["llama3_1", "llama3_2"])
def test_llama31_tool_template_is_recognised_and_changed_ones_are_not(name):
    template = (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")
    pinned = _translate_llama(template, date_string="05 Mar 2025")
    assert pinned.family == "llama3_1_tools" and ".Tools" in pinned.template
    assert "Today Date: 05 Mar 2025\n" in pinned.template and pinned.system is None
    # tool results in "tool" turns, not "ipython": the dated header, but not Llama 3.1's tools
    ipython = '"<|start_header_id|>ipython<|end_header_id|>\\n\\n"'
    changed = template.replace(ipython, '"<|start_header_id|>tool<|end_header_id|>\\n\\n"')
    assert changed != template
    assert _translate_llama(changed, date_string="05 Mar 2025").family == "llama3_1"
    # no dated header: not Llama 3.1 at all (and not Llama 3: the system header is always there)
    undated = template.replace('{{- "Today Date: " + date_string + "\\n\\n" }}', "")
    assert undated != template
    assert _translate_llama(undated, date_string="05 Mar 2025").template is None


def test_llama31_date_is_the_one_the_template_renders():
    """3.1 writes its default date; 3.2 the day it renders (the Modelfile pins it)."""
    from datetime import datetime

    llama31 = _translate_llama((FIXTURES / "llama3_1.jinja").read_text(encoding="utf-8"))
    assert "Today Date: 26 Jul 2024\n" in llama31.template
    before = datetime.now().strftime("%d %b %Y")
    llama32 = _translate_llama((FIXTURES / "llama3_2.jinja").read_text(encoding="utf-8"))
    days = {before, datetime.now().strftime("%d %b %Y")}  # midnight may pass in between
    assert llama32.family == "llama3_1_tools"
    assert any(f"Today Date: {day}\n" in llama32.template for day in days)


LLAMA_TOOL_CONVERSATIONS = [
    [{"role": "user", "content": "Weather in Paris?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 2?"}],
    [  # the tools stay in the first user turn; text beside a call is dropped by the template
        {"role": "user", "content": "Weather in Zürich & Bern?"},
        {
            "role": "assistant",
            "content": "Checking <Zürich>.",
            "tool_calls": [_call("get_weather", city="Zürich", unit="c")],
        },
        {"role": "tool", "content": '{"temp": 21, "sky": "clear & dry"}'},
        {"role": "assistant", "content": "21 °C in Zürich."},
        {"role": "user", "content": "And Bern?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", city="Bern")]},
        {"role": "ipython", "content": "19 <C>"},
    ],
    [
        {"role": "system", "content": "Use tools.\nAlways."},
        {"role": "user", "content": "2 + 3?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("add", a=2, b=3)]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "5."},
        {"role": "user", "content": 'And "4 + 4"?'},
    ],
]


@pytest.mark.slow  # compiles a Go program
@pytest.mark.skipif(
    shutil.which("go") is None, reason="needs Go (Debian: apt-get install golang-go)"
)
def test_go_tool_template_renders_like_llama31_chat_templates(tmp_path):
    cases, expected = [], []
    for name in ("llama3_1", "llama3_2"):
        template = (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")
        context = CONTEXT.get(name, {})
        for add_bos in (False, True):
            translation = _translate_llama(template, add_bos, **context)
            assert translation.family == "llama3_1_tools", name
            for conv in LLAMA_TOOL_CONVERSATIONS:
                for tools in (TOOLS, None):
                    want = _hf_llama(template, conv, tools, **context)
                    if add_bos:
                        want = want.removeprefix(LLAMA[0])  # llama.cpp adds the BOS itself
                    messages = _go_messages(conv)
                    cases.append(
                        {"Template": translation.template, "Messages": messages, "Tools": tools}
                    )
                    expected.append((name, add_bos, conv, tools, want))
    assert len(cases) == 2 * 2 * len(LLAMA_TOOL_CONVERSATIONS) * 2
    with_json = 0
    for got, (name, add_bos, conv, tools, want) in zip(
        _go_tools_render(tmp_path, cases), expected, strict=True
    ):
        assert _canonical_json(got) == _canonical_json(want), (name, add_bos, conv, tools)
        if tools is None and all(m["role"] in ("system", "user") for m in conv):
            assert got == want, (name, conv)  # no JSON from Ollama: byte-identical
        else:  # tools, a call's arguments or a result: Go's compact JSON, the one difference
            assert got != want, (name, conv, tools)
            with_json += 1
    assert with_json == 2 * 2 * (len(LLAMA_TOOL_CONVERSATIONS) + 2)
