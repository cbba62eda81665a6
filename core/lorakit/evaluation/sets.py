"""One split prepared for scoring, once, and shared by the base and the tuned model.

Loss metrics read ``rows`` (tokenized exactly like training, completion-only labels).
Generation metrics read ``prompts``: the conversation up to its last assistant turn rendered
with the formatter's generation prompt (and the example's tools, as in training); the reference is that last assistant turn's content.
Examples that cannot give a prompt (raw text, no assistant turn) are counted, not dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from lorakit.contracts import Example
from lorakit.data.pipeline import DataReport, tokenize_examples
from lorakit.data.special_text import conversation_special_token
from lorakit.data.tokenize import Tokenized
from lorakit.fidelity import served_prompt


@attrs.frozen
class EvalSet:
    split: str
    n_examples: int
    rows: Sequence[Tokenized]  # memory-mapped (data/row_files.py)
    ids: list[str]
    inputs: list[str]  # the last user message of each prompt (for side-by-side reports)
    prompts: list[str]
    references: list[str]
    skipped: dict[str, int]  # reason -> count
    pairs: list[Any] = attrs.field(factory=list)  # PairRows, with a preference objective
    answers: list[Any] = attrs.field(factory=list)  # AnswerRows (KTO's labelled answers)
    truncated: int = 0  # loss rows cut to train.max_length and scored so (data.overlength)

    def counts(self) -> dict[str, Any]:
        out = {
            "examples": self.n_examples,
            "loss_examples": len(self.rows),
            "supervised_tokens": sum(r.n_supervised for r in self.rows),
            "generated": len(self.prompts),
            "skipped": dict(self.skipped),
        }
        if self.pairs:
            out["pairs"] = len(self.pairs)
        if self.answers:
            out["answers"] = len(self.answers)
        if self.truncated:  # scored, but on their first train.max_length tokens
            out["truncated"] = self.truncated
        return out


def prompt_and_reference(example: Example) -> tuple[list[Any], str] | None:
    """(messages before the last assistant turn, its content), or None when there is none."""
    if not example.messages:
        return None
    last = max((i for i, m in enumerate(example.messages) if m.role == "assistant"), default=None)
    if last is None or last == 0:
        return None
    return list(example.messages[:last]), example.messages[last].content


def prepare_set(
    split: str,
    examples: Sequence[Example],
    formatter: Any,
    tokenizer: Any,
    *,
    max_length: int,
    overlength: str,
    max_examples: int | None,
    generation: bool,
    pairs: bool = False,
    answers: bool = False,
) -> EvalSet:
    """``pairs``: both sides of each pair tokenized too (a preference objective); ``answers``
    (KTO): each labelled answer tokenized (an unpaired example's, or both of a pair's), and
    only the pairs among the examples kept as pairs."""
    chosen = list(examples[:max_examples] if max_examples is not None else examples)
    # An eval split must not stop a run: a conversation that spells a special token (which
    # `lorakit run` refuses before training; a run made before that check may hold one) is
    # not scored, over-long examples are dropped, each counted.
    spelling: dict[str, int] = {}
    scored = []
    for ex in chosen:
        spelled = conversation_special_token(ex, tokenizer)
        if spelled:
            key = f"a message spells the special token {spelled[1]!r} (not scored)"
            spelling[key] = spelling.get(key, 0) + 1
        else:
            scored.append(ex)
    chosen = scored
    report = DataReport()
    policy = "drop" if overlength == "error" else overlength
    rows = tokenize_examples(chosen, formatter, tokenizer, max_length, policy, report)
    skipped: dict[str, int] = {f"loss: {k}": v for k, v in report.dropped.items()}
    skipped.update(spelling)
    ids: list[str] = []
    inputs: list[str] = []
    prompts: list[str] = []
    refs: list[str] = []
    if generation:
        for ex in chosen:
            if ex.label is False:  # an undesirable answer is no reference to match
                key = "generation: an undesirable answer (label false) is no reference"
                skipped[key] = skipped.get(key, 0) + 1
                continue
            pair = prompt_and_reference(ex)
            if pair is None:
                key = "generation: no assistant turn to compare against"
                skipped[key] = skipped.get(key, 0) + 1
                continue
            msgs, ref = pair
            ids.append(ex.id)
            inputs.append(next((m.content for m in reversed(msgs) if m.role == "user"), ""))
            prompts.append(served_prompt(formatter, msgs, tokenizer, ex.tools))
            refs.append(ref)
    pair_rows: list[Any] = []
    if pairs:  # both sides of each pair, for preference accuracy and margin
        from lorakit.data.pairs import tokenize_pairs

        pair_report = DataReport()
        paired = [ex for ex in chosen if ex.rejected is not None] if answers else chosen
        pair_rows = tokenize_pairs(paired, formatter, tokenizer, max_length, "drop", pair_report)
        skipped.update({f"pairs: {k}": v for k, v in pair_report.dropped.items()})
    answer_rows: list[Any] = []
    if answers:  # desirable and undesirable answers, for their mean log-probabilities
        from lorakit.data.unpaired import tokenize_answers

        answer_report = DataReport()
        answer_rows = tokenize_answers(
            chosen, formatter, tokenizer, max_length, "drop", answer_report
        )
        skipped.update({f"answers: {k}": v for k, v in answer_report.dropped.items()})
    return EvalSet(
        split,
        len(chosen),
        rows,
        ids,
        inputs,
        prompts,
        refs,
        skipped,
        pair_rows,
        answer_rows,
        truncated=report.truncated,
    )
