"""Agent traces rendered by real chat templates that render tools (Qwen2.5's and Qwen3's, written
into the tiny tokenizer's tokenizer_config.json): the tools reach the template, tool calls are
supervised with the reply, tool results never by default, reasoning as ``[format]`` says; ``check``
(no transformers) renders the same and ``--show`` marks the spans."""

from __future__ import annotations

import json
import re

import attrs
import pytest
from helpers import build_data_tokenizer, write_jsonl, write_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lorakit.contracts import Example, Message, ToolCall
from lorakit.data.lite_tokenizer import LiteTokenizer
from lorakit.data.tools import tools_from_json
from lorakit.errors import DataError
from lorakit_plugins.formatters.chat_template import ChatTemplateFormatter, ChatTemplateOptions
from lorakit_plugins.formatters.chatml import ChatmlFormatter, ChatmlOptions
from lorakit_plugins.formatters.instruction import InstructionFormatter, InstructionOptions
from lorakit_plugins.formatters.mistral_inst import MistralInstFormatter, MistralInstOptions

# Qwen2.5-Instruct's chat template (Qwen/Qwen2.5-*-Instruct, tokenizer_config.json; public):
# tools in the system turn, calls in <tool_call> tags, results in a user turn of
# <tool_response> blocks.
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen3's chat template (Qwen/Qwen3-*, tokenizer_config.json; public): Qwen2.5's tool layout
# plus reasoning, rendered as <think>...</think> for the turns after the last user query.
QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

TOOLS = tools_from_json(
    [
        {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        }
    ]
)
CALL = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
)
RESULT = '{"temp": 21}'
TRACE = Example(
    "agent",
    (
        Message("user", "Weather in Paris?"),
        Message(
            "assistant",
            "",
            tool_calls=(ToolCall("get_weather", {"city": "Paris"}, "c1"),),
            reasoning_content="The user wants the weather; call the tool.",
        ),
        Message("tool", RESULT, tool_call_id="c1"),
        Message("assistant", "It is 21 C in Paris."),
    ),
    tools=TOOLS,
)


def tokenizer_folder(path, template):
    """The tiny tokenizer saved with ``template`` in its tokenizer_config.json."""
    build_data_tokenizer().save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module", params=["qwen2.5", "qwen3"])
def tool_tokenizer(request, tmp_path_factory):
    from transformers import AutoTokenizer

    template = {"qwen2.5": QWEN25, "qwen3": QWEN3}[request.param]
    folder = tokenizer_folder(tmp_path_factory.mktemp(request.param), template)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == template
    return request.param, folder, tok


def spans(rendered, supervised=True):
    return "".join(s.text for s in rendered.segments if s.supervised == supervised)


def test_tools_reach_the_template_and_calls_are_supervised_results_are_not(tool_tokenizer):
    name, _, tok = tool_tokenizer
    rendered = ChatTemplateFormatter(ChatTemplateOptions()).render(TRACE, tok)
    want = tok.apply_chat_template(
        [m.to_json() for m in TRACE.messages], tools=list(TRACE.tools), tokenize=False
    )
    assert rendered.text == want
    context, learned = spans(rendered, False), spans(rendered, True)
    assert '"description": "Current weather in a city"' in context  # the tools, rendered
    assert CALL in learned and learned.endswith("It is 21 C in Paris.<|im_end|>")
    assert RESULT in context and RESULT not in learned
    assert "Weather in Paris?" not in learned
    if name == "qwen3":  # reasoning is learned by default
        assert "<think>\nThe user wants the weather; call the tool.\n</think>" in learned


def test_format_options_supervise_tool_results_and_leave_reasoning_out(tool_tokenizer):
    name, _, tok = tool_tokenizer
    opts = ChatTemplateOptions(supervise_tool_results=True, supervise_reasoning=False)
    rendered = ChatTemplateFormatter(opts).render(TRACE, tok)
    learned = spans(rendered, True)
    assert RESULT in learned and CALL in learned
    assert "The user wants the weather" not in learned
    if name == "qwen3":  # the thinking markers and the answer are still learned
        assert "<think>\n" in learned and "\n</think>\n\n" in learned


def test_check_renders_tools_like_transformers(tool_tokenizer):
    _, folder, tok = tool_tokenizer
    fmt = ChatTemplateFormatter(ChatTemplateOptions())
    assert fmt.render(TRACE, LiteTokenizer(folder)) == fmt.render(TRACE, tok)


def test_check_show_marks_the_supervised_spans(tool_tokenizer, tmp_path, cli):
    _, folder, _ = tool_tokenizer
    write_jsonl(tmp_path / "a.jsonl", [TRACE.to_json()])
    recipe = write_recipe(
        tmp_path, [{"plugin": "chat_jsonl", "path": "a.jsonl"}], data={"val_fraction": 0.0}
    )
    code, out, err = cli("check", recipe, "--show", "1", "--tokenizer", folder)
    assert code == 0, err
    marked = " ".join(re.findall(r"\[\[(.*?)\]\]", out + err, re.S))
    assert '"get_weather"' in marked and "It is 21 C in Paris." in marked
    assert RESULT not in marked and "Weather in Paris?" not in marked


FIXED = {
    "chatml": lambda: ChatmlFormatter(ChatmlOptions()),
    "mistral_inst": lambda: MistralInstFormatter(MistralInstOptions()),
    "instruction": lambda: InstructionFormatter(InstructionOptions()),
}


@pytest.mark.parametrize("name", sorted(FIXED))
def test_fixed_layouts_refuse_tool_traces_naming_the_example_and_the_fix(name, data_tokenizer):
    """A fixed layout has no place for tools: refused, never rendered with them dropped (a
    tools list alone too: the model would learn to answer without seeing what it may call)."""
    formatter = FIXED[name]()
    traced = attrs.evolve(TRACE, meta={"source": "agents.jsonl:7"})
    with pytest.raises(DataError) as err:
        formatter.render(traced, data_tokenizer)
    text = str(err.value)
    assert (
        f"{name}: example agent (agents.jsonl:7) has a tools list, tool calls, tool results" in text
    )
    assert 'plugin = "chat_template"' in err.value.fix
    plain = (Message("user", "Weather in Paris?"), Message("assistant", "Sunny."))
    with pytest.raises(DataError, match=r"example only_tools has a tools list,"):
        formatter.render(Example("only_tools", plain, tools=TOOLS), data_tokenizer)
    with pytest.raises(DataError, match=r"a generation prompt has a tools list"):
        formatter.render_prompt(plain[:1], data_tokenizer, tools=TOOLS)
    # without tools nothing changes
    assert formatter.render_prompt(plain[:1], data_tokenizer) == formatter.render_prompt(
        plain[:1], data_tokenizer, tools=None
    )
    assert formatter.render(Example("plain", plain), data_tokenizer).text


def test_generation_prompts_render_the_tools_like_training(tool_tokenizer):
    """Eval's generation prompts and ``lorakit generate``'s carry the example's tools: the
    prompt is the training text up to the reply, tools block included."""
    from lorakit.evaluation.sets import prepare_set
    from lorakit.generation import _conversation

    _, _, tok = tool_tokenizer
    fmt = ChatTemplateFormatter(ChatTemplateOptions())
    trained = fmt.render(TRACE, tok).text
    prompt = fmt.render_prompt(TRACE.messages[:-1], tok, tools=TRACE.tools)
    assert prompt == tok.apply_chat_template(
        [m.to_json() for m in TRACE.messages[:-1]],
        tools=list(TRACE.tools),
        tokenize=False,
        add_generation_prompt=True,
    )
    assert '"description": "Current weather in a city"' in prompt
    assert trained.startswith(prompt)  # served as trained
    without = fmt.render_prompt(TRACE.messages[:-1], tok)
    assert "Current weather" not in without and not trained.startswith(without)

    evalset = prepare_set(
        "val",
        [TRACE],
        fmt,
        tok,
        max_length=4096,
        overlength="drop",
        max_examples=None,
        generation=True,
    )
    assert evalset.prompts == [prompt]
    assert evalset.references == ["It is 21 C in Paris."]

    # lorakit generate --file: a JSONL line with tools and a tool-call trace
    line = TRACE.to_json()
    got = _conversation(line, "prompts.jsonl:1")
    assert got.tools == TRACE.tools
    assert fmt.render_prompt(got.messages, tok, tools=got.tools) == prompt
    bad = {**line, "tools": [{"description": "no name"}]}
    with pytest.raises(DataError, match=r"tools\[0\] has no function name") as err:
        _conversation(bad, "prompts.jsonl:2")
    assert err.value.where == "prompts.jsonl:2"


def test_the_train_serve_check_renders_the_prompts_with_the_tools(tool_tokenizer):
    """The check compares the served prompt with the training text: served without the tools
    it would differ at the tools block, and report a problem for every tool trace."""
    from lorakit.fidelity import train_serve_problems

    _, _, tok = tool_tokenizer
    assert train_serve_problems(ChatTemplateFormatter(ChatTemplateOptions()), tok, [TRACE]) == []


words = st.text("abcdefgh ", min_size=1, max_size=12).filter(str.strip)


@st.composite
def traces(draw):
    msgs: list[Message] = []
    calls = 0
    for turn in range(draw(st.integers(1, 3))):
        msgs.append(Message("user", f"Q{turn} " + draw(words)))
        for _ in range(draw(st.integers(0, 2))):  # agent steps before the answer
            n = draw(st.integers(1, 2))
            batch = tuple(
                ToolCall("get_weather", {"city": draw(words)}, id=f"c{calls + k}") for k in range(n)
            )
            msgs.append(Message("assistant", "", tool_calls=batch))
            msgs += [Message("tool", f"RESULT-{c.id}", tool_call_id=c.id) for c in batch]
            calls += n
        msgs.append(Message("assistant", f"A{turn} " + draw(words)))
    return Example("p", tuple(msgs), tools=TOOLS)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(example=traces())
def test_labels_cover_replies_and_calls_never_results_or_prompts(example, tool_tokenizer):
    name, _, tok = tool_tokenizer
    if name == "qwen3":
        # Qwen3 drops the thinking of turns before the last user query, and renders an empty
        # <think> block only on the last turn: one user turn, and agent steps that think.
        steps = [
            attrs.evolve(m, reasoning_content="Call it.") if m.tool_calls else m
            for m in example.messages[: _first_answer(example) + 1]
        ]
        example = Example("p", tuple(steps), tools=TOOLS)
    rendered = ChatTemplateFormatter(ChatTemplateOptions()).render(example, tok)
    learned = spans(rendered, True)
    replies = [m for m in example.messages if m.role == "assistant"]
    assert learned.count("<|im_end|>") == len(replies)
    for m in example.messages:
        if m.role == "assistant":
            assert m.content in learned
            for c in m.tool_calls:
                assert f'"arguments": {json.dumps(dict(c.arguments))}' in learned
        else:
            assert m.content not in learned


def _first_answer(example):
    return next(i for i, m in enumerate(example.messages) if m.role == "assistant" and m.content)


def test_a_template_that_drops_earlier_thinking_is_refused_not_mislabelled(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_folder(tmp_path, QWEN3))
    step = attrs.evolve(TRACE.messages[1], reasoning_content=None)  # an agent step, no thinking
    example = attrs.evolve(TRACE, messages=(TRACE.messages[0], step, *TRACE.messages[2:]))
    with pytest.raises(DataError, match="renders earlier turns differently"):
        ChatTemplateFormatter(ChatTemplateOptions()).render(example, tok)
