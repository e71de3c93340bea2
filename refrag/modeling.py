"""REFRAG in one file: chunk vectors -> projector -> decoder positions, read top to bottom.

1. Every k-token context chunk is encoded on its own (``RefragModel.encode_chunks``: a chunk encoder from
   :mod:`refrag.encoders`), so its vector can be precomputed at indexing time, then projected into the
   decoder's token-embedding space (``Projector``, output RMS pinned to the decoder's embeddings).
2. ``context_segments`` is THE interleaving: chunks in order, an expanded chunk as its k decoder tokens, a
   compressed one as ONE vector row. Generation, training and scoring all build their context with it.
3. ``segments_layout`` concatenates segments (token runs and vector rows) into one example's ``Layout``;
   ``scored_layout`` adds the labels (the one place targets are put after a prefix).
4. ``RefragModel.build_inputs`` embeds and left-pads a batch of layouts into ``inputs_embeds``.
5. ``RefragModel.decoder_for`` is the decoder-adapter switch: a LoRA adapter (when trained) runs on compressed
   inputs only; text-only inputs run the original decoder, so full-context mode stays the plain decoder. With
   ``adapter_scope="chunks"`` it runs at the chunk-vector positions only (``ChunkScope``): every text position
   of a compressed input (template, question, raw chunks, the answer) is computed by the original weights too.
6. ``token_nll`` is the one negative log-likelihood every loss and score is made of.

Loading and saving checkpoints is :mod:`refrag.checkpoint`; which chunks stay raw is :mod:`refrag.policy`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import PreTrainedModel

from refrag.chunking import Chunk
from refrag.config import AdapterScope, RefragConfig
from refrag.encoders import ChunkEncoder
from refrag.errors import CheckpointError, InputError

IGNORE_INDEX = -100  # label of positions without a target
COMPRESSOR_ADAPTER = "default"  # peft name of the compressor's decoder adapter
ANSWER_ADAPTER = "answer"  # peft name of an answer adapter trained on top of a frozen compressor (``add_answer_adapter``)
Segment = Sequence[int] | torch.Tensor  # raw token ids, or [n, D] rows placed as they are


# ---------------------------------------------------------------- 1. chunk vectors
class Projector(nn.Module):
    """2-layer MLP (GELU) from encoder space to decoder embedding space, output RMS pinned to the decoder's.

    An unscaled projector saturates the decoder; each output row is RMS-normalised and rescaled to the RMS of
    the decoder's token embeddings (times a learnable per-dimension gain, initialised to 1).
    """

    def __init__(self, in_dim: int, out_dim: int, target_rms: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.gain = nn.Parameter(torch.ones(out_dim))
        self.register_buffer("target_rms", torch.tensor(float(target_rms)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., E] encoder vectors -> [..., D] decoder-space vectors."""
        y = self.fc2(self.act(self.fc1(x)))
        inv_rms = torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(y.dtype)
        return y * inv_rms * (self.gain * self.target_rms).to(y.dtype)


@torch.no_grad()
def embedding_rms(decoder: PreTrainedModel, sample: int = 8192) -> float:
    """RMS of the decoder's token-embedding rows (as its embedding module outputs them)."""
    emb = decoder.get_input_embeddings()
    vocab = emb.weight.shape[0]
    ids = torch.linspace(0, vocab - 1, min(sample, vocab)).long().to(emb.weight.device)
    return float(emb(ids).float().pow(2).mean().sqrt())


# ---------------------------------------------------------------- 2. the interleaving
def context_segments(
    groups: Sequence[Sequence[Chunk]],
    expanded: Collection[int],
    vectors: torch.Tensor | None,
    separator: Sequence[int] = (),
) -> list[Segment]:
    """Chunks of consecutive groups (passages) in order: expanded ones as their tokens, the others as vectors.

    ``expanded`` holds chunk indices counted across all groups; ``vectors`` [V, D] are the projected vectors of
    the V compressed chunks, in order (None when every chunk is expanded). ``separator`` tokens go between two
    groups only where both neighbouring chunks are raw tokens: compressed chunks follow each other directly, as
    in training (contiguous text, one vector per chunk). With every chunk expanded and a separator this is
    exactly the plain-RAG token sequence.
    """
    segments: list[Segment] = []
    index = row = 0
    for g, chunks in enumerate(groups):
        if g and separator and index - 1 in expanded and index in expanded:
            segments.append(separator)
        for chunk in chunks:
            if index in expanded:
                segments.append(chunk.token_ids)
            else:
                if vectors is None or row >= vectors.shape[0]:
                    raise InputError("a compressed chunk has no chunk vector (fewer vectors than chunks).")
                segments.append(vectors[row : row + 1])
                row += 1
            index += 1
    if vectors is not None and row != vectors.shape[0]:
        raise InputError(f"{vectors.shape[0]} chunk vectors for {row} compressed chunks.")
    return segments


# ---------------------------------------------------------------- 3. one example's layout
@dataclass
class Layout:
    """One example's decoder input before embedding.

    ``token_ids[t]`` is the raw token at position t; where ``is_vector[t]`` the row is instead the next of
    ``vectors`` (projected chunk vectors, in order). ``labels[t]`` is the token to predict AFTER position t
    (IGNORE_INDEX where no loss), or None for inference.
    """

    token_ids: torch.Tensor  # [T] long (0 where is_vector)
    is_vector: torch.Tensor  # [T] bool
    vectors: torch.Tensor  # [V, D], V == is_vector.sum()
    labels: torch.Tensor | None = None  # [T] long

    def __post_init__(self) -> None:
        if self.token_ids.shape != self.is_vector.shape or self.token_ids.dim() != 1:
            raise InputError("Layout: token_ids and is_vector must be 1-D and the same length.")
        if int(self.is_vector.sum()) != self.vectors.shape[0]:
            raise InputError(
                f"Layout: {int(self.is_vector.sum())} vector positions but {self.vectors.shape[0]} vectors."
            )

    @property
    def length(self) -> int:
        return int(self.token_ids.shape[0])


def segments_layout(segments: Sequence[Segment], dim: int, dtype: torch.dtype) -> Layout:
    """Concatenate segments in order: a sequence of ints is raw tokens, a [n, D] tensor is n vectors."""
    ids: list[torch.Tensor] = []
    flags: list[torch.Tensor] = []
    vecs: list[torch.Tensor] = []
    for seg in segments:
        if isinstance(seg, torch.Tensor):
            if seg.dim() != 2 or seg.shape[1] != dim:
                raise InputError(f"vector segment must be [n, {dim}], got {tuple(seg.shape)}.")
            ids.append(torch.zeros(seg.shape[0], dtype=torch.long))
            flags.append(torch.ones(seg.shape[0], dtype=torch.bool))
            vecs.append(seg.to(dtype))
        else:
            t = torch.as_tensor(list(seg), dtype=torch.long)
            ids.append(t)
            flags.append(torch.zeros(t.shape[0], dtype=torch.bool))
    vectors = torch.cat(vecs) if vecs else torch.empty(0, dim, dtype=dtype)
    return Layout(token_ids=torch.cat(ids), is_vector=torch.cat(flags), vectors=vectors)


def scored_layout(
    prefix: Sequence[Segment], target: Sequence[int], dim: int, dtype: torch.dtype, *, skip_first: bool = False
) -> Layout:
    """prefix segments + target[:-1], labels on the target: the prefix's last position predicts target[0].

    ``skip_first`` leaves target[0] unscored (needed when the prefix is empty: nothing predicts it).
    """
    layout = segments_layout([*prefix, list(target[:-1])], dim, dtype)
    n_prefix = layout.length - (len(target) - 1)
    targets = torch.tensor(list(target))
    labels = torch.full((layout.length,), IGNORE_INDEX, dtype=torch.long)
    if n_prefix == 0:  # nothing predicts target[0]
        if not skip_first:
            raise InputError("an empty prefix cannot predict the first target token; score with skip_first=True.")
        labels[:] = targets[1:]
    else:
        labels[n_prefix - 1 :] = targets
        if skip_first:
            labels[n_prefix - 1] = IGNORE_INDEX
    layout.labels = labels
    return layout


def start_token(tokenizer) -> int | None:
    """The token every training / scoring sequence starts with: BOS, else EOS, else None.

    Decoders use their first position as an attention sink (attention mass parks there, its value is barely
    read); a chunk vector at position 0 would be ignored, so sequences start with this token instead.
    """
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return None


# ---------------------------------------------------------------- 6. the one likelihood
def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, K, V] and labels [B, K] -> per-position NLL [B, K] (fp32; 0 where unlabelled) and mask [B, K]."""
    nll = nn.functional.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll, labels != IGNORE_INDEX


def mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over every labelled position of the batch (the training loss)."""
    nll, mask = token_nll(logits, labels)
    return nll.sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------- 4./5. the model
@dataclass
class DecoderInputs:
    """A left-padded batch ready for the decoder."""

    inputs_embeds: torch.Tensor  # [B, T, D]
    attention_mask: torch.Tensor  # [B, T] long, 0 on left padding
    position_ids: torch.Tensor  # [B, T] long, 0.. on real positions
    labels: torch.Tensor | None = None  # [B, T] long, target after each position
    compressed: bool = True  # some position holds a chunk vector (selects the decoder adapter, if any)
    vector_mask: torch.Tensor | None = None  # [B, T] bool, True at chunk-vector positions


@dataclass(frozen=True)
class LabelOutputs:
    """The decoder's outputs at the K positions of a batch where any example has a label."""

    logits: torch.Tensor  # [B, K, V]
    labels: torch.Tensor  # [B, K], IGNORE_INDEX where this example has no target
    hidden: tuple[torch.Tensor, ...] = ()  # each decoder layer's output (the last after the final norm), [B, K, D]


class ChunkScope:
    """A decoder LoRA adapter confined to the chunk-vector positions (``adapter_scope="chunks"``).

    A forward hook on every ``lora_B`` multiplies the adapter's update by the current call's vector mask, so a
    text position's hidden state is exactly the original decoder's function of its inputs; only the vectors'
    (and through attention, what reads them) differ. Text-only calls and cached decoding of new (text) tokens run
    with the adapter disabled, so they cost nothing extra. Rationale (docs/training.md): an adapter on every
    position also rewrites how the instruct decoder answers, which costs QA accuracy even on raw chunks.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # [B, T, 1] bool of the running call (one call at a time)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def install(self, decoder: nn.Module) -> None:
        """Hook every ``lora_B`` of the compressor's adapter in ``decoder`` (an answer adapter beside it runs at
        every position; an adapter loaded later needs another ``install``; a second decoder, the merged copy of
        ``RefragModel.merge_adapter``, adds its hooks to these)."""
        from peft.tuners.lora import LoraLayer

        self._handles += [m.lora_B[COMPRESSOR_ADAPTER].register_forward_hook(self._hook) for m in decoder.modules()
                          if isinstance(m, LoraLayer) and COMPRESSOR_ADAPTER in m.lora_B]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def active(self, vector_mask: torch.Tensor | None) -> contextlib.AbstractContextManager[None]:
        """``vector_mask`` [B, T] bool places the adapter for the calls inside (the previous mask is restored after)."""
        return self._placed(None if vector_mask is None else vector_mask.unsqueeze(-1))

    @contextlib.contextmanager
    def _placed(self, mask: torch.Tensor | None) -> Iterator[None]:
        outer, self.mask = self.mask, mask
        try:
            yield
        finally:
            self.mask = outer

    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``context_fn`` for non-reentrant gradient checkpointing: a layer recomputed during backward (after
        ``decoder_for`` has exited) gets the mask its forward had."""
        return contextlib.nullcontext(), self._placed(self.mask)

    def text_only(self) -> contextlib.AbstractContextManager[None]:
        """Every position of the calls inside is text (cached decoding beside an answer adapter): the adapter's
        update is zero there."""
        return self._placed(torch.zeros((), dtype=torch.bool))

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.mask is None or (self.mask.dim() and self.mask.shape[:2] != output.shape[:2]):
            raise RuntimeError("a chunk-scoped adapter ran without its [B, T] vector mask: call the decoder through "
                               "RefragModel.decoder_for(compressed, vector_mask) (and on [B, T, D] activations).")
        return output * self.mask  # [B, T, out]: zero at text positions


def _decoder_lora(rank: int):
    """The decoder adapters' LoRA config: every linear layer but the LM head, alpha = 2 x rank, no dropout."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing``: a FutureWarning on every
    adapter load that the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


class RefragModel(nn.Module):
    """Encoder + projector + decoder. Load with :func:`refrag.load_model` (or :mod:`refrag.checkpoint`)."""

    def __init__(
        self,
        config: RefragConfig,
        encoder: ChunkEncoder,
        decoder: PreTrainedModel,
        tokenizer,
        projector: Projector | None = None,
    ) -> None:
        super().__init__()
        if config.target_rms is None:  # a copy: the caller's config stays as given
            config = replace(config, target_rms=embedding_rms(decoder))
        self.config = config
        self.encoder = encoder
        self.decoder = decoder
        self.tokenizer = tokenizer  # the decoder's: chunks are cut in its token space
        self.projector = projector or Projector(encoder.hidden_size, decoder.config.hidden_size, config.target_rms)
        self.projector.to(device=decoder.device, dtype=decoder.dtype)
        self.merged_decoder: PreTrainedModel | None = None  # see merge_adapter
        self.chunk_scope = ChunkScope()  # installed when config.adapter_scope == "chunks" and there is an adapter
        self.policy_network: nn.Module | None = None  # a learned expansion policy (refrag.learned_policy), if any
        self._memo: dict[Chunk, torch.Tensor] | None = None  # see memoized_encodings

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.dtype

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def hidden_size(self) -> int:
        """D: the decoder's embedding width (what a chunk vector is projected to)."""
        return int(self.decoder.config.hidden_size)

    # ---------------------------------------------------------------- 1. encode + project
    def encode_chunks(self, chunks: Sequence[Chunk | str], batch_size: int = 128) -> torch.Tensor:
        """Chunks (or plain texts, cut into decoder tokens here) -> chunk-encoder outputs [N, E], in input order:
        what an index stores; projection comes later. Each chunk is encoded on its own."""
        items = [c if isinstance(c, Chunk) else self.as_chunk(c) for c in chunks]
        if not items:
            return torch.empty(0, self.encoder.hidden_size, dtype=self.dtype, device=self.device)
        memo = self._memo if self._memo is not None and not torch.is_grad_enabled() else None
        if memo is None:
            return self.encoder.encode(items, batch_size).to(device=self.device, dtype=self.dtype)
        new = list(dict.fromkeys(c for c in items if c not in memo))  # each unseen chunk (tokens and text) once
        if new:
            memo.update(zip(new, self.encoder.encode(new, batch_size).to(device=self.device, dtype=self.dtype)))
        return torch.stack([memo[c] for c in items])  # [N, E]

    @contextlib.contextmanager
    def memoized_encodings(self) -> Iterator[None]:
        """Within the block, ``encode_chunks`` without gradients encodes each distinct chunk once and reuses its
        output (chunks are encoded independently, so this is exact): RL rollouts read the same chunks in every
        sampled layout. Nested blocks share the outer memo; it is dropped at the outermost exit."""
        outer = self._memo
        self._memo = {} if outer is None else outer
        try:
            yield
        finally:
            self._memo = outer

    def as_chunk(self, text: str) -> Chunk:
        """A text (e.g. a question, for similarity expansion) as a chunk of decoder tokens."""
        return Chunk(tuple(self.tokenizer.encode(text, add_special_tokens=False)), text)

    def project(self, encoded: torch.Tensor) -> torch.Tensor:
        """[N, E] encoder outputs -> [N, D] decoder-space chunk embeddings."""
        return self.projector(encoded.to(device=self.device, dtype=self.dtype))

    def embed_chunks(self, chunks: Sequence[Chunk | str]) -> torch.Tensor:
        """Chunks -> [N, D] decoder-space chunk embeddings (encode + project)."""
        return self.project(self.encode_chunks(chunks))

    def contexts(self, examples: Sequence[Sequence[Sequence[Chunk]]], expanded: Sequence[Collection[int]],
                 separator: Sequence[int] = ()) -> list[list[Segment]]:
        """Each example's context as ``context_segments`` (an example: its groups of chunks, e.g. passages;
        ``expanded`` indexes its chunks across groups), every compressed chunk of the batch encoded and projected
        in one call."""
        flat = [[c for group in groups for c in group] for groups in examples]
        compressed = [c for cs, raw in zip(flat, expanded) for i, c in enumerate(cs) if i not in raw]
        vectors = self.embed_chunks(compressed) if compressed else None  # [N, D], compressed chunks in order
        out, row = [], 0
        for groups, cs, raw in zip(examples, flat, expanded):
            n = len(cs) - len(raw)
            mine = vectors[row : row + n] if vectors is not None and n else None
            out.append(context_segments(groups, raw, mine, separator))
            row += n
        return out

    # ---------------------------------------------------------------- 3. layouts in this model's space
    def layout(self, segments: Sequence[Segment]) -> Layout:
        """``segments_layout`` with this decoder's width and dtype."""
        return segments_layout(segments, self.hidden_size, self.dtype)

    def scored_layout(self, prefix: Sequence[Segment], target: Sequence[int], *, skip_first: bool = False) -> Layout:
        """``scored_layout`` with this decoder's width and dtype."""
        return scored_layout(prefix, target, self.hidden_size, self.dtype, skip_first=skip_first)

    # ---------------------------------------------------------------- 4. decoder inputs
    def build_inputs(self, layouts: Sequence[Layout], *, adapter_on_text: bool = False) -> DecoderInputs:
        """Embed and left-pad a batch of layouts.

        Raw-token rows come from the decoder's own embedding module (so model-specific scaling such as
        Gemma's sqrt(d) applies); vector rows are placed at their positions in order. ``adapter_on_text``: the
        decoder adapter runs on text-only rows too (a text adapter being trained: ``refrag train sft --read
        text``); otherwise only rows with a chunk vector select it.
        """
        if not layouts:
            raise InputError("build_inputs needs at least one example.")
        B, T = len(layouts), max(x.length for x in layouts)
        ids = torch.zeros(B, T, dtype=torch.long)
        flags = torch.zeros(B, T, dtype=torch.bool)
        mask = torch.zeros(B, T, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for b, x in enumerate(layouts):  # left padding: real rows end at T-1 for every example
            ids[b, T - x.length :] = x.token_ids
            flags[b, T - x.length :] = x.is_vector
            mask[b, T - x.length :] = 1
            if x.labels is not None:
                labels[b, T - x.length :] = x.labels
        ids, flags, mask = ids.to(self.device), flags.to(self.device), mask.to(self.device)
        embeds = self.decoder.get_input_embeddings()(ids)  # [B, T, D]
        vectors = [x.vectors for x in layouts if x.vectors.shape[0]]
        if vectors:
            embeds = embeds.masked_scatter(
                flags.unsqueeze(-1), torch.cat(vectors).to(device=self.device, dtype=embeds.dtype)
            )
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        has_labels = any(x.labels is not None for x in layouts)
        return DecoderInputs(
            embeds, mask, position_ids, labels.to(self.device) if has_labels else None,
            compressed=bool(vectors) or adapter_on_text, vector_mask=flags,
        )

    def forward(self, inputs: DecoderInputs) -> torch.Tensor:
        """Mean next-token cross-entropy over positions whose label is set (logits only computed there)."""
        return mean_nll(*self.label_logits(inputs))

    def label_logits(self, inputs: DecoderInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, K, V] and labels [B, K] at the K positions where any example has a label."""
        out = self.label_outputs(inputs)
        return out.logits, out.labels

    def label_outputs(self, inputs: DecoderInputs, *, hidden: bool = False) -> LabelOutputs:
        """``label_logits``, and with ``hidden`` every layer's hidden states at the same K positions."""
        if inputs.labels is None:
            raise InputError("forward() needs labels; use decoder_logits() for inference.")
        keep = (inputs.labels != IGNORE_INDEX).any(0).nonzero().squeeze(-1)  # [K] positions with a target
        with self.decoder_for(inputs.compressed, inputs.vector_mask) as decoder:
            out = decoder(
                inputs_embeds=inputs.inputs_embeds,
                attention_mask=inputs.attention_mask,
                position_ids=inputs.position_ids,
                logits_to_keep=keep,
                output_hidden_states=hidden,
                use_cache=False,
            )
        states = tuple(h[:, keep] for h in out.hidden_states[1:]) if hidden else ()  # [B, K, D] per layer
        return LabelOutputs(out.logits, inputs.labels[:, keep], states)

    def decoder_logits(self, inputs: DecoderInputs) -> torch.Tensor:
        """Full logits [B, T, V] (for tests and analysis)."""
        with self.decoder_for(inputs.compressed, inputs.vector_mask) as decoder:
            return decoder(
                inputs_embeds=inputs.inputs_embeds,
                attention_mask=inputs.attention_mask,
                position_ids=inputs.position_ids,
                use_cache=False,
            ).logits

    # ---------------------------------------------------------------- 5. the decoder adapter (LoRA)
    @property
    def has_adapter(self) -> bool:
        return hasattr(self.decoder, "disable_adapter")  # a peft model

    def add_lora(self, rank: int) -> None:
        """Wrap the decoder with a fresh LoRA adapter on every linear layer but the LM head (trainable)."""
        from peft import get_peft_model

        if self.has_adapter:
            raise InputError("the decoder already has an adapter; train it further instead of adding one.")
        with quiet_peft():
            self.decoder = get_peft_model(self.decoder, _decoder_lora(rank), autocast_adapter_dtype=False)
        self.set_adapter_scope(self.config.adapter_scope)

    @property
    def adapter_rank(self) -> int | None:
        """Rank of the compressor's decoder adapter (None: no adapter)."""
        return self.decoder.peft_config[COMPRESSOR_ADAPTER].r if self.has_adapter else None

    def widen_adapter(self, rank: int) -> None:
        """Grow the compressor's decoder adapter to ``rank`` without changing what the model computes: each
        layer's A gains fresh rows (peft's init), B zero columns, and alpha grows with the rank (the scale
        alpha / r stays), so B A x is unchanged until the new directions train: more capacity to read chunk
        vectors for a CPT that has flattened at the adapter's rank (docs/training.md)."""
        from peft.tuners.lora import LoraLayer

        current = self.adapter_rank
        if current is None:
            raise InputError("this model has no decoder adapter to widen: add one with --train-decoder lora.")
        if self.has_answer_adapter:
            raise InputError("widen the compressor's adapter before an answer adapter is trained on it.")
        if rank < current:
            raise InputError(f"the decoder adapter has rank {current}: it can be widened, not narrowed "
                             f"(asked for rank {rank}).")
        if rank == current:
            return
        name = COMPRESSOR_ADAPTER
        config = self.decoder.peft_config[name]
        if (config.rank_pattern or config.alpha_pattern or config.use_rslora or config.use_dora or config.lora_bias
                or config.lora_alpha * rank % current):
            raise InputError(f"this decoder adapter (per-layer ranks, rsLoRA, DoRA, biases, or alpha "
                             f"{config.lora_alpha} at rank {current}) cannot be widened to rank {rank} with the same "
                             "scale.")
        alpha = config.lora_alpha * rank // current  # the scale alpha / r stays as it was
        for m in self.decoder.modules():
            if not isinstance(m, LoraLayer) or name not in m.lora_A:
                continue
            a, b = m.lora_A[name], m.lora_B[name]  # weights [r, in], [out, r]
            wide_a = torch.empty(rank, a.in_features, dtype=a.weight.dtype, device=a.weight.device)
            nn.init.kaiming_uniform_(wide_a, a=math.sqrt(5))  # peft's init of A (B starts at zero)
            wide_a[:current] = a.weight.detach()
            wide_b = torch.zeros(b.out_features, rank, dtype=b.weight.dtype, device=b.weight.device)
            wide_b[:, :current] = b.weight.detach()
            # the same modules, wider weights: hooks on them (ChunkScope) stay in place
            a.weight = nn.Parameter(wide_a, requires_grad=a.weight.requires_grad)
            b.weight = nn.Parameter(wide_b, requires_grad=b.weight.requires_grad)
            a.out_features = b.in_features = rank
            m.r[name], m.lora_alpha[name] = rank, alpha
            m.scaling[name] = alpha / rank
        config.r, config.lora_alpha = rank, alpha
        self.merged_decoder = None  # merged for the old adapter

    @property
    def has_answer_adapter(self) -> bool:
        return self.has_adapter and ANSWER_ADAPTER in self.decoder.peft_config

    def add_answer_adapter(self, rank: int) -> None:
        """A fresh, trainable answer adapter (LoRA on every linear layer but the LM head) beside the compressor's.

        It runs in compressed calls only (text-only inputs keep the original decoder), at every position, decoded
        tokens included; the compressor's adapter keeps its own scope and is frozen here. Trained on the mixed
        input with the compressor frozen (``refrag train sft --learn adapter``), so the chunk vectors cannot move
        (refrag mode's perplexity can: the adapter also runs at its text positions); a checkpoint keeps it as
        ``answer_adapter/``.
        """
        self._check_answer_host()
        with quiet_peft():
            self.decoder.add_adapter(ANSWER_ADAPTER, _decoder_lora(rank))
        self._activate_both()
        for name, p in self.decoder.named_parameters():
            p.requires_grad_(f".{ANSWER_ADAPTER}." in name)
            if p.requires_grad:
                p.data = p.data.float()  # fp32 master weights whatever the frozen decoder's dtype

    def attach_adapter(self, folder, *, answer: bool = False) -> None:
        """Wrap the decoder with a saved LoRA adapter (frozen; training marks it trainable again); ``answer``:
        the saved answer adapter, beside the compressor's (``add_answer_adapter``)."""
        from peft import PeftModel

        if answer:
            self._check_answer_host()
        try:
            with quiet_peft():
                if answer:
                    self.decoder.load_adapter(str(folder), adapter_name=ANSWER_ADAPTER, autocast_adapter_dtype=False)
                else:
                    self.decoder = PeftModel.from_pretrained(self.decoder, str(folder), autocast_adapter_dtype=False)
        except Exception as e:  # peft raises ValueError/OSError/KeyError for missing, corrupt or foreign adapters
            raise CheckpointError(f"{folder}: the decoder adapter is missing, corrupt or for another decoder ({e}).") from e
        self.decoder.to(dtype=self.dtype)
        if answer:
            self._activate_both()
            self.decoder.requires_grad_(False)
        self.set_adapter_scope(self.config.adapter_scope)

    def _check_answer_host(self) -> None:
        if not self.has_adapter:
            raise InputError("an answer adapter runs beside a compressor's decoder adapter, and this model has none: "
                             "start from a cpt, mixed or sft checkpoint (they all have one).")
        if self.has_answer_adapter:
            raise InputError("the decoder already has an answer adapter.")

    def _activate_both(self) -> None:
        self.decoder.base_model.set_adapter([COMPRESSOR_ADAPTER, ANSWER_ADAPTER])

    @contextlib.contextmanager
    def compressor_only(self) -> Iterator[None]:
        """Within the block compressed calls read through the compressor's adapter alone: no answer adapter,
        merged or not (what the compressor was trained with; ``refrag.refine`` refines vectors for it)."""
        merged, self.merged_decoder = self.merged_decoder, None
        answer = self.has_answer_adapter
        trainable = {n: p.requires_grad for n, p in self.decoder.named_parameters()}  # peft's set_adapter resets them
        try:
            if answer:
                self.decoder.base_model.set_adapter(COMPRESSOR_ADAPTER)
            yield
        finally:
            self.merged_decoder = merged
            if answer:
                self._activate_both()
            for n, p in self.decoder.named_parameters():
                p.requires_grad_(trainable[n])

    @property
    def chunk_scoped(self) -> bool:
        """The adapter runs at chunk-vector positions only (``adapter_scope="chunks"``)."""
        return self.has_adapter and self.config.adapter_scope == "chunks"

    def set_adapter_scope(self, scope: AdapterScope) -> None:
        """Where the decoder adapter applies in compressed inputs (recorded in the config, so checkpoints keep it)."""
        changed = scope != self.config.adapter_scope
        self.config = replace(self.config, adapter_scope=scope)
        self.chunk_scope.remove()
        if changed or self.chunk_scoped:
            self.merged_decoder = None  # merged for another scope, or its hooks are gone: merge_adapter again
        if self.chunk_scoped:
            self.chunk_scope.install(self.decoder)

    def merge_adapter(self) -> None:
        """Inference speed-up: a second copy of the decoder with the adapter merged into its weights, used for
        compressed inputs. An unmerged LoRA adds ~400 small matmuls to every forward (on 2 CPU cores +0.06-0.1 s
        per prefill and +15 ms per token, docs/bench/ttft.md). Costs one more decoder's memory; for inference
        only (the copy does not follow further training of the adapter). A chunk-scoped adapter's prefill needs
        both the original and the adapted weights, so it stays unmerged; an answer adapter beside it is what
        merges (``_merged_answer_copy``)."""
        if self.merged_decoder is not None or not self.has_adapter:
            return
        if not self.chunk_scoped:
            self.merged_decoder = copy.deepcopy(self.decoder).merge_and_unload().requires_grad_(False).eval()
        elif self.has_answer_adapter:
            self.merged_decoder = self._merged_answer_copy()

    def _merged_answer_copy(self) -> PreTrainedModel:
        """A copy of the decoder whose base weights hold the answer adapter (W + scale B A, the adapter then
        deleted) and whose compressor adapter stays a chunk-scoped LoRA: a compressed prefill costs one LoRA
        instead of two, and decoding (text: no compressor update) runs with no LoRA at all."""
        from peft.tuners.lora import LoraLayer

        self.chunk_scope.remove()  # hooks must not be deep-copied (they would point at a copy of the scope)
        merged = copy.deepcopy(self.decoder)
        self.chunk_scope.install(self.decoder)
        with torch.no_grad():
            for m in merged.modules():
                if isinstance(m, LoraLayer) and ANSWER_ADAPTER in m.lora_B:
                    base = m.get_base_layer().weight
                    base += m.get_delta_weight(ANSWER_ADAPTER).to(base.dtype)
        merged.delete_adapter(ANSWER_ADAPTER)
        merged.base_model.set_adapter(COMPRESSOR_ADAPTER)
        merged.requires_grad_(False).eval()
        self.chunk_scope.install(merged)
        return merged

    @contextlib.contextmanager
    def decoder_for(self, compressed: bool, vector_mask: torch.Tensor | None = None, *,
                    decoding: bool = False) -> Iterator[PreTrainedModel]:
        """The decoder module to run. The adapter belongs to REFRAG inputs: text-only inputs (full context, no
        context) run the original decoder, so baselines and plain RAG stay exactly the decoder's own.

        ``vector_mask`` [B, T] (``DecoderInputs.vector_mask``) places a chunk-scoped adapter and is required for
        its compressed calls; ``decoding``: cached steps over new tokens (text), which then run the original
        decoder, or beside an answer adapter (``add_answer_adapter``) the decoder with it."""
        if self.chunk_scoped:
            merged = self.merged_decoder  # the answer adapter merged in (merge_adapter), or None
            if compressed and not decoding:
                if vector_mask is None:
                    raise InputError("a chunk-scoped adapter needs the call's vector_mask (DecoderInputs.vector_mask).")
                with self.chunk_scope.active(vector_mask):
                    yield merged if merged is not None else self.decoder
            elif compressed and merged is not None:  # decoded tokens: the merged answer adapter, no LoRA
                with merged.disable_adapter():
                    yield merged
            elif compressed and self.has_answer_adapter:  # decoded tokens: the answer adapter runs on them too
                with self.chunk_scope.text_only():
                    yield self.decoder
            else:
                with self.decoder.disable_adapter():
                    yield self.decoder
        elif compressed and self.merged_decoder is not None:
            yield self.merged_decoder
        elif self.has_adapter and not compressed:
            with self.decoder.disable_adapter():
                yield self.decoder
        else:
            yield self.decoder
