"""Trained the way it is served: the train/serve template check and the system prompt a run
was trained with (lorakit.fidelity), with real chat templates."""

from __future__ import annotations

import json

import pytest
from helpers import build_data_tokenizer, tiny_recipe
from lorakit.catalog import default_catalog
from lorakit.contracts import Example, Message
from lorakit.fidelity import (
    train_serve_problems,
    training_system_prompt,
    with_default_system,
)

# SmolLM2-Instruct's (ChatML, with its default system prompt)
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Mistral-7B-Instruct-v0.1's
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and "
    "assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# Qwen3's handling of thinking, tools left out: an assistant turn before the last user message
# loses its <think> block; the latest keeps it
QWEN3_THINKING = (
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.last_query_index == messages|length - 1 and message.role == 'user' %}"
    "{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}"
    "{%- set reasoning_content = '' %}{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\n')"
    ".split('<think>')[-1].lstrip('\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and reasoning_content %}"
    "{{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + "
    "'\n</think>\n\n' + content.lstrip('\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# a template that tells the model the date only when it asks for a reply
DATE_PREAMBLE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>system\nToday is 26 Jul 2024.<|im_end|>\n<|im_start|>assistant\n' }}"
    "{% endif %}"
)
SPECIALS = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"]),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "mistral": (MISTRAL, ["[INST]", "[/INST]"]),
    "qwen3": (QWEN3_THINKING, ["<|im_start|>", "<|im_end|>"]),
    "date": (DATE_PREAMBLE, ["<|im_start|>", "<|im_end|>"]),
}


# Llama 3's pre-tokenizer pattern: newlines split apart from the words that follow them
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _tokenizer(name: str, split: str | None = None):
    from tokenizers import Regex, pre_tokenizers

    template, specials = SPECIALS[name]
    tok = build_data_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = template
    if split is not None:
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return tok


def _formatter(name: str = "chat_template"):
    entry = default_catalog().get("formatter", name)
    return entry.factory(entry.options_class())


def _conversation(i: int, thinking: bool = False) -> Example:
    think = "<think>\nthe user wants a count\n</think>\n\n" if thinking else ""
    return Example(
        id=f"c{i}",
        messages=(
            Message("user", f"how many apples in basket {i}?"),
            Message("assistant", f"{think}there are {i} apples"),
            Message("user", "and pears?"),
            Message("assistant", f"{think}no pears"),
        ),
    )


@pytest.mark.parametrize(
    ("name", "split"), [("chatml", None), ("llama3", LLAMA3_SPLIT), ("mistral", None)]
)
def test_templates_that_render_history_alike_pass(name, split):
    examples = [_conversation(i) for i in range(4)]
    assert train_serve_problems(_formatter(), _tokenizer(name, split), examples) == []


def test_a_generation_prompt_that_merges_with_the_reply_is_reported():
    """Llama 3's template ends the generation prompt with a blank line. Its own tokenizer keeps
    newlines apart from the reply; a GPT-2 style one reads '\n\n' before a word as two
    tokens in training but as one token at the end of a served prompt: the model is served a
    token it never saw before its replies."""
    problems = train_serve_problems(_formatter(), _tokenizer("llama3"), [_conversation(1)])
    assert len(problems) == 2, problems  # both turns
    assert "training has 'Ċ', served 'ĊĊ'" in problems[0], problems[0]
    assert problems[0].startswith("example 'c1', assistant turn 1: the prompt rendered")


def test_a_reasoning_template_that_drops_earlier_thinking_is_refused():
    """Trained on turn 1 without its thinking (the full conversation strips it) but served
    with it: the chat_template formatter already refuses such data, naming the example."""
    from lorakit.errors import DataError

    examples = [_conversation(i, thinking=True) for i in range(3)]
    with pytest.raises(DataError) as info:
        train_serve_problems(_formatter(), _tokenizer("qwen3"), examples)
    text = str(info.value)
    assert text.startswith("example c0, assistant turn 2: the chat template renders earlier")
    assert "one has '<think>\\nthe user wants" in text, text


def test_a_template_with_a_serving_only_preamble_is_refused_showing_the_difference():
    from lorakit.errors import DataError

    with pytest.raises(DataError) as info:
        train_serve_problems(_formatter(), _tokenizer("date"), [_conversation(1)])
    text = str(info.value)
    assert "example c1, assistant turn 1" in text and "served another" in text, text
    assert "one has 'system\\nToday is 26 Jul 2024" in text, text


def test_a_fixed_layout_formatter_checks_too():
    """chatml renders by itself (no template); its prompts are prefixes and its supervised
    turns end with <|im_end|>."""
    assert (
        train_serve_problems(_formatter("chatml"), _tokenizer("chatml"), [_conversation(2)]) == []
    )


def test_training_system_prompt():
    def conv(system):
        head = (Message("system", system),) if system else ()
        return Example(id="x", messages=(*head, Message("user", "q"), Message("assistant", "a")))

    assert training_system_prompt([conv("Be JSON."), conv("Be JSON.")]) == ("Be JSON.", "")
    assert training_system_prompt([conv(None), conv(None)]) == (None, "")
    assert training_system_prompt([conv(None)], default="From the formatter") == (
        "From the formatter",
        "",
    )
    system, note = training_system_prompt([conv("A"), conv("B")])
    assert system is None and "different system prompts" in note
    system, note = training_system_prompt([conv("A"), conv(None)])
    assert system is None and note


@pytest.mark.parametrize("system", ["Be JSON.", 'quotes " and \\ and {% raw %} and é ✓ 😀\nline'])
def test_the_default_system_prompt_is_inserted_by_the_template_itself(system):
    tok = _tokenizer("chatml")
    tok.chat_template = with_default_system(CHATML, system)
    rows = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(rows, tokenize=False, add_generation_prompt=True)
    assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nhi")
    explicit = [{"role": "system", "content": "Other."}, *rows]
    text = tok.apply_chat_template(explicit, tokenize=False)
    assert text.startswith("<|im_start|>system\nOther.<|im_end|>") and system not in text


@pytest.mark.slow
def test_a_run_records_its_system_prompt_and_generate_uses_it(tmp_path, tiny_model_dir, cli):
    """Every training conversation had the same system prompt: the adapter records it, its
    saved chat template inserts it, and generate applies it unless --system says otherwise."""
    from helpers import chat_records, write_jsonl
    from lorakit.fidelity import system_messages
    from lorakit.generation import open_generation_target

    records = chat_records(24)
    for r in records:
        r["messages"].insert(0, {"role": "system", "content": "Answer in JSON."})
    data = write_jsonl(tmp_path / "sys.jsonl", records)
    recipe = tiny_recipe(
        tmp_path, tiny_model_dir, data, extra='name = "sys"\n[eval]\nmetrics = ["eval_loss"]\n'
    )
    code, out, err = cli("check", recipe)
    assert code == 0, err
    assert "system prompt (generate and export use it by default): 'Answer in JSON.'" in out
    assert "train/serve: inference prompts are token prefixes" in out
    code, _, err = cli("run", recipe, "train.max_steps=1")
    assert code == 0, err
    run = tmp_path / "runs" / "sys"
    meta = json.loads((run / "adapter" / "lorakit.json").read_text())
    assert meta["system_prompt"] == "Answer in JSON."
    saved = (run / "adapter" / "chat_template.jinja").read_text()
    assert "Answer in JSON." in saved

    target = open_generation_target(run)
    assert target.system == "Answer in JSON."
    prompt = target.render(system_messages(target.system, [Message("user", "hi")]))
    assert prompt.startswith("<|im_start|>system\nAnswer in JSON.<|im_end|>")
    code, out, err = cli("generate", run, "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 0 and "system prompt as trained" in err, err
    code, out, err = cli("generate", run, "--prompt", "hi", "--max-new-tokens", "2", "--system", "")
    assert code == 0 and "system prompt as trained" not in err, err

    # the export's Modelfile gives Ollama the system prompt trained with, not the base's
    code, _, err = cli("export", run, "--gguf", "--gguf-type", "f32")
    assert code == 0, err
    modelfile = (run / "export" / "gguf" / "Modelfile").read_text()
    assert 'SYSTEM """Answer in JSON."""' in modelfile, modelfile
    merged_meta = json.loads((run / "export" / "adapter" / "lorakit.json").read_text())
    assert merged_meta["system_prompt"] == "Answer in JSON."
