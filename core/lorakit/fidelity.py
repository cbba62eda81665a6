"""Train it the way it is served: checks that what the model sees at inference is what it was
trained on.

* :func:`train_serve_problems`: for a sample of training conversations and every assistant
  turn, the prompt an inference server renders for it (the history plus the generation prompt,
  ``Formatter.render_prompt``) and the conversation rendered up to that turn (as it was when
  the turn was the latest) must both be token prefixes of the training text, and every
  supervised assistant turn must end with the end-of-turn token that generation stops at. A
  template that renders history differently (reasoning templates that drop earlier thinking, a
  date or tool preamble added only with a generation prompt) trains the model on text it never
  sees, or never produces, when served.
* :func:`served_prompt`: the prompt for a conversation as training rendered it, its example's
  ``tools`` included (eval's generation metrics, ``lorakit generate``, the checks here).
* :func:`training_system_prompt`: the one system prompt every training conversation starts with
  (the demo task's instruction, say). The adapter records it; ``generate``, the saved chat
  template's default and the export's Modelfile then use it, so the model is prompted as it was
  trained, not with the base model's default system prompt.

``lorakit check`` and the start of ``lorakit run`` call the first; the run records the second.
Both read examples already in hand and tokenize a few dozen texts: milliseconds.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lorakit.contracts import Example


def served_prompt(
    formatter: Any,
    messages: Sequence[Any],
    tokenizer: Any,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """``formatter.render_prompt`` with the conversation's ``tools``, as training renders them
    (a formatter written before tools existed is called as before when there are none)."""
    if not tools:
        return str(formatter.render_prompt(messages, tokenizer))
    return str(formatter.render_prompt(messages, tokenizer, tools=tools))


SAMPLE = 16  # conversations checked: the template is one function, a few examples show a fault


def _ids(texts: list[str], tokenizer: Any) -> list[list[int]]:
    from lorakit.data.tokenize import encode_with_offsets

    return encode_with_offsets(texts, tokenizer)[0]


def _token(tokenizer: Any, token_id: int | None) -> str:
    if token_id is None:
        return "(the end of the text)"
    backend = getattr(tokenizer, "backend_tokenizer", None)  # transformers' fast, or lite
    if backend is not None:
        return repr(backend.id_to_token(token_id))
    return repr(tokenizer.convert_ids_to_tokens(token_id))


def train_serve_problems(
    formatter: Any, tokenizer: Any, examples: Iterable[Example], sample: int = SAMPLE
) -> list[str]:
    """What differs between training and serving, for up to ``sample`` multi-role conversations
    of ``examples`` (empty: none). Each problem names the example, the assistant turn and the
    first token that differs."""
    eot = formatter.end_of_turn(tokenizer)
    problems: list[str] = []
    conversations = (e for e in examples if e.messages and any(_assistant(e)))
    for ex in itertools.islice(conversations, sample):
        messages = ex.messages or ()
        turns = list(_assistant(ex))
        rendered = formatter.render(ex, tokenizer)
        # per assistant turn: the prompt served for it, and the conversation ending with it
        # (how it renders while it is the latest turn, as when it was generated)
        prompts = [served_prompt(formatter, messages[:i], tokenizer, ex.tools) for i in turns]
        ends = [
            formatter.render(
                Example(id=ex.id, messages=messages[: i + 1], tools=ex.tools), tokenizer
            ).text
            for i in turns[:-1]
        ]
        full, *rest = _ids([rendered.text, *prompts, *ends], tokenizer)
        checks = [("the prompt rendered for inference", ids) for ids in rest[: len(turns)]]
        checks += [("the conversation up to this turn", ids) for ids in rest[len(turns) :]]
        for n, (what, ids) in enumerate(checks):
            if full[: len(ids)] == ids:
                continue
            at = next(
                (k for k, (a, b) in enumerate(zip(full, ids, strict=False)) if a != b), len(full)
            )
            trained = full[at] if at < len(full) else None
            served = ids[at] if at < len(ids) else None
            problems.append(
                f"example {ex.id!r}, assistant turn {n % len(turns) + 1}: {what} renders "
                f"otherwise than the training text: at token {at} training has "
                f"{_token(tokenizer, trained)}, served {_token(tokenizer, served)}"
            )
        supervised = [s.text for s in rendered.segments if s.supervised]
        for n, text in enumerate(supervised, 1):
            if not text.endswith(eot):
                problems.append(
                    f"example {ex.id!r}, assistant turn {n}: the supervised text does not end "
                    f"with the end-of-turn {eot!r} that generation stops at, so the model does "
                    "not learn to stop there"
                )
    return problems


def _assistant(ex: Example) -> Iterable[int]:
    return (i for i, m in enumerate(ex.messages or ()) if m.role == "assistant" and i > 0)


TRAIN_SERVE_FIX = (
    "serve the model with a template that renders history the way training did: pick another "
    '[format] plugin (e.g. "chatml" for a ChatML model), or train on conversations with one '
    "assistant turn (a reasoning template that drops earlier thinking renders the last turn "
    "alike)"
)


def training_system_prompt(
    examples: Iterable[Example], default: str | None = None
) -> tuple[str | None, str]:
    """``(prompt, note)``: the system prompt every conversation of ``examples`` was trained
    with (its own first message, else ``default``: the formatter's ``system_prompt``), or None
    with a note when they had several (or some had none): then none is used by default.
    Conversations without any system prompt give ``(None, "")``."""
    seen: set[str | None] = set()
    for ex in examples:
        if not ex.messages:
            continue
        first = ex.messages[0]
        seen.add(first.content if first.role == "system" else default)
        if len(seen) > 1:
            break
    if seen == {None} or not seen:
        return None, ""
    if len(seen) == 1:
        return next(iter(seen)), ""
    return None, (
        "the training conversations have different system prompts (or some have none): "
        "none is used by default; pass one with `lorakit generate --system TEXT`"
    )


def with_default_system(chat_template: str, system: str) -> str:
    """``chat_template`` that inserts ``system`` as the first message of a conversation that
    has none, the way the model was trained (a Jinja ``set`` before the template's body)."""
    # a JSON string is a Jinja string literal (Jinja reads its backslash escapes); non-ASCII
    # characters stay as they are, so no surrogate escapes
    literal = json.dumps(system, ensure_ascii=False)
    head = (
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
        "{%- endif %}"
    )
    return head + chat_template


def system_messages(system: str | None, messages: Sequence[Any]) -> list[Any]:
    """``messages`` with ``system`` first when they have no system message."""
    from lorakit.contracts import Message

    if system is None or (messages and messages[0].role == "system"):
        return list(messages)
    return [Message("system", system), *messages]
