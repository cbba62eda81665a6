"""Ollama TEMPLATEs against the real models' chat templates (issue 25, item 5).

``fixtures/chat_templates/*.jinja`` are the chat templates of the models' ``tokenizer_config.json``
(Meta-Llama-3-8B-Instruct, Gemma 1/2, Gemma 3, Phi-3-mini, Phi-3.5-mini, Qwen2.5-Instruct), as
trl stores them byte-identical for identity checks. Each is recognised by what it renders and
translated to a Go template; the Go template is then executed with Go's own ``text/template``
(what Ollama runs) and must give the text transformers renders as the generation prompt, on
conversations with and without a system turn, single and multi-turn. That test skips without
``go`` (Debian: ``apt-get install golang-go``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"

# fixture -> (bos, eos, family) as the models' tokenizers define them
MODELS = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", "llama3"),
    "gemma": ("<bos>", "<eos>", "gemma"),
    "gemma3": ("<bos>", "<eos>", "gemma"),
    "phi3": ("<s>", "<|endoftext|>", "phi3"),
    "phi3_5": ("<s>", "<|endoftext|>", "phi3"),
    "qwen2_5": ("", "<|im_end|>", "chatml"),
}

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


def _hf(template: str, bos: str, eos: str, conv, generation_prompt: bool = True) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": r, "content": c} for r, c in conv]
    out, _ = render_jinja_template(
        conversations=[messages],
        chat_template=template,
        add_generation_prompt=generation_prompt,
        bos_token=bos,
        eos_token=eos,
    )
    return out[0]


def _translate(name: str, add_bos: bool):
    from lorakit.export.modelfile import translate

    bos, eos, _ = MODELS[name]
    template = (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")
    return translate(lambda c, g: _hf(template, bos, eos, c, g), bos, eos, add_bos)


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


def _go_render(tmp_path: Path, cases: list[dict]) -> list[str]:
    main = tmp_path / "render.go"
    main.write_text(GO_MAIN, encoding="utf-8")
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
                    want = _hf(template, bos, eos, conv)
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
    assert len(cases) >= 40
    for got, (name, add_bos, conv, want) in zip(_go_render(tmp_path, cases), expected, strict=True):
        assert got == want, (name, add_bos, conv)
