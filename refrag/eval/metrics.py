"""Answer metrics (SQuAD-style normalisation): exact match, token F1, answer contained; a paired bootstrap to
tell a difference between two methods from noise."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles (a, an, the), collapse whitespace."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Best bag-of-tokens F1 between the normalised prediction and any gold answer."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if not pred or not gold:
            best = max(best, float(pred == gold))
        elif common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def contains_answer(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when any normalised gold answer occurs inside the normalised prediction (as whole words)."""
    pred = f" {normalize_answer(prediction)} "
    return float(any(f" {normalize_answer(a)} " in pred for a in answers if normalize_answer(a)))


@dataclass(frozen=True)
class Difference:
    """Mean of a - b over paired items, with a paired-bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    level: float  # e.g. 0.95

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, samples: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> Difference:
    """Mean difference a - b over the same items (e.g. questions) and its percentile interval: the items are
    resampled with replacement ``samples`` times, keeping each item's pair together."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_bootstrap needs two non-empty lists of one length (got {len(a)}, {len(b)}).")
    import torch

    diffs = torch.tensor([x - y for x, y in zip(a, b)], dtype=torch.float64)  # [n]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(diffs), (samples, len(diffs)), generator=generator)  # [samples, n]
    tail = (1 - level) / 2
    low, high = torch.quantile(diffs[picks].mean(1), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Difference(float(diffs.mean()), low, high, level)
