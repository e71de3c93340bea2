"""Checkpoint folders: the typed manifest, save / load, and ``load_model`` (what a user typed -> a RefragModel).

A checkpoint folder (written atomically)::

    refrag.json             versioned manifest: the RefragConfig, where each component is, and the size and
                            sha256 of every other file (verified on load: ``refrag.integrity``)
    projector.safetensors   the projector (fp32 or bf16)
    encoder/                the chunk encoder, when it was trained (else referenced by its spec): a Hugging Face
                            folder for a text encoder; encoder.safetensors (adapter only) for ``self`` / ``tokens``
    decoder/                the decoder, when it was trained in full (else referenced by its spec)
    decoder_adapter/        the decoder's LoRA adapter (peft format), when one was trained
    answer_adapter/         an answer adapter trained on top of this (frozen) compressor (``refrag train sft --learn
                            adapter``; peft format): it runs beside decoder_adapter, on compressed inputs only
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from refrag.config import DEFAULT_DECODER, DEFAULT_ENCODER, DEFAULT_K, RefragConfig
from refrag.encoders import BUILT_FROM_DECODER, SELF, build_encoder
from refrag.errors import CheckpointError, InputError
from refrag.integrity import CHECKSUM_LIMIT, FileRecord, record_tree, total_bytes, verify
from refrag.io import atomic_dir, write_json_atomic
from refrag.manifest import ManifestKind, parse_typed, read_manifest
from refrag.modeling import ANSWER_ADAPTER, COMPRESSOR_ADAPTER, RefragModel
from refrag.precision import resolve_dtype

log = logging.getLogger(__name__)

CHECKPOINT = ManifestKind("refrag.json", "refrag-checkpoint", 1, "refrag checkpoint",
                          "or a half-copied one: restore it or re-save the model")
MANIFEST = CHECKPOINT.filename
ADAPTER = "decoder_adapter"  # LoRA adapter of the decoder (peft format), when training made one
ANSWER = "answer_adapter"  # an answer adapter trained on top of the frozen compressor (RefragModel.add_answer_adapter)
# config.extra key of a checkpoint with an answer adapter: the stage that trained its (frozen) compressor, which is
# what a further stage starts from (the answer adapter is left behind: refrag.train.common.load_for_stage)
COMPRESSOR_STAGE = "compressor_stage"
POLICY = "policy"  # a learned expansion policy (refrag.learned_policy), when one was trained
PROJECTOR = "projector.safetensors"
RESTORE = "Restore the checkpoint folder from where it came, or re-save / re-export the model."
# The compressors trained for the embedded default decoder (SmolLM2-135M; chunk encoder: its own first 8 layers
# + LoRA, memory-token pooling), one folder per k; k=16 is the default.
SHIPPED = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_CHECKPOINT = SHIPPED / "smollm2-135m-self-k16"


def shipped_checkpoint(k: int) -> Path | None:
    """The shipped compressor of the default decoder and encoder at ``k``, if one ships."""
    path = SHIPPED / f"smollm2-135m-self-k{k}"
    return path if (path / MANIFEST).exists() else None


@dataclass(frozen=True)
class CheckpointManifest:
    """refrag.json: the model's config and where each component lives (a folder inside, or a spec)."""

    config: RefragConfig
    components: dict[str, str]  # "encoder" / "decoder" -> folder name inside the checkpoint or a model spec
    encoder_hidden: int
    decoder_hidden: int
    files: dict[str, FileRecord] = field(default_factory=dict)  # every other file as written (empty before 0.9)

    @property
    def adapter(self) -> str | None:
        return self.components.get(ADAPTER)

    @property
    def answer_adapter(self) -> str | None:
        return self.components.get(ANSWER)

    @property
    def policy(self) -> str | None:
        return self.components.get(POLICY)

    @property
    def stage(self) -> str | None:
        """The training stage that wrote it (None for an untrained one)."""
        return self.config.extra.get("stage")

    @property
    def compressor_stage(self) -> str | None:
        """The stage that trained its compressor: ``stage``, unless an answer adapter was trained on top of a
        frozen compressor (``train sft --learn adapter``), which records the compressor's own stage."""
        return self.config.extra.get(COMPRESSOR_STAGE, self.stage)

    def to_json(self) -> dict:
        config = asdict(self.config)
        if self.config.encoder != SELF:  # self-encoder settings: absent for others, so their manifests stay as before
            del config["encoder_layers"], config["encoder_lora_rank"]
        if self.config.decoder_adapter is None:  # likewise the user-adapter fields for the base decoder
            del config["decoder_adapter"], config["decoder_adapter_sha256"]
        if self.config.quantize is None:
            del config["quantize"]
        if self.config.adapter_scope == "sequence":  # the scope every earlier manifest had
            del config["adapter_scope"]
        return {**CHECKPOINT.header(), "config": config, "components": dict(self.components),
                "encoder_hidden": self.encoder_hidden, "decoder_hidden": self.decoder_hidden,
                "files": {name: asdict(r) for name, r in self.files.items()}}

    @classmethod
    def read(cls, path: str | Path) -> CheckpointManifest:
        """The manifest, every field checked against its type (CheckpointError naming the field)."""
        path = Path(path)
        return parse_typed(cls, read_manifest(path, CHECKPOINT), f"{path}/{MANIFEST}", RESTORE)

    def verify(self, path: Path) -> None:
        """Every file against its record: sizes always, sha256 too up to CHECKSUM_LIMIT bytes in all."""
        verify(path, self.files, checksums=total_bytes(self.files) <= CHECKSUM_LIMIT, remedy=RESTORE)


@contextlib.contextmanager
def _hf_progress(enabled: bool) -> Iterator[None]:
    """transformers' own bars ("Loading weights") follow ``progress``; the global setting is restored after."""
    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def from_config(config: RefragConfig, *, progress: bool = True, encoder_from_base: bool = False) -> RefragModel:
    """Fresh parts: the decoder and chunk encoder named in ``config`` (built-in names, folders or HF ids; the
    ``self`` / ``tokens`` encoders are built from the decoder), a new (untrained) projector.

    ``encoder_from_base``: with ``config.decoder_adapter``, a ``self`` / ``tokens`` encoder is built from the
    decoder BEFORE the adapter is merged (a compressor of the base decoder composed with a user's adapter: its
    chunk vectors stay the ones it was trained to make); otherwise from the adapted decoder."""
    from refrag.models import resolve

    dec = resolve(config.decoder, progress=progress).path
    with _hf_progress(progress):
        tokenizer = AutoTokenizer.from_pretrained(dec)
        if config.decoder_adapter is None:
            decoder = AutoModelForCausalLM.from_pretrained(dec, dtype=getattr(torch, config.dtype))
            return RefragModel(config, build_encoder(config, decoder, tokenizer, progress=progress), decoder, tokenizer)
        from refrag.user_adapter import merge_user_adapter

        base = AutoModelForCausalLM.from_pretrained(dec, dtype=torch.float32)  # merged in fp32, then cast
        early = encoder_from_base and config.encoder in BUILT_FROM_DECODER
        encoder = build_encoder(config, base, tokenizer, progress=progress) if early else None
        embeddings = base.get_input_embeddings().weight.detach().clone() if early else None  # shared with the encoder
        decoder, digest = merge_user_adapter(base, config.decoder_adapter, config.decoder_adapter_sha256)
        if early and not torch.equal(embeddings, decoder.get_input_embeddings().weight):
            raise InputError(f"decoder adapter {config.decoder_adapter} changes the token embeddings, which the "
                             f"{config.encoder} chunk encoder shares with the decoder: train a compressor for the "
                             "adapted decoder (`refrag train reconstruct --decoder-adapter ...`).")
        decoder = decoder.to(getattr(torch, config.dtype))
        local = Path(config.decoder_adapter).expanduser()
        spec = str(local.resolve()) if local.exists() else config.decoder_adapter  # a folder: where it is
        config = replace(config, decoder_adapter=spec, decoder_adapter_sha256=digest)
        if encoder is None:
            encoder = build_encoder(config, decoder, tokenizer, progress=progress)
        return RefragModel(config, encoder, decoder, tokenizer)


def save(model: RefragModel, path: str | Path, *, save_encoder: bool = True, save_decoder: bool = False) -> Path:
    """Write a checkpoint folder atomically: manifest + projector (+ encoder / decoder HF folders, adapter).

    Components not saved are referenced by their spec in the manifest (e.g. a frozen built-in decoder).
    """
    path = Path(path)
    if save_decoder and model.config.quantize is not None:
        raise InputError("a quantized decoder is not saved: save the model before quantizing (the checkpoint "
                         "records --quantize and load_model applies it again).")
    if save_decoder and model.has_adapter:
        raise InputError("a decoder with a LoRA adapter is saved as the adapter alone: pass save_decoder=False "
                         "(the manifest references the base decoder by its name or folder).")
    with atomic_dir(path, replaces=(MANIFEST, "refrag checkpoint")) as tmp:
        config = model.config
        components = {"encoder": config.encoder, "decoder": config.decoder}
        if save_encoder or config.encoder in BUILT_FROM_DECODER:  # a built encoder is only its (small) trained part
            model.encoder.save(tmp / "encoder")
            components["encoder"] = "encoder"  # inside the checkpoint, not where it was loaded from
            if config.encoder not in BUILT_FROM_DECODER:  # a text encoder: the folder IS the encoder
                config = replace(config, encoder="encoder")
        if save_decoder:
            model.decoder.save_pretrained(tmp / "decoder", safe_serialization=True)
            model.tokenizer.save_pretrained(tmp / "decoder")
            components["decoder"] = "decoder"
            config = replace(config, decoder="decoder")
            if config.decoder_adapter is not None:  # the saved weights hold it: never merge it in a second time
                config = replace(config, decoder_adapter=None, decoder_adapter_sha256=None,
                                 extra={**config.extra, "merged_decoder_adapter": config.decoder_adapter})
        if model.has_adapter:
            _save_adapter(model, COMPRESSOR_ADAPTER, tmp / ADAPTER)
            components[ADAPTER] = ADAPTER
        if model.has_answer_adapter:
            _save_adapter(model, ANSWER_ADAPTER, tmp / ANSWER)
            components[ANSWER] = ANSWER
        if model.policy_network is not None:
            from refrag.learned_policy import save_policy

            save_policy(model.policy_network, tmp / POLICY)  # type: ignore[arg-type]
            components[POLICY] = POLICY
        state = {k: v.detach().float().contiguous().cpu() for k, v in model.projector.state_dict().items()}
        save_file(state, str(tmp / PROJECTOR))
        manifest = CheckpointManifest(config, components, model.encoder.hidden_size, model.hidden_size,
                                      record_tree(tmp, skip=(MANIFEST,)))
        write_json_atomic(tmp / MANIFEST, manifest.to_json())
    return path


def _save_adapter(model: RefragModel, name: str, folder: Path) -> None:
    """One of the decoder's peft adapters as a folder of its own (peft writes the adapter only, safetensors;
    an adapter not named "default" goes into a subfolder of its name, moved up here)."""
    model.decoder.save_pretrained(folder, selected_adapters=[name])
    if name != COMPRESSOR_ADAPTER:
        for f in (folder / name).iterdir():
            f.rename(folder / f.name)
        (folder / name).rmdir()
    (folder / "README.md").unlink(missing_ok=True)  # peft's blank model card (a local path)


def load(path: str | Path, *, dtype: str | None = None, progress: bool = True,
         decoder_adapter: str | None = None, answer_adapter: bool = True) -> RefragModel:
    """Load a checkpoint folder written by :func:`save`; mismatches are CheckpointErrors.

    ``answer_adapter``: attach the checkpoint's answer adapter when it has one (False: the compressor alone, as
    continuation scoring and further compressor training read it).

    ``decoder_adapter``: a user's LoRA adapter of the decoder (``refrag.user_adapter``). A compressor trained with
    one accepts only that one (by digest) and loads it from its recorded spec when none is given; a compressor
    of the base decoder composes with any (a warning: it was not trained for it).
    """
    path = Path(path)
    manifest = CheckpointManifest.read(path)
    manifest.verify(path)
    built = manifest.config.encoder in BUILT_FROM_DECODER  # rebuilt from the decoder, trained weights loaded below
    parts = {name: str(path / spec) if (path / spec).is_dir() else spec
             for name in ("encoder", "decoder") for spec in [manifest.components[name]] if not (built and name == "encoder")}
    composed = decoder_adapter is not None and manifest.config.decoder_adapter is None  # a base compressor + theirs
    if decoder_adapter is not None:
        parts["decoder_adapter"] = decoder_adapter
        if composed:
            log.warning("%s was trained on the base decoder; composing it with the decoder adapter %s: refrag mode "
                        "can lose all of its context benefit (measured for a mild adapter in docs/byo.md; check "
                        "yours with `refrag eval perplexity`) - train a compressor with --decoder-adapter",
                        path, decoder_adapter)
    config = replace(manifest.config, **parts, **({"dtype": dtype} if dtype is not None else {}),
                     quantize=None)  # quantization is load_model's (inference only): the weights load as trained
    try:
        state = load_file(str(path / PROJECTOR))
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise CheckpointError(f"{path}/{PROJECTOR} is missing or corrupt ({e}).") from e
    model = from_config(config, progress=progress, encoder_from_base=composed)  # its encoder: the base decoder's
    if built and (path / manifest.components["encoder"]).is_dir():
        model.encoder.load_weights(path / manifest.components["encoder"])
    expected = (model.hidden_size, model.encoder.hidden_size)
    got = tuple(state.get("fc1.weight", torch.empty(0, 0)).shape)
    if got != (manifest.decoder_hidden, manifest.encoder_hidden):
        raise CheckpointError(f"{path}/{MANIFEST} says encoder {manifest.encoder_hidden} -> decoder "
                              f"{manifest.decoder_hidden} wide, but its projector maps {got[1:]} -> {got[:1]}. {RESTORE}")
    if got != expected:
        raise CheckpointError(
            f"{path}: projector maps encoder {got[1:]} -> decoder {got[:1]}, but the loaded encoder/decoder "
            f"have hidden sizes {expected[1]} / {expected[0]}. Load it with the models it was trained for."
        )
    try:
        model.projector.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}/{PROJECTOR} does not match the projector: {e}") from e
    model.projector.to(device=model.device, dtype=model.dtype)
    if manifest.adapter is not None:
        model.attach_adapter(path / manifest.adapter)
    if manifest.answer_adapter is not None and answer_adapter:
        model.attach_adapter(path / manifest.answer_adapter, answer=True)
    if manifest.policy is not None:
        from refrag.learned_policy import load_policy

        model.policy_network = load_policy(path / manifest.policy).to(model.device)
    return model


def export(source: str | Path, target: str | Path) -> Path:
    """The shippable copy of a trained checkpoint: trained parts stored in bf16 (half the bytes), frozen
    built-in parts referenced by name."""
    original = CheckpointManifest.read(source).config
    model = load(source, dtype="bfloat16", progress=False)
    model.config = replace(model.config, encoder=original.encoder, decoder=original.decoder)  # names, not paths
    return save(model, target, save_encoder=(Path(source) / "encoder").is_dir(),
                save_decoder=(Path(source) / "decoder").is_dir())


def load_model(
    checkpoint: str | Path | None = None,
    *,
    decoder: str | None = None,
    encoder: str | None = None,
    k: int | None = None,
    dtype: str = "auto",
    progress: bool = True,
    merge: bool = True,
    decoder_adapter: str | None = None,
    quantize: str | None = None,
    answer_adapter: bool = True,
) -> RefragModel:
    """A trained checkpoint when given (or the shipped one for the default models at ``k``: ``shipped_checkpoint``),
    else fresh parts.

    ``decoder_adapter``: a PEFT LoRA adapter folder (or HF id) of the decoder, merged into it: full mode runs
    base + adapter, refrag mode adds the compressor's own adapter on top (see :func:`load`). ``quantize``
    ("int8" / "int4", or a checkpoint's recorded scheme; "none" overrides the recorded one): weight-only
    quantization of the decoder for inference (``refrag.quantize``). ``answer_adapter``: as in :func:`load`.

    ``decoder`` / ``encoder`` / ``k`` left as None mean the defaults (SmolLM2-135M-Instruct, the self-encoder,
    16); with a checkpoint they are its own (a contradicting ``k`` is an error). ``merge`` keeps a merged copy of an adapted
    decoder for compressed inputs (faster decoding, one more decoder's memory, ~1 s); commands that only encode
    chunks (index build/add/bench) pass False. A fresh projector is untrained: compressed chunks are then noise
    to the decoder (full mode is unaffected).
    ``dtype``: "auto" (bfloat16 where the hardware multiplies it natively, else float32: ``refrag.precision``),
    "bfloat16" or "float32".
    """
    dtype = resolve_dtype(dtype)
    is_default = (decoder or DEFAULT_DECODER, encoder or DEFAULT_ENCODER) == (DEFAULT_DECODER, DEFAULT_ENCODER)
    if checkpoint is not None:  # the user's own: what else they asked for must agree with it
        _check_agrees(CheckpointManifest.read(checkpoint), checkpoint, k)
    elif is_default:
        checkpoint = shipped_checkpoint(k or DEFAULT_K)
    if checkpoint is not None:
        model = load(checkpoint, dtype=dtype, progress=progress, decoder_adapter=decoder_adapter,
                     answer_adapter=answer_adapter)
        if merge:
            model.merge_adapter()  # a no-op without an adapter
        return _quantized(model, quantize or CheckpointManifest.read(checkpoint).config.quantize)  # "none": off
    config = RefragConfig(decoder=decoder or DEFAULT_DECODER, encoder=encoder or DEFAULT_ENCODER,
                          k=k or DEFAULT_K, dtype=dtype, decoder_adapter=decoder_adapter)  # type: ignore[arg-type]
    model = from_config(config, progress=progress)
    log.warning("no trained compressor for %s + %s at k=%d: the projector is untrained",
                config.decoder, config.encoder, config.k)
    return _quantized(model, quantize)


def _quantized(model: RefragModel, scheme: str | None) -> RefragModel:
    if scheme not in (None, "none"):
        from refrag.quantize import quantize_decoder

        quantize_decoder(model, scheme)
    return model


def _check_agrees(manifest: CheckpointManifest, path, k: int | None) -> None:
    """--k given with a checkpoint must be the k it was trained with: an error, not silently dropped. (--decoder /
    --encoder are not compared: the same model has several valid specs, and a trained encoder is a folder.)"""
    if k is not None and k != manifest.config.k:
        raise InputError(f"{path} was trained with other settings: --k {k} (the checkpoint has {manifest.config.k}). "
                         "Drop --k to use the checkpoint as it is, or load the models without --model.")
