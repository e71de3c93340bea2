"""Chunk encoders behind one interface: chunks (decoder token ids + their text) -> one vector each, [N, E].

Every encoder reads each chunk on its own, so its vectors are precomputable at indexing time (an index stores
whatever ``encode`` returns, keyed by ``fingerprint``):

- ``TextEncoder``: a Hugging Face sentence encoder (all-MiniLM-L6-v2, all-mpnet-base-v2, ...) reading the chunk's
  TEXT with its own tokenizer, mean- or CLS-pooled.
- ``SelfEncoder`` (spec ``self``): the decoder's own first N layers over the chunk's k DECODER tokens (same
  tokenizer, cased, no re-tokenisation), with a LoRA adapter on those layers; pooled by mean, last token, or a
  learned memory token appended to the chunk. The layers are a copy made from the decoder at load time, so the
  decoder (and full-context mode) is untouched and a checkpoint stores only the adapter (+ memory token).
- ``TokenEmbeddingEncoder`` (spec ``tokens``): the decoder's embedding rows of the k tokens, mixed by one small
  position-aware transformer layer; the cheapest possible encoder, a floor for comparisons.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PreTrainedModel

from refrag.chunking import Chunk
from refrag.config import RefragConfig
from refrag.errors import CheckpointError, InputError

SELF, TOKENS = "self", "tokens"  # encoder specs that are built from the decoder, not loaded
BUILT_FROM_DECODER = (SELF, TOKENS)  # rebuilt from the decoder at load: only their trained part is saved
WEIGHTS = "encoder.safetensors"  # the trained part of a decoder-built encoder inside a checkpoint's encoder/


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, E] hidden states + [B, T] mask (1 on the positions to pool) -> [B, E].

    ``mean``: mean over the masked positions; ``cls``: the first position; ``last``/``memory``: the last position
    (rows are left-padded, so the last position is every row's last real one).
    """
    if how == "cls":
        return hidden[:, 0]
    if how in ("last", "memory"):
        return hidden[:, -1]
    m = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def _fingerprint(module: nn.Module) -> str:
    """sha256 of a module's weights (bf16 bytes, sorted names): what stored chunk vectors depend on."""
    return tensors_digest(module.state_dict())


def tensors_digest(tensors: Mapping[str, torch.Tensor], prefix: bytes = b"") -> str:
    """sha256 of ``prefix``, then each tensor's name and its values as bf16 bytes, in sorted name order."""
    h = hashlib.sha256(prefix)
    for name, tensor in sorted(tensors.items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()


class TextEncoder(nn.Module):
    """A Hugging Face encoder reading chunk text with its own tokenizer."""

    def __init__(self, model: PreTrainedModel, tokenizer, pooling: str = "mean", max_tokens: int = 64) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise InputError(f"a text encoder pools by mean or cls (got {pooling!r}).")
        self.model, self.tokenizer, self.pooling, self.max_tokens = model, tokenizer, pooling, max_tokens

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, chunks: Sequence[Chunk], batch_size: int = 128) -> torch.Tensor:
        """[N, E]; texts are sorted by length and batched so padding stays small; output keeps input order."""
        device = self.model.device
        ids = self.tokenizer([c.text for c in chunks], truncation=True, max_length=self.max_tokens,
                             padding=False)["input_ids"]
        return _batched(ids, batch_size, self.hidden_size, device, self._pooled, self.tokenizer.pad_token_id or 0,
                        left=False)

    def _pooled(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [b, t, E]
        return pool(hidden, mask, self.pooling)

    def set_trainable(self, on: bool) -> None:
        self.model.requires_grad_(on)

    def gradient_checkpointing(self) -> None:
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def trainable(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def fingerprint(self) -> str:
        return _fingerprint(self.model)

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)


class _BuiltFromDecoder(nn.Module):
    """An encoder made from the decoder's own parts: only its ``_trains(name)`` tensors are trained and saved;
    the rest is rebuilt from the decoder when the checkpoint loads."""

    def _trains(self, name: str) -> bool:
        raise NotImplementedError

    def set_trainable(self, on: bool) -> None:
        for name, p in self.named_parameters():
            p.requires_grad_(on and self._trains(name))

    def gradient_checkpointing(self) -> None:
        body = getattr(self, "body", None)  # the self-encoder's layers; the token-embedding mixer is one layer
        if body is not None:
            body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def trainable(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if self._trains(name)]

    def fingerprint(self) -> str:
        return _fingerprint(self)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().contiguous().cpu() for n, p in self.named_parameters() if self._trains(n)}
        save_file(state, str(folder / WEIGHTS))

    def load_weights(self, folder: Path) -> None:
        try:
            state = load_file(str(folder / WEIGHTS))
        except Exception as e:  # safetensors raises several types for missing / truncated files
            raise CheckpointError(f"{folder}/{WEIGHTS} is missing or corrupt ({e}).") from e
        params = {n: p for n, p in self.named_parameters() if self._trains(n)}
        if set(state) != set(params) or any(state[n].shape != params[n].shape for n in params):
            raise CheckpointError(f"{folder}/{WEIGHTS} does not match this encoder (other layers, rank or pooling); "
                                  "load it with the settings it was trained with.")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)


class SelfEncoder(_BuiltFromDecoder):
    """The decoder's first ``layers`` layers (a copy; embeddings shared) + LoRA, over the chunk's decoder tokens.

    Each chunk is read as [start token] x_1..x_k (+ a learned memory token with ``pooling="memory"``): the start
    token takes the attention-sink role, as in the decoder's own inputs, and is never pooled.
    """

    def __init__(self, decoder: PreTrainedModel, start_token: int | None, layers: int = 8, pooling: str = "mean",
                 lora_rank: int = 32) -> None:
        super().__init__()
        if pooling not in ("mean", "last", "memory"):
            raise InputError(f"the self-encoder pools by mean, last or memory (got {pooling!r}).")
        total = decoder.config.num_hidden_layers
        if not 1 <= layers <= total:
            raise InputError(f"--encoder-layers must be in 1..{total} for this decoder (got {layers}).")
        self.body = _first_layers(decoder, layers)  # a decoder base model with `layers` layers
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        inject_adapter_in_model(config, self.body)
        # the memory token starts as the start token's embedding row: a real input scale (at zero the first RMSNorm's
        # gradient is ~1/sqrt(eps))
        row = decoder.get_input_embeddings().weight[start_token if start_token is not None else 0]
        self.memory = nn.Parameter(row.detach().clone()) if pooling == "memory" else None
        self.start, self.pooling, self.layers = start_token, pooling, layers
        self.set_trainable(True)

    @property
    def hidden_size(self) -> int:
        return int(self.body.config.hidden_size)

    def encode(self, chunks: Sequence[Chunk], batch_size: int = 128) -> torch.Tensor:
        head = [] if self.start is None else [self.start]
        ids = [[*head, *c.token_ids] for c in chunks]
        return _batched(ids, batch_size, self.hidden_size, self.body.device, self._pooled, 0, left=True)

    def _pooled(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids/mask [b, t] left-padded, each row starting with the start token."""
        embeds = self.body.get_input_embeddings()(ids)  # [b, t, D]
        if self.memory is not None:  # one more position at the end of every row
            embeds = torch.cat([embeds, self.memory.to(embeds.dtype).expand(len(ids), 1, -1)], dim=1)
            mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
        keep = mask.clone()
        if self.start is not None:  # never pool the start token (each row's first real position)
            keep[torch.arange(len(ids)), (mask.cumsum(-1) == 1).int().argmax(-1)] = 0
        return pool(hidden, keep, self.pooling)

    def _trains(self, name: str) -> bool:
        """Only the adapter (and the memory token) ever train; the copied decoder weights stay as they are."""
        return "lora_" in name or name == "memory"


class TokenEmbeddingEncoder(_BuiltFromDecoder):
    """The decoder's embedding rows of the chunk's tokens (shared, frozen) + learned positions, mixed by one small
    transformer layer, mean-pooled."""

    def __init__(self, decoder: PreTrainedModel, k: int) -> None:
        super().__init__()
        d = decoder.config.hidden_size
        self.embed = decoder.get_input_embeddings()  # shared with the decoder, never trained here
        self.positions = nn.Parameter(torch.zeros(k, d, dtype=decoder.dtype))
        heads = next(h for h in (8, 4, 2, 1) if d % h == 0)
        self.mix = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True,
                                              norm_first=True).to(decoder.dtype)
        self.k = k
        self.set_trainable(True)  # (the shared embedding rows are frozen, as the decoder's own weights are)

    @property
    def hidden_size(self) -> int:
        return int(self.positions.shape[1])

    def encode(self, chunks: Sequence[Chunk], batch_size: int = 128) -> torch.Tensor:
        ids = [list(c.token_ids[: self.k]) for c in chunks]
        return _batched(ids, batch_size, self.hidden_size, self.positions.device, self._pooled, 0, left=False)

    def _pooled(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).to(self.positions.dtype) + self.positions[: ids.shape[1]]  # [b, t, D]
        hidden = self.mix(x, src_key_padding_mask=mask == 0)
        return pool(hidden, mask, "mean")

    def _trains(self, name: str) -> bool:
        return not name.startswith("embed.")  # the decoder's embedding rows are shared, never trained here


ChunkEncoder = TextEncoder | SelfEncoder | TokenEmbeddingEncoder


def _batched(ids: list[list[int]], batch_size: int, dim: int, device, run, pad: int, *, left: bool) -> torch.Tensor:
    """Run ``run(ids [b, t], mask [b, t]) -> [b, E]`` over length-sorted batches; output in input order [N, E]."""
    out = None
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(ids[i]) for i in idx)
        batch = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            span = slice(width - len(ids[i]), width) if left else slice(0, len(ids[i]))
            batch[row, span] = torch.tensor(ids[i])
            mask[row, span] = 1
        pooled = run(batch.to(device), mask.to(device))  # [b, E]
        if out is None:
            out = torch.empty(len(ids), dim, dtype=pooled.dtype, device=device)
        out[torch.tensor(idx, device=device)] = pooled.to(out.dtype)
    return out if out is not None else torch.empty(0, dim, device=device)


def _first_layers(decoder: PreTrainedModel, layers: int) -> PreTrainedModel:
    """A base model (no LM head) of the decoder's architecture holding copies of its first ``layers`` layers and
    sharing its token embeddings."""
    base = decoder.get_base_model() if hasattr(decoder, "get_base_model") else decoder
    inner = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    config = copy.deepcopy(base.config)
    config.num_hidden_layers = layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]
    body = AutoModel.from_config(config, dtype=base.dtype)
    state = {k: v for k, v in inner.state_dict().items()
             if not k.startswith("layers.") or int(k.split(".")[1]) < layers}
    missing, unexpected = body.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.startswith("embed_tokens")]:
        raise InputError(f"cannot take the first {layers} layers of this decoder ({missing or unexpected}).")
    body.set_input_embeddings(decoder.get_input_embeddings())  # shared, frozen
    return body.to(device=base.device).eval()


def build_encoder(config: RefragConfig, decoder: PreTrainedModel, tokenizer, *, progress: bool = True) -> ChunkEncoder:
    """The chunk encoder ``config.encoder`` names: ``self`` / ``tokens`` are built from ``decoder``; anything else
    is a text encoder (a built-in name, a folder or a Hugging Face id) loaded with its own tokenizer."""
    from refrag.modeling import start_token

    dtype = getattr(torch, config.dtype)
    if config.encoder == SELF:
        return SelfEncoder(decoder, start_token(tokenizer), config.encoder_layers, config.pooling,
                           config.encoder_lora_rank).to(dtype)
    if config.encoder == TOKENS:
        return TokenEmbeddingEncoder(decoder, config.k).to(dtype)
    from transformers import AutoTokenizer

    from refrag.models import resolve

    path = resolve(config.encoder, progress=progress).path
    return TextEncoder(AutoModel.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path),
                       config.pooling, config.encoder_max_tokens)
