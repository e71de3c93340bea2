"""Options shared by CLI commands, declared once: model selection (``--model/--decoder/--encoder/--k/--dtype``)
as one reusable group that hands the command a typed :class:`ModelChoice`, plus JSON output and torch set-up.

An option group is a decorator: it adds its flags to the command's signature (what typer reads) and passes
the command one typed object built from them, so a command's own parameters are only its own options.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Annotated, Any, TypeVar, get_args

import typer

from refrag.config import (
    DEFAULT_DECODER,
    DEFAULT_ENCODER,
    DEFAULT_EXPAND_FRACTION,
    DEFAULT_K,
    DEFAULT_POLICY,
    PolicyName,
)
from refrag.relevance import HitFilter

T = TypeVar("T")

Json = Annotated[bool, typer.Option("--json", help="print machine-readable JSON only")]
RefineSteps = Annotated[int, typer.Option(help="refine each passage's chunk encodings by this many steps (0: off; "
                                               "~10 x steps the chunk-encoding time; docs/index.md, \"Refined "
                                               "chunk encodings\")", min=0)]
Checkpoint = Annotated[
    str | None, typer.Option("--model", "-m", help="refrag checkpoint folder (default: the shipped compressor)")
]
Decoder = Annotated[str | None, typer.Option(
    help=f"decoder: built-in name, folder or Hugging Face id (default: {DEFAULT_DECODER}, or the checkpoint's / "
         "the index's)", show_default=False)]
Encoder = Annotated[str | None, typer.Option(
    help=f"chunk encoder: built-in name, folder or Hugging Face id (default: {DEFAULT_ENCODER}, or the "
         "checkpoint's / the index's)", show_default=False)]
K = Annotated[int | None, typer.Option("--k", help=f"decoder tokens per compressed chunk (default: {DEFAULT_K}, "
                                                   "or the checkpoint's / the index's)", show_default=False)]
DType = Annotated[str, typer.Option(help="auto (bfloat16 where the CPU / GPU multiplies it natively: AVX512-BF16, "
                                          "AMX or a bf16 GPU; else float32), bfloat16 or float32")]
DecoderAdapter = Annotated[str | None, typer.Option(
    help="a PEFT LoRA adapter of the decoder (folder or HF id), merged in: full mode = decoder + adapter",
    show_default=False)]
Quantize = Annotated[str | None, typer.Option(
    help="int8 or int4: weight-only quantization of the decoder for inference (pip install 'refrag\\[quantize]'); "
         "none: not even when the checkpoint records a scheme",
    show_default=False)]
AnswerAdapter = Annotated[bool, typer.Option(
    help="run the checkpoint's answer adapter (answer_adapter/: trained for answering questions) in refrag mode; "
         "--no-answer-adapter: the compressor alone, as the perplexity protocol reads it")]
Threads = Annotated[int | None, typer.Option(
    help="torch CPU threads (default: one per core; 1 when other processes keep a core busy)", show_default=False)]


def flag(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def option_group(target: str, build: Callable[..., Any], params: tuple[inspect.Parameter, ...]):
    """A decorator adding ``params`` to a command's flags; the command receives ``build(**values)`` as ``target``."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != target]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = {p.name: kwargs.pop(p.name, p.default) for p in params}
            return fn(*args, **kwargs, **{target: build(**values)})

        command.__signature__ = signature.replace(parameters=[*own, *params])  # type: ignore[attr-defined]
        return command

    return decorate


def apply_threads(threads: int | None) -> None:
    """``--threads``: ``torch.set_num_threads`` when it was given (before any model work)."""
    if threads is None:
        return
    from refrag.errors import InputError

    if threads < 1:
        raise InputError(f"--threads must be >= 1 (got {threads}).")
    import torch

    torch.set_num_threads(threads)


@dataclass(frozen=True)
class ModelChoice:
    """What the user asked for: a checkpoint, or decoder + encoder + k (None: the default, or the checkpoint's /
    the index's)."""

    checkpoint: str | None = None
    decoder: str | None = None
    encoder: str | None = None
    k: int | None = None
    dtype: str = "auto"  # refrag.precision
    threads: int | None = None  # torch CPU threads; None: torch's default (one per core)
    decoder_adapter: str | None = None  # a user's LoRA adapter of the decoder (refrag.user_adapter)
    quantize: str | None = None  # "int8" / "int4" (refrag.quantize)
    answer_adapter: bool = True  # the checkpoint's answer adapter, when it has one (refrag.checkpoint.load)

    def load(self, *, progress: bool = True, merge: bool = True):
        """The RefragModel (``refrag.load_model``), after ``apply_threads``."""
        from refrag.checkpoint import load_model

        apply_threads(self.threads)
        return load_model(self.checkpoint, decoder=self.decoder, encoder=self.encoder, k=self.k, dtype=self.dtype,
                          progress=progress, merge=merge, decoder_adapter=self.decoder_adapter, quantize=self.quantize,
                          answer_adapter=self.answer_adapter)

    def pipeline(self, index_path, *, progress: bool = True):
        """The index at ``index_path`` with its model (unset parts taken from what built it) as a Pipeline."""
        from refrag.index import Index
        from refrag.pipeline import Pipeline

        index = Index.open(index_path)
        return Pipeline(index, self.for_index(index).load(progress=progress))

    def for_index(self, index) -> ModelChoice:
        """Unset parts taken from what built ``index``: the checkpoint whose fine-tuned encoder it stores, else
        its recorded decoder, chunk encoder and k."""
        from pathlib import Path

        from refrag.checkpoint import MANIFEST

        if self.checkpoint is not None:
            return self
        key = index.manifest.model
        built_from = Path(key.chunk_encoder).parent  # a checkpoint that saved its fine-tuned encoder
        if self.decoder is self.encoder is self.k is None and (built_from / MANIFEST).exists():
            return replace(self, checkpoint=str(built_from))
        from refrag.encoders import BUILT_FROM_DECODER

        if key.chunk_encoder in BUILT_FROM_DECODER:  # trained from the decoder: its weights live in a checkpoint
            from refrag.errors import InputError

            raise InputError(f"{index.path} was built with a trained `{key.chunk_encoder}` chunk encoder: pass the "
                             "checkpoint that built it with --model.")
        return replace(self, decoder=self.decoder or index.manifest.decoder, encoder=self.encoder or key.chunk_encoder,
                       k=self.k or key.k, decoder_adapter=self.decoder_adapter or index.manifest.decoder_adapter)


def model_options(*, checkpoint: bool = True, k: bool = True, dtype: bool = True, threads: bool = True,
                  quantize: bool = True, answer_adapter: bool = True):
    """The model-selection flags as one group (a command receives ``choice: ModelChoice``); ``k=False`` for a
    command that declares its own ``--k`` (several compression rates), ``checkpoint=False`` where ``--init``
    names the checkpoint, ``threads=False`` where another group declares ``--threads`` (training's loop),
    ``quantize=False`` where the decoder never runs (index building encodes chunks only); ``answer_adapter``: the
    default of ``--answer-adapter`` (False where the compressor is measured on text: perplexity, reconstruction)."""
    params = [flag("decoder", Decoder, None), flag("decoder_adapter", DecoderAdapter, None), flag("encoder", Encoder, None)]
    params = ([flag("model", Checkpoint, None)] if checkpoint else []) + params
    params += ([flag("k", K, None)] if k else []) + ([flag("dtype", DType, "auto")] if dtype else [])
    params += [flag("threads", Threads, None)] if threads else []
    params += [flag("quantize", Quantize, None)] if dtype and quantize else []  # inference (training: no --dtype)
    params += [flag("answer_adapter", AnswerAdapter, answer_adapter)] if dtype else []

    def build(model: str | None = None, decoder: str | None = None, encoder: str | None = None,
              k: int | None = None, dtype: str = "auto", threads: int | None = None,
              decoder_adapter: str | None = None, quantize: str | None = None,
              answer_adapter: bool = answer_adapter) -> ModelChoice:
        if quantize is not None and quantize not in ("int8", "int4", "none"):
            from refrag.errors import InputError

            raise InputError(f"--quantize must be int8, int4 or none (got {quantize!r}).")  # before any model loads
        return ModelChoice(model, decoder, encoder, k, dtype, threads, decoder_adapter, quantize, answer_adapter)

    return option_group("choice", build, tuple(params))


def comma_list(spec: str, convert: Callable[[str], T], option: str) -> tuple[T, ...]:
    """``"0.1,0.25"`` -> (0.1, 0.25); an error names the option and the bad item."""
    from refrag.errors import InputError

    items = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        try:
            items.append(convert(item))
        except ValueError as e:
            raise InputError(f"{option}: {item!r} is not a valid {convert.__name__}.") from e
    return tuple(items)


@dataclass(frozen=True)
class ExpansionChoice:
    """Which chunks stay raw tokens in refrag mode: a policy and a budget (a fraction of the chunks, or decoder
    positions)."""

    policy: str = DEFAULT_POLICY
    fraction: float = DEFAULT_EXPAND_FRACTION
    tokens: int | None = None

    def compression(self, mode: str):
        """The CompressionOptions for ``mode`` (validated there)."""
        from refrag.config import CompressionOptions

        return CompressionOptions(mode=mode, policy=self.policy, expand_fraction=self.fraction,  # type: ignore[arg-type]
                                  expand_tokens=self.tokens)


def expansion_options(*, policy: str = DEFAULT_POLICY, fraction: float = DEFAULT_EXPAND_FRACTION):
    """``--policy / --expand-fraction / --expand-tokens`` as one group (the command receives
    ``expansion: ExpansionChoice``). The default (lexical-passage, 10% of the chunks raw) measured best on
    held-out NQ at 25% of full mode's decoder positions; ``--policy none`` is plain REFRAG."""
    params = (
        flag("policy", Annotated[str, typer.Option(
            help=f"which chunks stay raw tokens in refrag mode: {', '.join(get_args(PolicyName))}")], policy),
        flag("expand_fraction", Annotated[float, typer.Option(
            help="budget: fraction of the chunks kept raw (refrag mode)")], fraction),
        flag("expand_tokens", Annotated[int | None, typer.Option(
            help="budget instead: at most this many decoder positions on raw chunks", show_default=False)], None),
    )

    def build(policy: str, expand_fraction: float, expand_tokens: int | None) -> ExpansionChoice:
        if expand_tokens is not None and expand_fraction == fraction:
            expand_fraction = 0.0  # a token budget replaces the default fraction (both given: an error below)
        choice = ExpansionChoice(policy, expand_fraction, expand_tokens)
        choice.compression("refrag")  # validate now, before any model loads
        return choice

    return option_group("expansion", build, params)


def setup_torch() -> None:
    """Quiet third-party logs (refrag shows its own progress)."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # per-load "Loading weights" bars; refrag shows its own progress


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def filter_options():
    """``--min-score / --relative-score / --dedup``: relevance filtering of retrieved passages (the command
    receives ``hit_filter: HitFilter``)."""
    opt = typer.Option
    params = (
        flag("min_score", Annotated[float | None, opt(help="drop retrieved passages scoring below this (cosine)",
                                                      show_default=False)], None),
        flag("relative_score", Annotated[float | None, opt(help="drop passages scoring below this fraction of the "
                                                                "best one's score, in (0, 1]", show_default=False)],
             None),
        flag("dedup", Annotated[float | None, opt(help="drop a passage whose word overlap (Jaccard) with a kept one "
                                                       "is at least this, in (0, 1] (e.g. 0.8)", show_default=False)],
             None),
    )

    def build(min_score: float | None, relative_score: float | None, dedup: float | None) -> HitFilter:
        return HitFilter(min_score, relative_score, dedup)

    return option_group("hit_filter", build, params)
