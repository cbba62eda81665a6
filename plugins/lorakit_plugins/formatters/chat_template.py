"""``chat_template``: the tokenizer's own chat template (what inference servers will use).

Assistant spans are found by rendering growing prefixes of the conversation: the text between
"everything before this turn + generation prompt" and "everything through this turn" is the
assistant reply plus its end-of-turn. A template whose renders are not prefix-stable cannot be
masked safely and is rejected with an explanation instead of producing wrong labels.

Agent traces: an example's ``tools`` go to ``apply_chat_template(tools=...)``; assistant tool
calls (rendered by the template inside the reply) are supervised with the reply; tool results
are context unless ``supervise_tool_results``; an assistant's ``reasoning_content`` is
supervised unless ``supervise_reasoning = false`` (then its text, found in the rendered reply,
is context while the template's thinking markers and the answer stay supervised).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from lorakit.api import (
    DataError,
    Example,
    Message,
    RegisterFormatter,
    Rendered,
    Segment,
    hookimpl,
    option,
)

from lorakit_plugins.formatters._turns import bos_for


def _dicts(messages: Sequence[Message]) -> list[dict[str, Any]]:
    return [m.to_json() for m in messages]


def template_end_of_turn(tokenizer: Any) -> str:
    """The special token a template closes an assistant turn with (e.g. ``<|im_end|>``)."""
    probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "PONG-7"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    tail = text[text.rindex("PONG-7") + len("PONG-7") :]
    specials = sorted(
        set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True
    )
    stripped = tail.lstrip(" ")
    for tok in specials:
        if tok and stripped.startswith(tok):
            return tok
    if tokenizer.eos_token and tokenizer.eos_token in tail:
        return tokenizer.eos_token
    raise DataError(
        f"cannot find the end-of-turn token after an assistant reply in the chat template "
        f"(it renders {tail!r})",
        where="[format]",
        fix='use a formatter that names its end-of-turn, e.g. plugin = "chatml"',
    )


def _first_difference(a: str, b: str) -> str:
    """Where two renders part, with a little text of each."""
    at = next(
        (k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
    return f"at character {at} one has {a[at : at + 30]!r}, the other {b[at : at + 30]!r}"


@attrs.frozen
class ChatTemplateOptions:
    system_prompt: str | None = option(
        None, doc="system message added to conversations that have none (unset: template default)"
    )
    supervise_tool_results: bool = option(
        False, doc="learn the text of tool results too (false: they are context only)"
    )
    supervise_reasoning: bool = option(
        True, doc="learn assistants' reasoning_content (false: context; the answer is learned)"
    )


class ChatTemplateFormatter:
    Options = ChatTemplateOptions
    default = True  # what a recipe without [format] plugin gets: the model's own template

    def __init__(self, options: ChatTemplateOptions):
        self.options = options
        self._eot: dict[int, str] = {}
        self._fast: dict[int, Any] = {}  # tokenizer id -> compiled template, or None

    @property
    def system_prompt(self) -> str | None:
        return self.options.system_prompt

    def _check(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "the tokenizer has no chat template",
                where="[format].plugin",
                fix='choose a formatter with a fixed layout: "chatml", "mistral_inst" or "instruction"',
            )

    def end_of_turn(self, tokenizer: Any) -> str:
        key = id(tokenizer)
        if key not in self._eot:
            self._check(tokenizer)
            try:
                if key not in self._fast:  # the bounded probe runs before transformers' render
                    self._fast[key] = _compile_if_equivalent(tokenizer)
                self._eot[key] = template_end_of_turn(tokenizer)
            except _template_errors() as exc:
                raise _template_failed(exc, tokenizer, "a probe conversation") from None
        return self._eot[key]

    def _apply(
        self,
        tokenizer: Any,
        messages: list[dict[str, Any]],
        gen: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """``apply_chat_template(..., tokenize=False)``, rendered with a cached compiled template
        when that gives the same text on a probe conversation (it skips transformers' per-call
        overhead, about half the cost); otherwise, and whenever there are tools, through
        transformers."""
        key = id(tokenizer)
        if key not in self._fast:
            self._fast[key] = _compile_if_equivalent(tokenizer)
        fast = self._fast[key]
        if fast is None or tools:
            extra = {"tools": tools} if tools else {}
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen, **extra
            )
        return fast(messages, gen)

    def _with_system(self, messages: Sequence[Message]) -> list[dict[str, Any]]:
        out = _dicts(messages)
        if self.options.system_prompt is not None and (not out or out[0]["role"] != "system"):
            out.insert(0, {"role": "system", "content": self.options.system_prompt})
        return out

    def render_prompt(
        self,
        messages: Sequence[Message],
        tokenizer: Any,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The conversation and generation prompt, with the example's ``tools`` rendered as
        in training."""
        self._check(tokenizer)
        extra = {"tools": [dict(t) for t in tools]} if tools else {}
        try:
            return tokenizer.apply_chat_template(
                self._with_system(messages), tokenize=False, add_generation_prompt=True, **extra
            )
        except _template_errors() as exc:
            raise _template_failed(exc, tokenizer, "the prompt") from None

    def render(self, example: Example, tokenizer: Any) -> Rendered:
        try:
            return self._render(example, tokenizer)
        except _template_errors() as exc:
            raise _template_failed(exc, tokenizer, f"example {example.id}") from None

    def _render(self, example: Example, tokenizer: Any) -> Rendered:
        eot = self.end_of_turn(tokenizer)
        if example.messages is None:
            # Raw text: learn all of it, and to stop after it. BOS only where the tokenizer
            # itself would add one (a chat template's BOS-like start token is not a BOS).
            bos = bos_for(tokenizer)
            segs = (Segment(bos), Segment((example.text or "") + eot, True))
            return Rendered(tuple(s for s in segs if s.text))
        msgs = self._with_system(example.messages)
        tools = [dict(t) for t in example.tools] if example.tools else None
        segments: list[Segment] = []
        done = ""  # rendered text covered by segments so far
        results: list[str] = []  # tool results since the last reply (supervised when asked)
        for i, m in enumerate(msgs):
            if m["role"] == "tool" and self.options.supervise_tool_results:
                results.append(m["content"])
            if m["role"] != "assistant":
                continue
            prompt = self._apply(tokenizer, msgs[:i], gen=True, tools=tools)
            full = self._apply(tokenizer, msgs[: i + 1], tools=tools)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                # the text so far vs the prompt for this turn, or the prompt vs this turn
                a, b = (done, prompt) if not prompt.startswith(done) else (prompt, full)
                turn = sum(1 for earlier in msgs[: i + 1] if earlier["role"] == "assistant")
                raise DataError(
                    "the chat template renders earlier turns differently once later turns are "
                    "added (a reasoning template that drops earlier thinking, a preamble only "
                    "in generation prompts): trained on one text, the model would be served "
                    f"another; {_first_difference(a, b)}",
                    where=f"example {example.id}, assistant turn {turn}",
                    fix='use plugin = "chatml" (or another fixed formatter) for this model, or '
                    "train on conversations with one assistant turn",
                )
            reply = full[len(prompt) :]
            cut = reply.find(
                eot, reply.find(m["content"]) + len(m["content"]) if m["content"] in reply else 0
            )
            if cut < 0:
                raise DataError(
                    f"assistant turn {i} does not end with the end-of-turn token {eot!r}",
                    where=f"example {example.id}",
                    fix='use plugin = "chatml" (or another fixed formatter) for this model',
                )
            end = cut + len(eot)
            segments += _marked(prompt[len(done) :], results, supervised=False)
            results = []
            reasoning = m.get("reasoning_content")
            if reasoning and not self.options.supervise_reasoning:
                segments += _marked(reply[:end], [reasoning.strip()], supervised=True)
            else:
                segments.append(Segment(reply[:end], True))
            segments.append(Segment(reply[end:]))
            done = full
        # A conversation that ends with a reply was rendered whole in the last step.
        whole = (
            done if msgs[-1]["role"] == "assistant" else self._apply(tokenizer, msgs, tools=tools)
        )
        if not whole.startswith(done):
            raise DataError(
                "the chat template is not prefix-stable for this conversation",
                where=f"example {example.id}",
                fix='use plugin = "chatml" (or another fixed formatter) for this model',
            )
        segments += _marked(whole[len(done) :], results, supervised=False)
        return Rendered(tuple(s for s in segments if s.text))


def _marked(text: str, pieces: list[str], supervised: bool) -> list[Segment]:
    """``text`` as segments of the given ``supervised`` flag, except each of ``pieces`` (found
    in order, each after the previous) which gets the other flag. A piece the template did not
    render verbatim keeps the surrounding flag."""
    out: list[Segment] = []
    pos = 0
    for piece in pieces:
        at = text.find(piece, pos) if piece else -1
        if at < 0:
            continue
        out += [Segment(text[pos:at], supervised), Segment(piece, not supervised)]
        pos = at + len(piece)
    out.append(Segment(text[pos:], supervised))
    return out


def _template_errors() -> tuple[type[Exception], ...]:
    """What a broken chat template raises: jinja's errors (syntax, undefined, sandbox, lorakit's
    sandbox budget, ``raise_exception``) and the Python errors of its expressions."""
    import jinja2

    return (jinja2.TemplateError, TypeError, ValueError, ZeroDivisionError, OverflowError)


def _template_failed(exc: Exception, tokenizer: Any, what: str) -> DataError:
    line = getattr(exc, "lineno", None)
    name = getattr(tokenizer, "name_or_path", "") or getattr(tokenizer, "folder", "")
    source = f"{name or 'the tokenizer'}'s chat_template"
    where = f"{source}{f' line {line}' if line else ''}, rendering {what}"
    return DataError(
        f"the chat template failed: {type(exc).__name__}: {exc}",
        where=where,
        fix='fix the template (tokenizer_config.json or chat_template.jinja), or use plugin = "chatml"'
        " (or another fixed formatter) instead of the model's template",
    )


_PROBE = [
    {"role": "system", "content": "S1"},
    {"role": "user", "content": "U1 x"},
    {"role": "assistant", "content": "A1\ny"},
    {"role": "user", "content": "U2"},
    {"role": "assistant", "content": "A2"},
]


def _compile_if_equivalent(tokenizer: Any) -> Any:
    """A ``render(messages, add_generation_prompt)`` function using a compiled template, or None
    when it does not reproduce ``tokenizer.apply_chat_template`` exactly (then that is used)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None
    try:
        from lorakit.api import chat_environment

        compiled = chat_environment().from_string(template)
        special = {
            name: getattr(tokenizer, name, None) or ""
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        }

        def render(messages: list[dict[str, str]], gen: bool) -> str:
            return compiled.render(messages=messages, add_generation_prompt=gen, **special)

        for n in range(1, len(_PROBE) + 1):
            for gen in (False, True):
                # Rendered in lorakit's bounded sandbox first: transformers' own would run a
                # template of nested range() loops for hours, or build "x" * 4e9 in memory.
                got = render(_PROBE[:n], gen)
                if "generation" in template:
                    continue
                want = tokenizer.apply_chat_template(
                    _PROBE[:n], tokenize=False, add_generation_prompt=gen
                )
                if got != want:
                    return None
        return None if "generation" in template else render
    except Exception as exc:  # any template the fast path cannot handle goes through transformers
        from jinja2.exceptions import SecurityError

        if isinstance(exc, SecurityError):  # unsafe or over lorakit's budget: refused
            raise
        return None


@hookimpl
def lorakit_register_formatters(register: RegisterFormatter) -> None:
    register("chat_template", ChatTemplateFormatter)
