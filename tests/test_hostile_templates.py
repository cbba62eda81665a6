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
