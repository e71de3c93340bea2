"""The perplexity protocol's methods as a small typed vocabulary: what precedes the scored tokens, the name
summaries and reports print, and (for the report's plot) the compression rate it applies. No torch import."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

MethodKind = Literal["no_context", "full", "truncated", "refrag", "no_context_adapter", "foreign_vectors"]
# Controls: ``no_context_adapter`` (with a decoder adapter): the adapter alone, no context; it separates what the
# compressed context brings from what the adapter learnt about text in general. ``foreign_vectors``: REFRAG
# (first k) reading the chunk vectors of ANOTHER example's context: what the vectors bring that is not about this
# example (their mere presence, generic text statistics). refrag{k} minus this is the context's own.
ADAPTER_CONTROL = "no_context_adapter"
FOREIGN_CONTROL = "foreign_vectors"


@dataclass(frozen=True)
class Method:
    """What precedes the scored output tokens. Its ``name`` is what summaries and reports print."""

    kind: MethodKind
    k: int = 0  # refrag / foreign_vectors: the compression rate
    positions: int = 0  # truncated: the last ``positions`` context tokens
    policy: str | None = None  # refrag with raw chunks: the policy that chose them (refrag.policy)
    expanded: int = 0  # refrag: chunks kept as raw tokens
    percent: int = 0  # refrag: the expand fraction in percent (its name)
    first: bool = False  # truncated: the first k's baseline, named plain ``truncated``
    refined: bool = False  # refrag: the chunk encodings refined per context first (``refrag.refine``)

    @property
    def name(self) -> str:
        if self.kind == "truncated":
            return "truncated" if self.first else f"truncated{self.positions}"
        if self.kind == "refrag":
            return (f"refrag{self.k}" + ("-refined" if self.refined else "")
                    + (f"+{self.policy}{self.percent}" if self.policy else ""))
        return self.kind

    def rate(self, s: int) -> float | None:
        """Context tokens per decoder position this method gives the decoder; None for what is not a rate (no
        context, the controls, expanded REFRAG)."""
        if self.kind == "full":
            return 1.0
        if self.kind == "truncated":
            return s / self.positions
        return float(self.k) if self.kind == "refrag" and not self.policy else None

    @classmethod
    def from_name(cls, name: str, s: int, first_k: int) -> Method | None:
        """The method a summary's name stands for (None for a name this refrag does not know)."""
        if name in ("no_context", "full", ADAPTER_CONTROL, FOREIGN_CONTROL):
            return cls(name, k=first_k if name == FOREIGN_CONTROL else 0)  # type: ignore[arg-type]
        if name == "truncated":
            return cls("truncated", positions=s // first_k, first=True)
        if m := re.fullmatch(r"truncated(\d+)", name):
            return cls("truncated", positions=int(m[1]))
        if m := re.fullmatch(r"refrag(\d+)(?:(-refined)|\+([a-z][a-z-]*[a-z])(\d+))?", name):
            return cls("refrag", k=int(m[1]), refined=bool(m[2]), policy=m[3], percent=int(m[4] or 0))
        return None
