"""Compressed or full-context generation: prefill from embeddings, then KV-cached decoding, with timings.

TTFT is measured from the call (the question arriving) to the first sampled token, and includes prompt
tokenisation, chunk encoding when vectors are not precomputed, projection, prefill and the first sample.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel

from refrag.chunking import Chunk, Passage, request_chunks, split_passages
from refrag.config import ChunkingOptions, CompressionOptions, SamplingOptions
from refrag.errors import CheckpointError, InputError
from refrag.modeling import DecoderInputs, Layout, RefragModel
from refrag.policy import Expansion, ExpansionPolicy, choose_expanded
from refrag.prompting import PromptTemplate, rag_layout

FinishReason = Literal["eos", "stop", "length", "cancelled"]
TextCallback = Callable[[int, str], None]  # (batch row, new text)
Cancelled = Callable[[int], bool]  # (batch row) -> stop generating for it now (e.g. its client went away)


@dataclass(frozen=True)
class Request:
    """One question with its retrieved context.

    ``encoded``: optional precomputed encoder outputs, one [L_i, E] tensor per passage (the "cached" path,
    e.g. from an index); when None the chunks are encoded at query time.
    """

    question: str
    passages: tuple[Passage, ...]
    encoded: tuple[torch.Tensor, ...] | None = None

    @classmethod
    def from_texts(
        cls, question: str, contexts: Sequence[str], tokenizer, chunking: ChunkingOptions = ChunkingOptions()
    ) -> Request:
        """Split raw context strings into passages and chunks in the decoder's token space."""
        if isinstance(contexts, str):
            contexts = [contexts]
        passages = [p for text in contexts for p in split_passages(text, tokenizer, chunking)]
        return cls(question=question, passages=tuple(passages))

    def with_encodings(self, model: RefragModel) -> Request:
        """The same request with its chunk encoder outputs precomputed (what an index stores): the cached path."""
        with torch.inference_mode():
            encoded = tuple(model.encode_chunks(p.chunks) for p in self.passages)
        return Request(self.question, self.passages, encoded)

    @property
    def chunks(self) -> list[Chunk]:
        """Every chunk of every passage, in order, numbered by passage (the L chunks a policy chooses from)."""
        return request_chunks(self.passages)


@dataclass(frozen=True)
class Timings:
    ttft_s: float  # question in -> first token out
    encode_s: float  # part of ttft spent encoding chunks (0 when precomputed)
    policy_s: float  # part of ttft spent choosing the chunks kept raw (the expansion policy)
    prefill_s: float  # part of ttft spent in the decoder prefill
    ttit_s: float  # mean time per token after the first (0 if only one token)
    total_s: float
    tokens_per_s: float  # new tokens (whole batch) / total time


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    timings: Timings
    decoder_positions: int  # prefill positions the decoder read for this question
    context_tokens: int  # raw context tokens
    context_positions: int  # positions the context occupied (chunks compressed -> 1 each)
    expanded_chunks: tuple[int, ...]  # indices into Request.chunks kept as raw tokens
    policy: str  # the expansion policy that chose them ("full" in full mode, "none" when none was asked for)
    kv_cache_bytes: int  # for the whole batch after the prefill

    @property
    def compression(self) -> float:
        """Context tokens per context position (k when nothing is expanded, 1 in full mode)."""
        return self.context_tokens / max(self.context_positions, 1)


def sample_next(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids (greedy, or temperature + nucleus sampling)."""
    if options.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / options.temperature, dim=-1)
    if options.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > options.top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def kv_cache_bytes(cache) -> int:
    """Bytes held by a transformers Cache (keys + values of every layer)."""
    return sum(
        t.numel() * t.element_size()
        for layer in getattr(cache, "layers", [])
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    )


def _eos_ids(model: RefragModel) -> set[int]:
    ids = model.decoder.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if model.tokenizer.eos_token_id is not None:
        ids.append(model.tokenizer.eos_token_id)
    return set(ids)


class _Row:
    """One batch row's generated tokens and text: EOS, stop strings and streaming of complete characters."""

    def __init__(self, tokenizer, stops: Sequence[str], emit: Callable[[str], None] | None) -> None:
        self.tokenizer, self.stops, self.emit = tokenizer, [s for s in stops if s], emit
        self.ids: list[int] = []
        self.text = ""
        self.finish: FinishReason | None = None
        self._emitted = 0

    def push(self, token: int, eos: set[int]) -> None:
        if self.finish is not None:
            return
        if token in eos:
            self.finish = "eos"
            return
        self.ids.append(token)
        if not (self.stops or self.emit):
            return
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [self.text.index(s) for s in self.stops if s in self.text]
        if cuts:
            self.text, self.finish = self.text[: min(cuts)], "stop"
        if not self.text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits for its next token
            self._send()

    def flush(self) -> None:
        if not (self.stops or self.emit):
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self._send()

    def _send(self) -> None:
        if self.emit is not None and len(self.text) > self._emitted:
            self.emit(self.text[self._emitted :])
        self._emitted = len(self.text)


def _chunk_encodings(
    model: RefragModel, requests: Sequence[Request], compression: CompressionOptions
) -> tuple[list[torch.Tensor | None], float]:
    """Per request [L, E] encoder outputs (None in full mode) and the seconds spent encoding at query time.

    Precomputed encodings are used as given; the rest of the batch is encoded in one call.
    """
    if compression.mode == "full":
        return [None] * len(requests), 0.0
    t0 = time.perf_counter()
    todo = [r for r in requests if r.encoded is None]
    fresh = model.encode_chunks([c for r in todo for c in r.chunks])  # [sum L, E]
    encode_s = time.perf_counter() - t0 if todo else 0.0
    out: list[torch.Tensor | None] = []
    offset = 0
    for r in requests:
        n = len(r.chunks)
        if r.encoded is None:
            out.append(fresh[offset : offset + n])
            offset += n
            continue
        given = torch.cat([e.to(model.device) for e in r.encoded])
        if given.shape[0] != n:
            raise InputError(
                f"precomputed chunk vectors ({given.shape[0]}) do not match the passages' chunk count ({n})."
            )
        if not bool(torch.isfinite(given).all()):
            raise CheckpointError("precomputed chunk vectors hold NaN or infinite values (a damaged index shard?): "
                                  "rebuild the index, or re-encode those passages.")
        out.append(given)
    return out, encode_s


@contextlib.contextmanager
def _eval_mode(model: RefragModel) -> Iterator[None]:
    """Inference runs in eval mode (no dropout); the caller's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.inference_mode()
def generate(
    model: RefragModel,
    requests: Sequence[Request],
    *,
    compression: CompressionOptions = CompressionOptions(),
    sampling: SamplingOptions = SamplingOptions(),
    template: PromptTemplate | None = None,
    on_text: TextCallback | None = None,
    policy: ExpansionPolicy | None = None,
    cancelled: Cancelled | None = None,
) -> list[Answer]:
    """Answer a batch of requests. ``on_text(row, delta)`` streams text as it is produced; ``policy`` replaces
    the expansion policy ``compression.policy`` names (e.g. a learned one; the budget stays the options');
    ``cancelled(row)``, asked before every decoding step, ends that row early (finish reason "cancelled")."""
    with _eval_mode(model):
        batch = prepare(model, requests, compression=compression, template=template, policy=policy)
        return _prefill_and_decode(model, batch, sampling, on_text, cancelled)


def prepare(model: RefragModel, requests: Sequence[Request], *, compression: CompressionOptions = CompressionOptions(),
            template: PromptTemplate | None = None, policy: ExpansionPolicy | None = None) -> Batch:
    """Everything before the decoder: chunk encodings (stored or encoded now), the policy's raw chunks and each
    request's prompt layout. ``generate`` prefills it here; a remote engine (``refrag.serve.vllm``) sends the
    layouts' embedding rows instead."""
    t0 = time.perf_counter()
    if not requests:
        raise InputError("generate needs at least one request.")
    template = template or PromptTemplate.for_tokenizer(model.tokenizer)
    question_ids = [template.question_ids(model.tokenizer, r.question) for r in requests]
    for r in requests:
        if not r.passages:
            raise InputError("context is empty: give at least one passage (or use no context at all).")
    encoded, encode_s = _chunk_encodings(model, requests, compression)
    laid = [_request_layout(model, template, q_ids, r, enc, compression, policy)
            for r, q_ids, enc in zip(requests, question_ids, encoded)]
    return Batch(tuple(requests), [x for x, _ in laid], [e for _, e in laid], t0, encode_s)


def _request_layout(model: RefragModel, template: PromptTemplate, question_ids, request: Request,
                    enc: torch.Tensor | None, compression: CompressionOptions,
                    policy: ExpansionPolicy | None) -> tuple[Layout, Expansion]:
    """One request's prompt layout: the policy's raw chunks, the others as projected chunk vectors."""
    expansion = choose_expanded(request.chunks, compression, encodings=enc, question=request.question, model=model,
                                policy=policy)
    compressed = [i for i in range(len(request.chunks)) if i not in expansion.expanded]
    vectors = model.project(enc)[compressed] if enc is not None else None  # [V, D]
    return rag_layout(model, template, question_ids, request.passages, vectors, expansion.expanded), expansion


@torch.inference_mode()
def prompt_positions(model: RefragModel, request: Request, *, compression: CompressionOptions = CompressionOptions(),
                     template: PromptTemplate | None = None, policy: ExpansionPolicy | None = None) -> int:
    """The decoder positions ``generate`` would prefill for ``request`` (template, question, and the context
    as ``compression`` lays it out), without running the decoder."""
    template = template or PromptTemplate.for_tokenizer(model.tokenizer)
    with _eval_mode(model):
        (enc,), _ = _chunk_encodings(model, [request], compression)
        layout, _ = _request_layout(model, template, template.question_ids(model.tokenizer, request.question),
                                    request, enc, compression, policy)
    return layout.length


@dataclass(frozen=True)
class Batch:
    """What generation prepared for the decoder: one layout and expansion per request."""

    requests: tuple[Request, ...]
    layouts: list[Layout]
    expansions: list[Expansion]
    t0: float  # when the call started (the questions' arrival): timings count from here
    encode_s: float  # chunk encoding at query time


def _prefill_and_decode(
    model: RefragModel, batch: Batch, sampling: SamplingOptions, on_text: TextCallback | None,
    cancelled: Cancelled | None = None,
) -> list[Answer]:
    """The window check, the prefill (logits of the last position only), then KV-cached decoding."""
    limit = getattr(model.decoder.config, "max_position_embeddings", None)
    row = max(range(len(batch.layouts)), key=lambda i: batch.layouts[i].length)
    longest = batch.layouts[row]
    if limit and longest.length > limit:
        advice = ("in refrag mode a compressed chunk is one position and a raw one k: keep fewer chunks raw (a "
                  "smaller --expand-fraction / --expand-tokens) or give fewer passages (--top-k, --max-positions)"
                  if batch.expansions[row].policy != "full" else
                  "in full mode every context token is a position: use --mode refrag (one position per k-token "
                  "chunk) or give fewer / shorter passages (--top-k, --max-positions)")
        raise InputError(f"the prompt needs {longest.length} decoder positions but the decoder's window is {limit}: "
                         f"{advice}.")
    # No KV cache of the constant template head: with a past, SDPA on CPU loses its causal kernel (explicit
    # mask): measured full context 4.6 -> 8.6 s at s = 4096 and no gain for REFRAG (docs/bench/ttft.md).
    inputs = model.build_inputs(batch.layouts)  # [B, T, D], left-padded
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(sampling.seed)
    with model.decoder_for(inputs.compressed, inputs.vector_mask) as decoder:
        t_pre = time.perf_counter()
        mask = inputs.attention_mask
        out = decoder(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=None if bool(mask.all()) else mask,  # no padding: the causal kernel
            position_ids=inputs.position_ids,
            use_cache=True,
            logits_to_keep=1,
        )
        if not bool(torch.isfinite(out.logits[:, -1]).all()):
            raise CheckpointError("the decoder produced NaN / infinite logits: a damaged checkpoint or model "
                                  "weights (re-export or re-download them), or fp16 overflow (use bfloat16/float32).")
        next_ids = sample_next(out.logits[:, -1], sampling, generator)  # [B]
        next_ids.tolist()  # the first token exists (on the host) before TTFT is read
        ttft, prefill_s = time.perf_counter() - batch.t0, time.perf_counter() - t_pre
        kv_bytes = kv_cache_bytes(out.past_key_values)
        rows = [_Row(model.tokenizer, sampling.stop, (lambda t, b=b: on_text(b, t)) if on_text else None)
                for b in range(len(batch.requests))]
    # new tokens: a chunk-scoped adapter is off on them, an answer adapter on
    with model.decoder_for(inputs.compressed, decoding=True) as decoder:
        _decode(model, decoder, inputs, out.past_key_values, next_ids, rows, sampling, generator, cancelled)
    total = time.perf_counter() - batch.t0
    steps = max(len(r.ids) for r in rows)
    timings = Timings(
        ttft_s=ttft,
        encode_s=batch.encode_s,
        policy_s=sum(e.seconds for e in batch.expansions),
        prefill_s=prefill_s,
        ttit_s=(total - ttft) / (steps - 1) if steps > 1 else 0.0,
        total_s=total,
        tokens_per_s=sum(len(r.ids) for r in rows) / total if total > 0 else 0.0,
    )
    return [make_answer(r, row.text, row.ids, row.finish or "length", layout, expansion, timings, kv_bytes)
            for r, row, layout, expansion in zip(batch.requests, rows, batch.layouts, batch.expansions)]


def _decode(model: RefragModel, decoder: PreTrainedModel, inputs: DecoderInputs, cache, next_ids: torch.Tensor,
            rows: list[_Row], sampling: SamplingOptions, generator: torch.Generator | None,
            cancelled: Cancelled | None = None) -> None:
    """KV-cached decoding from the prefill's cache and first tokens, until every row finished (or was
    cancelled) or the cap."""
    B = len(rows)
    eos = set() if sampling.ignore_eos else _eos_ids(model)
    mask, positions = inputs.attention_mask, inputs.position_ids[:, -1:]
    step_ids = next_ids.tolist()  # [B] the prefill's tokens
    for step in range(sampling.max_new_tokens):
        for b, (row, token) in enumerate(zip(rows, step_ids)):
            if cancelled is not None and row.finish is None and cancelled(b):
                row.finish = "cancelled"
            row.push(token, eos)
        if all(r.finish is not None for r in rows) or step == sampling.max_new_tokens - 1:
            break
        positions = positions + 1
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        out = decoder(
            input_ids=next_ids.reshape(B, 1),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        next_ids = sample_next(out.logits[:, -1], sampling, generator)
        step_ids = next_ids.tolist()
    for row in rows:
        row.flush()


def make_answer(request: Request, text: str, ids: Sequence[int], finish: FinishReason, layout: Layout,
                expansion: Expansion, timings: Timings, kv_bytes: int) -> Answer:
    """The Answer for one request: its text and tokens, and what its prompt was made of."""
    expanded, chunk_tokens = expansion.expanded, [len(c.token_ids) for c in request.chunks]
    return Answer(
        text=text.strip(),
        token_ids=tuple(ids),
        finish_reason=finish,
        timings=timings,
        decoder_positions=layout.length,
        context_tokens=sum(p.num_tokens for p in request.passages),
        context_positions=sum(n if i in expanded else 1 for i, n in enumerate(chunk_tokens)),
        expanded_chunks=tuple(sorted(expanded)),
        policy=expansion.policy,
        kv_cache_bytes=kv_bytes,
    )
