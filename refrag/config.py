"""Typed options for refrag. Imports no torch, so the CLI and config parsing stay light.

Every dataclass validates itself in ``__post_init__`` and names the option the user must change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from refrag.errors import InputError

Mode = Literal["full", "refrag"]  # full: every chunk as tokens (plain RAG); refrag: compressed chunks
DType = Literal["bfloat16", "float32"]  # fp16 overflows with inputs_embeds
Pooling = Literal["mean", "cls", "last", "memory"]  # text encoders: mean / cls; the self-encoder: mean / last / memory
# where the compressor's decoder adapter applies in a compressed input: every position, or the chunk vectors' only
AdapterScope = Literal["sequence", "chunks"]
PolicyName = Literal[
    "none", "first", "last", "random", "similarity", "lexical", "lexical-passage", "perplexity-desc", "perplexity-asc",
    "learned",
]  # which chunks stay raw (refrag.policy; "learned": the checkpoint's trained policy, refrag.learned_policy)

DEFAULT_DECODER = "smollm2-135m"
DEFAULT_ENCODER = "self"  # chunk encoder of the shipped compressor: the decoder's first layers + LoRA
DEFAULT_RETRIEVAL_ENCODER = "all-minilm-l6-v2"  # sentence-transformers model for passage / query vectors
DEFAULT_K = 16  # decoder tokens per chunk (the paper's REFRAG16)


def check_fraction(value: float, option: str, *, below_one: bool = False) -> None:
    """The one range check of a fraction of chunks: [0, 1], or [0, 1) where expanding every chunk is refused
    (training and scoring need at least one compressed chunk)."""
    ok = isinstance(value, int | float) and 0.0 <= value and (value < 1.0 if below_one else value <= 1.0)
    if not ok:
        raise InputError(f"{option} must be in [0, {'1)' if below_one else '1]'} (got {value!r}).")


def check_question(question: object) -> str:
    """A question is non-blank text (checked before any model loads)."""
    if not isinstance(question, str) or not question.strip():
        raise InputError("question is empty: ask something.")
    return question


def check_top_k(top_k: object) -> int:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0:
        raise InputError(f"top_k must be a positive integer (got {top_k!r}).")
    return top_k


def check_choice(value: object, choices: type, option: str) -> None:
    """``value`` must be one of a Literal's values (the vocabulary is declared once, as that Literal)."""
    if value not in (allowed := get_args(choices)):
        raise InputError(f"{option} must be one of {', '.join(map(str, allowed))} (got {value!r}).")


@dataclass(frozen=True)
class ChunkingOptions:
    """How text is cut, in DECODER token space."""

    k: int = DEFAULT_K  # decoder tokens per chunk; one decoder position per compressed chunk
    passage_tokens: int = 256  # max decoder tokens per passage (retrieval unit)

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k <= 0:
            raise InputError(f"k must be a positive integer (got {self.k!r}); the paper uses k=16.")
        if not isinstance(self.passage_tokens, int) or self.passage_tokens < self.k:
            raise InputError(
                f"passage_tokens must be an integer >= k={self.k} (got {self.passage_tokens!r})."
            )


# What `ask`, `generate`, `serve` and CompressionOptions use when no policy / budget is given: the best refrag rows
# on held-out NQ at a tenth of the chunks raw (docs/policies.md, 2026-12-06).
DEFAULT_POLICY: PolicyName = "lexical-passage"
DEFAULT_EXPAND_FRACTION = 0.1


@dataclass(frozen=True)
class CompressionOptions:
    """Which context chunks the decoder reads as vectors and which as raw tokens."""

    mode: Mode = "refrag"  # "full": every chunk as tokens (plain RAG); "refrag": compressed
    expand_fraction: float = 0.0  # p: fraction of chunks kept as raw tokens in refrag mode
    expand_tokens: int | None = None  # or: at most this many decoder positions spent on raw chunks
    policy: PolicyName = DEFAULT_POLICY  # which chunks to keep raw (refrag.policy); used when a budget is given
    seed: int = 0  # for policy="random"

    def __post_init__(self) -> None:
        check_choice(self.mode, Mode, "mode")
        check_fraction(self.expand_fraction, "expand_fraction")
        check_choice(self.policy, PolicyName, "policy")
        if self.expand_tokens is not None:
            if not isinstance(self.expand_tokens, int) or self.expand_tokens < 0:
                raise InputError(f"expand_tokens must be an integer >= 0 (got {self.expand_tokens!r}).")
            if self.expand_fraction:
                raise InputError("give the expansion budget once: expand_fraction or expand_tokens, not both.")


@dataclass(frozen=True)
class SamplingOptions:
    """Decoding settings. temperature == 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # generation ends when the text contains one of these (it is cut off)
    seed: int | None = None
    ignore_eos: bool = False  # keep generating past EOS (benchmarks: a fixed number of tokens)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be a positive integer (got {self.max_new_tokens!r}).")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (got {self.temperature!r}); 0 means greedy.")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1] (got {self.top_p!r}).")
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass
class RefragConfig:
    """What a RefragModel is made of; saved as the checkpoint manifest."""

    decoder: str = DEFAULT_DECODER  # built-in name, local folder or HF id (or "decoder" inside a checkpoint)
    encoder: str = DEFAULT_ENCODER  # a text encoder (name / folder / HF id), "self" or "tokens" (refrag.encoders)
    k: int = DEFAULT_K
    pooling: Pooling = "mean"
    encoder_max_tokens: int = 64  # encoder-tokenizer cap for one chunk's text (k decoder tokens fit easily)
    encoder_layers: int = 8  # "self": how many of the decoder's first layers read the chunk
    encoder_lora_rank: int = 32  # "self": rank of the LoRA adapter on those layers
    dtype: DType = "bfloat16"
    target_rms: float | None = None  # RMS of decoder token embeddings; measured at construction if None
    extra: dict[str, str] = field(default_factory=dict)  # provenance (training stage, data, ...)
    decoder_adapter: str | None = None  # a user's PEFT LoRA adapter of the decoder, merged in at load (user_adapter)
    decoder_adapter_sha256: str | None = None  # its digest, recorded when a compressor is made with it
    quantize: str | None = None  # "int8" / "int4": the decoder's weights quantized at load_model (refrag.quantize)
    adapter_scope: AdapterScope = "sequence"  # "chunks": text positions always run the original decoder

    def __post_init__(self) -> None:
        ChunkingOptions(k=self.k, passage_tokens=max(self.k, 256))
        check_choice(self.pooling, Pooling, "pooling")
        check_choice(self.adapter_scope, AdapterScope, "adapter_scope")
        if self.encoder_max_tokens < 4:
            raise InputError(f"encoder_max_tokens must be >= 4 (got {self.encoder_max_tokens}).")
        if self.encoder_layers < 1 or self.encoder_lora_rank < 1:
            raise InputError(f"encoder_layers and encoder_lora_rank must be >= 1 (got {self.encoder_layers}, "
                             f"{self.encoder_lora_rank}).")
        if self.dtype not in get_args(DType):
            raise InputError(
                f"dtype must be bfloat16 or float32 (got {self.dtype!r}); fp16 overflows with inputs_embeds."
            )
