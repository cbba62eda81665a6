"""``bleu``: corpus BLEU from ``sacrebleu``, divided by 100 so it reads as a fraction."""

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
        )
        return float(result.score) / 100.0


@hookimpl
def lorakit_register_metrics(register: RegisterMetric) -> None:
    register("bleu", Bleu)
