"""Shared rendering for formatters with a fixed turn layout (chatml, mistral_inst, instruction).

A :class:`Layout` names the text around each turn. Only ``assistant_lead + content + eot`` of
each assistant turn is supervised; everything else (system, user, headers, the text after the
end-of-turn) is context. Raw-text examples render as ``bos + text + eos`` with text and eos
supervised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import attrs
from lorakit.api import DataError, Example, Message, Rendered, Segment


@attrs.frozen
class Layout:
    system: str  # "{content}" placeholder
    user: str  # "{content}" placeholder
    assistant_open: str  # context text before an assistant reply (the generation prompt)
    assistant_close: str  # context text after the end-of-turn
    assistant_lead: str = ""  # supervised text before the content (e.g. mistral's space)
    system_into_user: str | None = None  # fold the system message into the first user turn


def bos_for(tokenizer: Any) -> str:
    """The BOS text to write ourselves: the tokenizer's BOS when its own special-token handling
    would add one to plain text (the core tokenizes with ``add_special_tokens=False``), else "".
    This avoids both a missing and a double BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        return ""
    bos_id = tokenizer.convert_tokens_to_ids(bos)
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos_id else ""


def eos_for(tokenizer: Any, fallback: str) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    return eos or fallback


def require_single_token(tokenizer: Any, text: str, formatter: str) -> None:
    """An end-of-turn must be one token, or the model cannot stop cleanly on it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise DataError(
            f"{formatter}: the end-of-turn {text!r} is {len(ids)} tokens for this tokenizer, not one",
            where="[format].plugin",
            fix="use a formatter made for this model (chat_template uses the model's own format), "
            "or a tokenizer that has this special token",
        )


def tool_trace_parts(
    messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None
) -> list[str]:
    """What of an agent trace a conversation holds: a tools list, tool calls, tool results,
    reasoning (empty: none)."""
    parts = ["a tools list"] if tools else []
    checks = (
        ("tool calls", lambda m: bool(m.tool_calls)),
        ("tool results", lambda m: m.role == "tool"),
        ("reasoning", lambda m: m.reasoning_content is not None),
    )
    parts += [what for what, has in checks if any(has(m) for m in messages)]
    return parts


def refuse_tool_trace(
    formatter: str,
    messages: Sequence[Message],
    tools: Sequence[Mapping[str, Any]] | None,
    where: str,
) -> None:
    """A fixed layout has no place for tools, tool calls, tool results or reasoning: rather
    than drop them (the model would learn replies to calls it never saw), refuse, naming the
    conversation and the formatter that does render them."""
    parts = tool_trace_parts(messages, tools)
    if parts:
        raise DataError(
            f"{formatter}: {where} has {', '.join(parts)}, and this formatter's fixed layout "
            "has no place for them (they would be dropped from the text the model learns)",
            where=where,
            fix='use [format] plugin = "chat_template" with a model whose own template renders '
            "tools (Qwen2.5+, Llama 3.1+, Mistral v3...), or leave the tool messages out of "
            "the data",
        )


class TurnRenderer:
    """Renders conversations with a :class:`Layout`; caches per-tokenizer lookups."""

    def __init__(self, layout: Layout, system_prompt: str | None, name: str):
        self.layout = layout
        self.system_prompt = system_prompt
        self.name = name  # the formatter's, for errors
        self._bos: dict[int, str] = {}

    def bos(self, tokenizer: Any) -> str:
        key = id(tokenizer)
        if key not in self._bos:
            self._bos[key] = bos_for(tokenizer)
        return self._bos[key]

    def _messages(self, messages: Sequence[Message]) -> list[Message]:
        msgs = list(messages)
        if self.system_prompt is not None and (not msgs or msgs[0].role != "system"):
            msgs.insert(0, Message("system", self.system_prompt))
        sep = self.layout.system_into_user
        if sep is not None and msgs and msgs[0].role == "system":
            system, rest = msgs[0], msgs[1:]
            if rest and rest[0].role == "user":
                rest[0] = Message("user", system.content + sep + rest[0].content)
                msgs = rest
        return msgs

    def segments(
        self,
        messages: Sequence[Message],
        eot: str,
        tokenizer: Any,
        *,
        where: str,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[Segment]:
        """``where``: the conversation, for an error (``example ID``, a file:line)."""
        lay = self.layout
        refuse_tool_trace(self.name, messages, tools, where)
        out = [Segment(self.bos(tokenizer))]
        for m in self._messages(messages):
            if m.role == "system":
                out.append(Segment(lay.system.format(content=m.content)))
            elif m.role == "user":
                out.append(Segment(lay.user.format(content=m.content)))
            else:
                out.append(Segment(lay.assistant_open))
                out.append(Segment(lay.assistant_lead + m.content + eot, True))
                out.append(Segment(lay.assistant_close))
        return out

    def render(self, example: Example, eot: str, eos: str, tokenizer: Any) -> Rendered:
        if example.messages is None:
            segs = [Segment(self.bos(tokenizer)), Segment((example.text or "") + eos, True)]
        else:
            source = example.meta.get("source")
            where = f"example {example.id}" + (f" ({source})" if source else "")
            segs = self.segments(example.messages, eot, tokenizer, where=where, tools=example.tools)
        return Rendered(tuple(s for s in segs if s.text))

    def render_prompt(
        self,
        messages: Sequence[Message],
        eot: str,
        tokenizer: Any,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        segs = self.segments(messages, eot, tokenizer, where="a generation prompt", tools=tools)
        return "".join(s.text for s in segs) + self.layout.assistant_open


class EosTurnFormatter:
    """A fixed-layout formatter whose assistant turns end with the tokenizer's eos token.

    Subclasses set ``Options`` (with a ``system_prompt`` field), ``name``, ``layout`` and
    ``no_eos_fix`` (what to do when the tokenizer has no eos token).
    """

    Options: ClassVar[type]
    name: ClassVar[str]
    layout: ClassVar[Layout]
    no_eos_fix: ClassVar[str]

    def __init__(self, options: Any):
        self.options = options
        self.turns = TurnRenderer(self.layout, options.system_prompt, self.name)

    @property
    def system_prompt(self) -> str | None:
        return self.options.system_prompt

    def end_of_turn(self, tokenizer: Any) -> str:
        eos = getattr(tokenizer, "eos_token", None)
        if not eos:
            raise DataError(
                f"{self.name} ends assistant turns with the tokenizer's eos token, but it has none",
                where="[format].plugin",
                fix=self.no_eos_fix,
            )
        return str(eos)

    def render(self, example: Example, tokenizer: Any) -> Rendered:
        eot = self.end_of_turn(tokenizer)
        return self.turns.render(example, eot, eot, tokenizer)

    def render_prompt(
        self,
        messages: Sequence[Message],
        tokenizer: Any,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        return self.turns.render_prompt(messages, self.end_of_turn(tokenizer), tokenizer, tools)
