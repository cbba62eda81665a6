"""``preference_jsonl``: one preference pair per line, in the shapes preference data comes in.

- **Explicit prompt** (TRL's preference format): ``{"prompt": ..., "chosen": ..., "rejected":
  ...}``. ``prompt`` is a string (one user turn) or a list of messages; ``chosen`` and
  ``rejected`` are strings (the assistant's answer) or lists holding one assistant message.
- **Whole conversations** (Anthropic HH-style): ``{"chosen": ..., "rejected": ...}`` with no
  ``prompt``: each side is the whole conversation, as a list of messages or as HH text
  (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``); the two must be the same up to their last
  assistant turn, which is the prompt.

- **Unpaired answers** (TRL's unpaired preference format, for KTO): ``{"prompt": ...,
  "completion": ..., "label": true}``: one answer, desirable (``true``) or undesirable
  (``false``); ``prompt`` and ``completion`` as above (strings or messages).

``id`` (a string or integer) and ``meta`` are optional; without an id the pair's is a hash of
its content, stable when rows are added. Every problem names the file and line: a side or a
prompt that is empty, chosen identical to rejected, two conversations whose prompts differ, a
last turn that is not the assistant's, a label that is not a boolean. Each pair becomes an ``Example`` whose
``messages`` end with the chosen turn and whose ``rejected`` holds the rejected one; an unpaired
answer one whose ``messages`` end with the answer and whose ``label`` says which kind it is.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
from lorakit.api import (
    ROLES,
    Example,
    Message,
    RegisterSource,
    SourceContext,
    expand_files,
    hookimpl,
    iter_json_lines,
    non_empty_path,
    option,
    parse_meta,
)

FIELDS = {"id", "prompt", "chosen", "rejected", "meta"}
UNPAIRED_FIELDS = {"id", "prompt", "completion", "label", "meta"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


@attrs.frozen
class PreferenceJsonlOptions:
    path: str = option(
        doc="a .jsonl file, or a folder of them (relative to the recipe file)",
        validator=non_empty_path,
    )
    glob: str = option("**/*.jsonl", doc="which files to read when path is a folder")


class PreferenceJsonlSource:
    Options = PreferenceJsonlOptions

    def __init__(self, options: PreferenceJsonlOptions):
        self.options = options

    def read(self, ctx: SourceContext) -> Iterator[Example]:
        for file in expand_files(ctx.recipe_dir, self.options.path, self.options.glob, "path"):
            for where, record in iter_json_lines(file, ctx):
                example = parse_pair(record, where, ctx)
                if example is not None:
                    yield example


class _Bad(Exception):
    def __init__(self, reason: str, fix: str):
        super().__init__(reason)
        self.reason, self.fix = reason, fix


def parse_pair(record: Any, where: str, ctx: SourceContext) -> Example | None:
    """One line as a pair, or None after ``ctx.reject`` (file:line, what to do)."""
    if not isinstance(record, Mapping):
        ctx.reject(
            f"expected a JSON object, got {type(record).__name__}",
            where,
            'each line is {"prompt": ..., "chosen": ..., "rejected": ...} or '
            '{"prompt": ..., "completion": ..., "label": true}',
        )
        return None
    rid = record.get("id")
    if rid is not None:
        if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
            ctx.reject("id must be a non-empty string", where, "fix the id, or leave it out")
            return None
        where = f"{where} (id {rid})"
    unpaired = "completion" in record or "label" in record
    try:
        if unpaired:
            prompt, answer, label = _unpaired(record)
        else:
            prompt, chosen, rejected = _sides(record)
    except _Bad as bad:
        ctx.reject(bad.reason, where, bad.fix)
        return None
    meta = parse_meta(record, where, ctx)
    if meta is None:
        return None
    if unpaired:
        messages = (*prompt, answer)
        uid = str(rid) if rid is not None else _content_id(messages, label=label)
        return Example(id=uid, messages=messages, label=label, meta=meta)
    messages = (*prompt, chosen)
    pid = str(rid) if rid is not None else _content_id(messages, rejected)
    return Example(id=pid, messages=messages, rejected=(rejected,), meta=meta)


def _sides(record: Mapping[str, Any]) -> tuple[tuple[Message, ...], Message, Message]:
    unknown = set(record) - FIELDS
    if unknown:
        raise _Bad(
            f"unknown field(s) {', '.join(sorted(unknown))}",
            "preference records hold prompt, chosen, rejected, id and meta (put extras in meta)",
        )
    for side in ("chosen", "rejected"):
        if side not in record:
            raise _Bad(f"no {side!r} field", "each pair needs both chosen and rejected")
    if "prompt" in record:
        prompt = _conversation(record["prompt"], "prompt", as_role="user")
        if not prompt or prompt[-1].role != "user":
            raise _Bad("the prompt must end with a user turn", "end the prompt with the question")
        chosen = _answer(record["chosen"], "chosen")
        rejected = _answer(record["rejected"], "rejected")
    else:  # whole conversations sharing the prompt
        full_c = _conversation(record["chosen"], "chosen", as_role=None)
        full_r = _conversation(record["rejected"], "rejected", as_role=None)
        for name, conv in (("chosen", full_c), ("rejected", full_r)):
            if len(conv) < 2 or conv[-1].role != "assistant":
                raise _Bad(
                    f"the {name} conversation must end with an assistant turn after a prompt",
                    'give both sides whole conversations, or use "prompt" with answers',
                )
        if full_c[:-1] != full_r[:-1]:
            at = next(
                (i for i, (a, b) in enumerate(zip(full_c, full_r, strict=False)) if a != b),
                min(len(full_c), len(full_r)) - 1,
            )
            raise _Bad(
                f"the chosen and rejected conversations differ before their last turn "
                f"(at turn {at}): a pair must share its prompt",
                "make both sides the same conversation up to the final assistant answer",
            )
        prompt, chosen, rejected = full_c[:-1], full_c[-1], full_r[-1]
    _check_order(prompt)
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer.content.strip():
            raise _Bad(f"the {name} answer is empty", f"fill in the {name} answer or drop the pair")
    if chosen.content == rejected.content:
        raise _Bad(
            "chosen and rejected are identical: nothing to prefer",
            "drop the pair, or fix the rejected answer",
        )
    return prompt, chosen, rejected


def _unpaired(record: Mapping[str, Any]) -> tuple[tuple[Message, ...], Message, bool]:
    """An unpaired answer: (prompt, answer, label)."""
    unknown = set(record) - UNPAIRED_FIELDS
    if unknown:
        raise _Bad(
            f"unknown field(s) {', '.join(sorted(unknown))} in an unpaired record",
            "unpaired records hold prompt, completion, label, id and meta; a pair holds "
            "prompt, chosen and rejected (put extras in meta)",
        )
    for field in ("prompt", "completion", "label"):
        if field not in record:
            raise _Bad(
                f"no {field!r} field", "an unpaired record needs prompt, completion and label"
            )
    label = record["label"]
    if not isinstance(label, bool):
        raise _Bad(
            f"label is {json.dumps(label)}, not a boolean",
            "write label as true (a desirable answer) or false (an undesirable one)",
        )
    prompt = _conversation(record["prompt"], "prompt", as_role="user")
    _check_order(prompt)
    answer = _answer(record["completion"], "completion")
    if not answer.content.strip():
        raise _Bad("the completion is empty", "fill in the answer or drop the record")
    return prompt, answer, label


def _conversation(value: Any, field: str, as_role: str | None) -> tuple[Message, ...]:
    """A list of messages, or text: one ``as_role`` turn, or (``as_role`` None) HH text."""
    if isinstance(value, str):
        if as_role is not None:
            return (Message(as_role, value),)
        return _hh_turns(value, field)
    if not isinstance(value, list) or not value:
        raise _Bad(
            f"{field} must be a string or a non-empty list of messages",
            f'e.g. [{{"role": "{as_role or "user"}", "content": "..."}}]',
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or set(m) - {"role", "content"}:
            raise _Bad(f"{field}[{i}] must be a {{role, content}} object", "keep role and content")
        role, content = m.get("role"), m.get("content")
        # a tool turn needs the assistant's tool call before it, which these records cannot
        # hold (role and content only)
        if role not in ROLES or role == "tool" or not isinstance(content, str):
            raise _Bad(
                f"{field}[{i}] has role {role!r} and {type(content).__name__} content",
                "roles are system, user and assistant, content is text",
            )
        out.append(Message(role, content))
    return tuple(out)


def _hh_turns(text: str, field: str) -> tuple[Message, ...]:
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise _Bad(
            f"{field} is text but not an HH conversation",
            'HH text is "\\n\\nHuman: ...\\n\\nAssistant: ..."; or give a list of messages',
        )
    speakers = {"Human": "user", "Assistant": "assistant"}
    return tuple(
        Message(speakers[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)
    )


def _answer(value: Any, field: str) -> Message:
    if isinstance(value, str):
        return Message("assistant", value)
    turns = _conversation(value, field, as_role="assistant")
    if len(turns) != 1 or turns[0].role != "assistant":
        raise _Bad(
            f"{field} must be one assistant answer",
            "give the answer as a string or [{'role': 'assistant', 'content': ...}]",
        )
    return turns[0]


def _check_order(prompt: tuple[Message, ...]) -> None:
    for i, m in enumerate(prompt):
        prev = prompt[i - 1].role if i else None
        if m.role == "system" and i:
            raise _Bad(f"prompt turn {i}: a system message may only come first", "move it first")
        if m.role == prev or (m.role == "assistant" and prev != "user"):
            raise _Bad(
                f"prompt turn {i}: {m.role} after {prev or 'nothing'}",
                "roles must alternate user/assistant after an optional system message",
            )
    if not prompt or prompt[-1].role != "user":
        raise _Bad("the prompt must end with a user turn", "end the prompt with the question")
    if not any(m.content.strip() for m in prompt if m.role == "user"):
        raise _Bad("the prompt is empty", "give the question the answers reply to")


def _content_id(
    messages: tuple[Message, ...], rejected: Message | None = None, label: bool | None = None
) -> str:
    turns = (*messages, rejected) if rejected is not None else messages
    body: list[Any] = [[m.role, m.content] for m in turns]
    if label is not None:  # the same answer labelled the other way is another record
        body.append(label)
    blob = json.dumps(body, ensure_ascii=False).encode()
    kind = "pair" if rejected is not None else "answer"
    return f"{kind}-" + hashlib.sha256(blob).hexdigest()[:16]


@hookimpl
def lorakit_register_sources(register: RegisterSource) -> None:
    register("preference_jsonl", PreferenceJsonlSource)
