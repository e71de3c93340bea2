"""RefragModel: encoder -> projector -> decoder glue.

Each k-token context chunk is encoded independently (so its vector can be precomputed at indexing time),
projected into the decoder's token-embedding space, and occupies ONE decoder position. Expanded chunks put
their k decoder tokens back in place. ``build_inputs`` turns any mix of the two into ``inputs_embeds``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from refrag.config import RefragConfig
from refrag.errors import CheckpointError, InputError
from refrag.io import atomic_dir, write_json_atomic

MANIFEST = "refrag.json"
ADAPTER = "decoder_adapter"  # LoRA adapter of the decoder (peft format), when CPT trained one
FORMAT = "refrag-checkpoint"
FORMAT_VERSION = 1
IGNORE_INDEX = -100


@contextlib.contextmanager
def _hf_progress(enabled: bool) -> Iterator[None]:
    """transformers' own bars ("Loading weights") follow ``progress``; the global setting is restored after."""
    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing``: a FutureWarning on every
    adapter load that the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


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


@dataclass
class DecoderInputs:
    """A left-padded batch ready for the decoder."""

    inputs_embeds: torch.Tensor  # [B, T, D]
    attention_mask: torch.Tensor  # [B, T] long, 0 on left padding
    position_ids: torch.Tensor  # [B, T] long, 0.. on real positions
    labels: torch.Tensor | None = None  # [B, T] long, target after each position
    compressed: bool = True  # some position holds a chunk vector (selects the decoder adapter, if any)


def segments_layout(
    segments: Sequence[Sequence[int] | torch.Tensor], dim: int, dtype: torch.dtype
) -> Layout:
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


class RefragModel(nn.Module):
    """Encoder + projector + decoder. Build with :meth:`from_config` or :meth:`load`."""

    def __init__(
        self,
        config: RefragConfig,
        encoder: PreTrainedModel,
        encoder_tokenizer,
        decoder: PreTrainedModel,
        decoder_tokenizer,
        projector: Projector | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.encoder_tokenizer = encoder_tokenizer
        self.decoder = decoder
        self.tokenizer = decoder_tokenizer
        if config.target_rms is None:
            config.target_rms = embedding_rms(decoder)
        self.projector = projector or Projector(
            encoder.config.hidden_size, decoder.config.hidden_size, config.target_rms
        )
        self.projector.to(device=decoder.device, dtype=decoder.dtype)
        self.merged_decoder: PreTrainedModel | None = None  # see merge_adapter

    # ---------------------------------------------------------------- construction, save, load
    @classmethod
    def from_config(cls, config: RefragConfig, *, progress: bool = True) -> RefragModel:
        """Load the decoder and encoder named in ``config`` (built-in names, folders or HF ids)."""
        from refrag.models import resolve

        dtype = getattr(torch, config.dtype)
        dec = resolve(config.decoder, progress=progress).path
        enc = resolve(config.encoder, progress=progress).path
        with _hf_progress(progress):
            return cls(
                config,
                encoder=AutoModel.from_pretrained(enc, dtype=dtype),
                encoder_tokenizer=AutoTokenizer.from_pretrained(enc),
                decoder=AutoModelForCausalLM.from_pretrained(dec, dtype=dtype),
                decoder_tokenizer=AutoTokenizer.from_pretrained(dec),
            )

    def save(self, path: str | Path, *, save_encoder: bool = True, save_decoder: bool = False) -> Path:
        """Write a checkpoint folder atomically: manifest + projector (+ encoder / decoder HF folders).

        Components not saved are referenced by their spec in the manifest (e.g. a frozen built-in decoder).
        """
        path = Path(path)
        if save_decoder and self.has_adapter:
            raise InputError("a decoder with a LoRA adapter is saved as the adapter alone: pass save_decoder=False "
                             "(the manifest references the base decoder by its name or folder).")
        with atomic_dir(path) as tmp:
            config = asdict(self.config)
            components = {"encoder": self.config.encoder, "decoder": self.config.decoder}
            for name, model, tok, keep in (
                ("encoder", self.encoder, self.encoder_tokenizer, save_encoder),
                ("decoder", self.decoder, self.tokenizer, save_decoder),
            ):
                if keep:
                    model.save_pretrained(tmp / name, safe_serialization=True)
                    tok.save_pretrained(tmp / name)
                    components[name] = config[name] = name  # inside the checkpoint, not where it was loaded from
            if self.has_adapter:
                self.decoder.save_pretrained(tmp / ADAPTER)  # peft writes the adapter only (safetensors)
                (tmp / ADAPTER / "README.md").unlink(missing_ok=True)  # peft's blank model card (a local path)
                components[ADAPTER] = ADAPTER
            state = {k: v.detach().float().contiguous().cpu() for k, v in self.projector.state_dict().items()}
            save_file(state, str(tmp / "projector.safetensors"))
            write_json_atomic(
                tmp / MANIFEST,
                {
                    "format": FORMAT,
                    "version": FORMAT_VERSION,
                    "config": config,
                    "components": components,
                    "encoder_hidden": self.encoder.config.hidden_size,
                    "decoder_hidden": self.decoder.config.hidden_size,
                },
            )
        return path

    @classmethod
    def load(cls, path: str | Path, *, dtype: str | None = None, progress: bool = True) -> RefragModel:
        """Load a checkpoint folder written by :meth:`save`; mismatches are CheckpointErrors."""
        path = Path(path)
        manifest = read_manifest(path)
        config = RefragConfig(**manifest["config"])
        if dtype is not None:
            config.dtype = dtype  # type: ignore[assignment]
        adapter = manifest["components"].get(ADAPTER)
        for name in ("encoder", "decoder"):
            spec = manifest["components"][name]
            local = path / spec
            setattr(config, name, str(local) if local.is_dir() else spec)
        try:
            state = load_file(str(path / "projector.safetensors"))
        except Exception as e:  # safetensors raises several types for truncated/corrupt files
            raise CheckpointError(f"{path}/projector.safetensors is missing or corrupt ({e}).") from e
        model = cls.from_config(config, progress=progress)
        expected = (model.decoder.config.hidden_size, model.encoder.config.hidden_size)
        got = tuple(state.get("fc1.weight", torch.empty(0, 0)).shape)
        if got != expected:
            raise CheckpointError(
                f"{path}: projector maps encoder {got[1:]} -> decoder {got[:1]}, but the loaded encoder/decoder "
                f"have hidden sizes {expected[1]} / {expected[0]}. Load it with the models it was trained for."
            )
        try:
            model.projector.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{path}/projector.safetensors does not match the projector: {e}") from e
        model.projector.to(device=model.decoder.device, dtype=model.decoder.dtype)
        if adapter is not None:
            model.attach_adapter(path / adapter)
        return model

    # ---------------------------------------------------------------- decoder adapter (LoRA)
    @property
    def has_adapter(self) -> bool:
        return hasattr(self.decoder, "disable_adapter")  # a peft model

    def add_lora(self, rank: int) -> None:
        """Wrap the decoder with a fresh LoRA adapter on every linear layer but the LM head (trainable)."""
        from peft import LoraConfig, get_peft_model

        if self.has_adapter:
            raise InputError("the decoder already has an adapter; train it further instead of adding one.")
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
        with _quiet_peft():
            self.decoder = get_peft_model(self.decoder, config, autocast_adapter_dtype=False)

    def attach_adapter(self, folder: Path) -> None:
        """Wrap the decoder with a saved LoRA adapter (frozen; training marks it trainable again)."""
        from peft import PeftModel

        try:
            with _quiet_peft():
                self.decoder = PeftModel.from_pretrained(self.decoder, str(folder), autocast_adapter_dtype=False)
        except Exception as e:  # peft raises ValueError/OSError/KeyError for missing, corrupt or foreign adapters
            raise CheckpointError(f"{folder}: the decoder adapter is missing, corrupt or for another decoder ({e}).") from e
        self.decoder.to(dtype=self.dtype)

    def merge_adapter(self) -> None:
        """Inference speed-up: a second copy of the decoder with the adapter merged into its weights, used for
        compressed inputs. An unmerged LoRA adds ~400 small matmuls to every forward (on 2 CPU cores +0.06-0.1 s
        per prefill and +15 ms per token, docs/bench/ttft.md). Costs one more decoder's memory; for inference
        only (the copy does not follow further training of the adapter)."""
        if self.has_adapter and self.merged_decoder is None:
            self.merged_decoder = copy.deepcopy(self.decoder).merge_and_unload().requires_grad_(False).eval()

    @contextlib.contextmanager
    def decoder_for(self, compressed: bool) -> Iterator[PreTrainedModel]:
        """The decoder module to run. The adapter belongs to REFRAG inputs: text-only inputs (full context, no
        context) run the original decoder, so baselines and plain RAG stay exactly the decoder's own."""
        if compressed and self.merged_decoder is not None:
            yield self.merged_decoder
        elif self.has_adapter and not compressed:
            with self.decoder.disable_adapter():
                yield self.decoder
        else:
            yield self.decoder

    # ---------------------------------------------------------------- encoding
    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.dtype

    @property
    def k(self) -> int:
        return self.config.k

    def encode_chunks(self, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        """Chunk texts -> pooled encoder outputs [N, E] (what an index stores; projection comes later).

        Texts are sorted by length and batched so padding stays small; the output keeps input order.
        """
        if not texts:
            return torch.empty(0, self.encoder.config.hidden_size, dtype=self.dtype, device=self.device)
        enc = self.encoder_tokenizer(
            list(texts), truncation=True, max_length=self.config.encoder_max_tokens, padding=False
        )["input_ids"]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
        pad = self.encoder_tokenizer.pad_token_id or 0
        out = torch.empty(len(enc), self.encoder.config.hidden_size, dtype=self.dtype, device=self.device)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(enc[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(enc[i])] = torch.tensor(enc[i])
                mask[row, : len(enc[i])] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [b, t, E]
            out[torch.tensor(idx, device=self.device)] = pool(hidden, mask, self.config.pooling).to(self.dtype)
        return out

    def project(self, encoded: torch.Tensor) -> torch.Tensor:
        """[N, E] encoder outputs -> [N, D] decoder-space chunk embeddings."""
        return self.projector(encoded.to(device=self.device, dtype=self.dtype))

    def embed_chunks(self, texts: Sequence[str]) -> torch.Tensor:
        """Chunk texts -> [N, D] decoder-space chunk embeddings (encode + project)."""
        return self.project(self.encode_chunks(texts))

    # ---------------------------------------------------------------- decoder inputs
    def build_inputs(self, layouts: Sequence[Layout]) -> DecoderInputs:
        """Embed and left-pad a batch of layouts.

        Raw-token rows come from the decoder's own embedding module (so model-specific scaling such as
        Gemma's sqrt(d) applies); vector rows are placed at their positions in order.
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
            embeds, mask, position_ids, labels.to(self.device) if has_labels else None, compressed=bool(vectors)
        )

    def forward(self, inputs: DecoderInputs) -> torch.Tensor:
        """Mean next-token cross-entropy over positions whose label is set (logits only computed there)."""
        return label_cross_entropy(*self.label_logits(inputs))

    def label_logits(self, inputs: DecoderInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, K, V] and labels [B, K] at the K positions where any example has a label."""
        if inputs.labels is None:
            raise InputError("forward() needs labels; use decoder_logits() for inference.")
        keep = (inputs.labels != IGNORE_INDEX).any(0).nonzero().squeeze(-1)  # [K] positions with a target
        with self.decoder_for(inputs.compressed) as decoder:
            out = decoder(
                inputs_embeds=inputs.inputs_embeds,
                attention_mask=inputs.attention_mask,
                position_ids=inputs.position_ids,
                logits_to_keep=keep,
                use_cache=False,
            )
        return out.logits, inputs.labels[:, keep]

    def decoder_logits(self, inputs: DecoderInputs) -> torch.Tensor:
        """Full logits [B, T, V] (for tests and analysis)."""
        with self.decoder_for(inputs.compressed) as decoder:
            return decoder(
                inputs_embeds=inputs.inputs_embeds,
                attention_mask=inputs.attention_mask,
                position_ids=inputs.position_ids,
                use_cache=False,
            ).logits


def label_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, K, V] against labels [B, K] (IGNORE_INDEX skipped), in fp32."""
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def start_token(tokenizer) -> int | None:
    """The token every training / scoring sequence starts with: BOS, else EOS, else None.

    Decoders use their first position as an attention sink (attention mass parks there, its value is barely
    read); a chunk vector at position 0 would be ignored, so sequences start with this token instead.
    """
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return None


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, E] hidden states + [B, T] mask -> [B, E]."""
    if how == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


@torch.no_grad()
def embedding_rms(decoder: PreTrainedModel, sample: int = 8192) -> float:
    """RMS of the decoder's token-embedding rows (as its embedding module outputs them)."""
    emb = decoder.get_input_embeddings()
    vocab = emb.weight.shape[0]
    ids = torch.linspace(0, vocab - 1, min(sample, vocab)).long().to(emb.weight.device)
    return float(emb(ids).float().pow(2).mean().sqrt())


def read_manifest(path: Path) -> dict:
    """Read and validate a checkpoint manifest."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; a refrag checkpoint is a folder with {MANIFEST}.")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} has no {MANIFEST}: not a refrag checkpoint (or a half-copied one).") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}/{MANIFEST} is corrupt ({e}); restore it or re-save the model.") from e
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("config"), dict):
        raise CheckpointError(f"{path}/{MANIFEST} is not a refrag checkpoint manifest.")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer refrag (format {manifest['version']}); upgrade refrag."
        )
    return manifest
