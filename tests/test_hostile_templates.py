"""A model's chat template is code from the model's author: one that does not parse, calls
``raise_exception``, reads an undefined name, breaks the sandbox, loops for hours or builds
gigabytes ends in a DataError naming the template and the example, exit 2, no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from helpers import chat_records, write_jsonl, write_recipe

LOOP = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
BROKEN = {
    "syntax error": ("{% for m in messages %}{{ m.content }", "TemplateSyntaxError"),
    "raise_exception": (
        "{{ raise_exception('only user and assistant roles are supported') }}" + LOOP,
        "only user and assistant roles are supported",
    ),
    "undefined attribute": ("{{ messages[0].content.nope.deeper }}" + LOOP, "UndefinedError"),
    "sandbox": ("{{ messages.append(1) }}" + LOOP, "SecurityError"),
    "nested range": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}" + LOOP,
        "range() items",
    ),
    "huge string": ("{{ 'x' * 4000000000 }}" + LOOP, "sandbox allows"),
}
MAIN = "import sys; from lorakit.cli.main import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_chat_template_is_a_data_error_in_check(case, tmp_path, data_tokenizer_dir):
    template, message = BROKEN[case]
    tok = shutil.copytree(data_tokenizer_dir, tmp_path / "tok")
    for stale in tok.glob("chat_template.*"):
        stale.unlink()
    (tok / "chat_template.jinja").write_text(template)
    write_jsonl(tmp_path / "data.jsonl", chat_records(4))
    recipe = write_recipe(tmp_path, [{"plugin": "chat_jsonl", "path": "data.jsonl"}])
    proc = subprocess.run(
        [sys.executable, "-c", MAIN, "check", str(recipe), "--tokenizer", str(tok)],
        capture_output=True,
        text=True,
        timeout=120,  # the nested range ran for hours, the string filled memory
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "the chat template failed" in proc.stderr and message in proc.stderr
    assert "chat_template" in proc.stderr and "fix:" in proc.stderr


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_chat_template_is_a_data_error_with_a_transformers_tokenizer(case, data_tokenizer):
    """``run`` renders with the transformers tokenizer, not lorakit's light one."""
    from lorakit.contracts import Example, Message
    from lorakit.errors import DataError
    from lorakit_plugins.formatters.chat_template import ChatTemplateFormatter, ChatTemplateOptions

    template, message = BROKEN[case]
    original = data_tokenizer.chat_template
    data_tokenizer.chat_template = template
    try:
        example = Example(id="ex-7", messages=(Message("user", "hi"), Message("assistant", "yo")))
        with pytest.raises(DataError) as info:
            ChatTemplateFormatter(ChatTemplateOptions()).render(example, data_tokenizer)
    finally:
        data_tokenizer.chat_template = original
    assert message in str(info.value)
    assert "chat_template" in str(info.value)


# transformers' {% generation %} blocks (they mark the assistant's text for its assistant mask)
GEN_LOOP = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEN_NESTED = (
    "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{% endgeneration %}{% endif %}{% endfor %}" + GEN_LOOP
)
RENDER = """
import sys
from transformers import AutoTokenizer
from lorakit.contracts import Example, Message
from lorakit.errors import DataError
from lorakit_plugins.formatters.chat_template import ChatTemplateFormatter, ChatTemplateOptions

tok = AutoTokenizer.from_pretrained(sys.argv[1])
tok.chat_template = open(sys.argv[2]).read()
example = Example(id="ex-7", messages=(Message("user", "hi"), Message("assistant", "yo")))
try:
    ChatTemplateFormatter(ChatTemplateOptions()).render(example, tok)
except DataError as exc:
    print(exc)
    sys.exit(2)
"""


@pytest.mark.slow  # its subprocess imports transformers: about 3 s of CPU, at the guard's limit
def test_a_generation_block_loop_is_bounded_with_a_transformers_tokenizer(
    tmp_path, data_tokenizer_dir
):
    """transformers renders ``{% generation %}`` with no loop or size budget; lorakit's sandbox
    knows the tag, so its bounded probe stops the template before transformers runs it."""
    (tmp_path / "t.jinja").write_text(GEN_NESTED)
    proc = subprocess.run(
        [sys.executable, "-c", RENDER, str(data_tokenizer_dir), str(tmp_path / "t.jinja")],
        capture_output=True,
        text=True,
        timeout=120,  # transformers alone runs the 10**10 iterations for hours
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "range() items" in proc.stdout and "chat_template" in proc.stdout, proc.stdout


@pytest.mark.parametrize("case", ["bounded", "loops"])
def test_check_renders_generation_blocks_in_its_sandbox(case, tmp_path, data_tokenizer_dir):
    """``check`` (lorakit's light tokenizer) renders a template with ``{% generation %}``
    blocks like transformers does (it refused the tag), and under the same budget."""
    tok = shutil.copytree(data_tokenizer_dir, tmp_path / "tok")
    for stale in tok.glob("chat_template.*"):
        stale.unlink()
    (tok / "chat_template.jinja").write_text(GEN_LOOP if case == "bounded" else GEN_NESTED)
    write_jsonl(tmp_path / "data.jsonl", chat_records(4))
    recipe = write_recipe(tmp_path, [{"plugin": "chat_jsonl", "path": "data.jsonl"}])
    proc = subprocess.run(
        [sys.executable, "-c", MAIN, "check", str(recipe), "--tokenizer", str(tok)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert "Traceback" not in proc.stderr
    if case == "bounded":
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "supervised 4 times for 4 replies" in proc.stdout, proc.stdout
    else:
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "range() items" in proc.stderr and "fix:" in proc.stderr, proc.stderr


def test_the_sandbox_renders_generation_blocks_as_transformers_does(data_tokenizer):
    from lorakit.api import chat_environment

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ours = chat_environment().from_string(GEN_LOOP).render(messages=messages)
    original = data_tokenizer.chat_template
    data_tokenizer.chat_template = GEN_LOOP
    try:
        theirs = data_tokenizer.apply_chat_template(messages, tokenize=False)
    finally:
        data_tokenizer.chat_template = original
    assert ours == theirs  # trim_blocks drops the newline after each {% endif %}, in both
    assert ours == "<|im_start|>user\nhi<|im_end|><|im_start|>assistant\nyo<|im_end|>"
