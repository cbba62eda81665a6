"""``bleu``: corpus BLEU from ``sacrebleu``, divided by 100 so it reads as a fraction.

With sacrebleu's *effective order*: the geometric mean runs over the n-gram orders (up to 4) that
the predictions have at all. Plain BLEU takes the log of a 4-gram precision of 0/0 when every
answer is shorter than 4 tokens, so a perfect model scored 0 on short answers. Once any
prediction has 4 tokens, every order is counted and the score is plain corpus BLEU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs
from lorakit.api import RegisterMetric, hookimpl, option

from lorakit_plugins.metrics._base import GenerationMetric


@attrs.frozen
class BleuOptions:
    tokenize: Literal["13a", "none", "char", "intl"] = option(
        "13a", doc="sacrebleu tokenizer (13a: the WMT standard; char: for code-like text)"
    )
    lowercase: bool = option(False, doc="compare lower-cased text")


class Bleu(GenerationMetric):
    """Corpus-level BLEU over the split (one reference per prediction)."""

    Options = BleuOptions

    def score_split(
        self, predictions: Sequence[str], references: Sequence[str], stopped: Sequence[bool]
    ) -> float:
        import sacrebleu

        result = sacrebleu.corpus_bleu(
            list(predictions),
            [list(references)],
            tokenize=self.options.tokenize,
            lowercase=self.options.lowercase,
            use_effective_order=True,
        )
        # sacrebleu gives 100.00000000000004 for a perfect match: a fraction stays <= 1
        return min(float(result.score) / 100.0, 1.0)


@hookimpl
def lorakit_register_metrics(register: RegisterMetric) -> None:
    register("bleu", Bleu)
