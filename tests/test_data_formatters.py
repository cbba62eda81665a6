"""Property tests for every formatter: only assistant content (+ end-of-turn) is supervised,
tokens never straddle a supervised boundary, prompts are token prefixes, BOS appears once."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lorakit.contracts import Example, Message
from lorakit.data.tokenize import IGNORE_INDEX, _char_mask, labels_for
from lorakit_plugins.formatters.chat_template import ChatTemplateFormatter, ChatTemplateOptions
from lorakit_plugins.formatters.chatml import ChatmlFormatter, ChatmlOptions
from lorakit_plugins.formatters.instruction import InstructionFormatter, InstructionOptions
from lorakit_plugins.formatters.mistral_inst import MistralInstFormatter, MistralInstOptions
from lorakit_plugins.formatters.raw_text import RawTextFormatter, RawTextOptions

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# (formatter, supervised text before each assistant content)
CHAT = {
    "chat_template": (ChatTemplateFormatter(ChatTemplateOptions()), ""),
    "chatml": (ChatmlFormatter(ChatmlOptions()), ""),
    "chatml+system": (ChatmlFormatter(ChatmlOptions(system_prompt="Be brief.")), ""),
    "mistral_inst": (MistralInstFormatter(MistralInstOptions()), " "),
    "instruction": (InstructionFormatter(InstructionOptions(system_prompt="Do the task.")), ""),
}
ALL = {**{k: v[0] for k, v in CHAT.items()}, "raw_text": RawTextFormatter(RawTextOptions())}

words = st.text(alphabet="abcdefghij XYZ0123.,!?#", min_size=1, max_size=30)
content = st.lists(words, min_size=1, max_size=3).map("\n".join)
reply = content.filter(lambda s: s.strip())


@st.composite
def conversations(draw):
    msgs = []
    if draw(st.booleans()):
        msgs.append(Message("system", draw(content)))
    for _ in range(draw(st.integers(1, 3))):
        msgs.append(Message("user", draw(content)))
        msgs.append(Message("assistant", draw(reply)))
    return Example(id="x", messages=tuple(msgs))


def tokens(tokenizer, text):
    enc = tokenizer([text], add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"][0], enc["offset_mapping"][0]


def check_token_alignment(rendered, tokenizer):
    """No token mixes supervised and unsupervised characters; returns (ids, labels)."""
    ids, offsets = tokens(tokenizer, rendered.text)
    mask = _char_mask(rendered)
    for s, e in offsets:
        assert len(set(mask[s:e])) <= 1, f"token {rendered.text[s:e]!r} straddles a boundary"
    return ids, labels_for(ids, offsets, mask)


@pytest.mark.parametrize("name", list(CHAT))
@SETTINGS
@given(example=conversations())
def test_only_assistant_content_and_end_of_turn_are_supervised(name, example, data_tokenizer):
    formatter, lead = CHAT[name]
    eot = formatter.end_of_turn(data_tokenizer)
    rendered = formatter.render(example, data_tokenizer)
    supervised = "".join(s.text for s in rendered.segments if s.supervised)
    assistant = [m.content for m in example.messages if m.role == "assistant"]
    assert supervised == "".join(lead + c + eot for c in assistant)
    _ids, labels = check_token_alignment(rendered, data_tokenizer)
    # The supervised tokens decode to exactly that text, and each reply ends with end-of-turn.
    sup_ids = [t for t in labels if t != IGNORE_INDEX]
    assert data_tokenizer.decode(sup_ids) == supervised
    eot_id = data_tokenizer.convert_tokens_to_ids(eot)
    assert sum(1 for t in sup_ids if t == eot_id) == len(assistant)


@pytest.mark.parametrize("name", list(CHAT))
@SETTINGS
@given(example=conversations())
def test_prompt_tokens_are_a_prefix_of_prompt_plus_completion(name, example, data_tokenizer):
    formatter, _ = CHAT[name]
    full_ids, _ = tokens(data_tokenizer, formatter.render(example, data_tokenizer).text)
    for i, m in enumerate(example.messages):
        if m.role == "assistant":
            prompt = formatter.render_prompt(example.messages[:i], data_tokenizer)
            prompt_ids, _ = tokens(data_tokenizer, prompt)
            assert full_ids[: len(prompt_ids)] == prompt_ids


@pytest.mark.parametrize("name", list(ALL))
@SETTINGS
@given(text=content)
def test_raw_text_supervises_text_and_end_with_one_bos(name, text, data_tokenizer):
    formatter = ALL[name]
    rendered = formatter.render(Example(id="t", text=text), data_tokenizer)
    supervised = "".join(s.text for s in rendered.segments if s.supervised)
    assert supervised == text + formatter.end_of_turn(data_tokenizer) or supervised == text + "</s>"
    # The test tokenizer adds <s> to plain text, so the formatter writes it, exactly once.
    assert rendered.text.startswith("<s>") and not rendered.text.startswith("<s><s>")
    check_token_alignment(rendered, data_tokenizer)


@pytest.mark.parametrize("name", [n for n in CHAT if n != "chat_template"])
def test_fixed_formatters_write_bos_once_for_conversations(name, data_tokenizer):
    formatter, _ = CHAT[name]
    ex = Example(id="c", messages=(Message("user", "q"), Message("assistant", "a")))
    ids, _ = tokens(data_tokenizer, formatter.render(ex, data_tokenizer).text)
    bos = data_tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1


def test_layouts_render_as_documented(data_tokenizer):
    ex = Example(
        id="c",
        messages=(Message("system", "S"), Message("user", "U"), Message("assistant", "A")),
    )
    render = {n: f.render(ex, data_tokenizer).text for n, f in ALL.items() if n != "raw_text"}
    assert render["chatml"] == (
        "<s><|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n"
    )
    assert render["mistral_inst"] == "<s>[INST] S\n\nU [/INST] A</s>"
    assert render["instruction"] == "<s>S\n\n### Instruction:\nU\n\n### Response:\nA</s>\n\n"
    assert render["chat_template"].startswith("<|im_start|>system\nS<|im_end|>")


def test_raw_text_without_bos_when_the_tokenizer_adds_none(data_tokenizer):
    import copy

    from tokenizers import processors

    plain = copy.deepcopy(data_tokenizer)
    plain.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    rendered = ChatmlFormatter(ChatmlOptions()).render(Example(id="t", text="hi"), plain)
    assert rendered.text == "hi</s>"
