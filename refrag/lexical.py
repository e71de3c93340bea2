"""BM25 (Lucene's idf, k1 = 1.2, b = 0.75) over a list of texts: the lexical expansion policy scores a request's
chunks with it, and the QA data builder retrieves distractor passages from a corpus with it."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

_WORD = re.compile(r"\w+")
_STOPWORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "by", "did", "do", "does", "for", "from", "had", "has", "have",
    "how", "i", "in", "is", "it", "its", "of", "on", "or", "that", "the", "this", "to", "was", "were", "what",
    "when", "where", "which", "who", "whom", "whose", "why", "will", "with",
})


def terms(text: str) -> list[str]:
    """Lower-cased word tokens without stop words (what lexical matching compares)."""
    return [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


class BM25:
    """Term statistics of ``docs``; ``scores(query)`` is one BM25 score per document (0 without a shared term)."""

    def __init__(self, docs: Sequence[str], k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.counts = [Counter(terms(d)) for d in docs]
        self.lengths = [sum(c.values()) for c in self.counts]
        self.mean_length = sum(self.lengths) / max(len(docs), 1) or 1.0
        self.postings: dict[str, list[int]] = defaultdict(list)  # term -> documents holding it
        for i, c in enumerate(self.counts):
            for t in c:
                self.postings[t].append(i)

    def scores(self, query: str) -> list[float]:
        out = [0.0] * len(self.counts)
        n = len(self.counts)
        for t in set(terms(query)):
            docs = self.postings.get(t, ())
            idf = math.log(1 + (n - len(docs) + 0.5) / (len(docs) + 0.5))
            for i in docs:
                tf = self.counts[i][t]
                norm = self.k1 * (1 - self.b + self.b * self.lengths[i] / self.mean_length)
                out[i] += idf * tf * (self.k1 + 1) / (tf + norm)
        return out
