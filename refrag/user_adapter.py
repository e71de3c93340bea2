"""A user's own PEFT LoRA adapter of the decoder (``--decoder-adapter``), merged into the decoder at load time.

The merged decoder is then "the decoder": full mode runs base + the user's adapter exactly (within the merge's
rounding), refrag mode runs it under the compressor's own adapter. A compressor trained with a user adapter
records the adapter's spec and digest in its manifest (``RefragConfig.decoder_adapter*``); loading it with
another adapter is an error, loading a base-decoder compressor with one composes the two (a compressor trained
on the base: measure the cost with ``refrag eval perplexity``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from refrag.errors import CheckpointError, InputError, ModelNotFoundError
from refrag.integrity import sha256_of

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def adapter_folder(spec: str) -> Path:
    """A local adapter folder, or a Hugging Face id downloaded (online) into the hub cache."""
    path = Path(spec).expanduser()
    if not path.exists() and (path.is_absolute() or spec.startswith((".", "~"))):
        raise CheckpointError(f"decoder adapter folder {spec} does not exist. If a checkpoint recorded it (it was "
                              "trained with that adapter), give the adapter's new place with --decoder-adapter PATH: "
                              "its sha256 is what is checked, not its path.")
    if not path.exists() and _HUB_ID.fullmatch(spec):
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(spec, allow_patterns=[WEIGHTS, CONFIG]))
        except Exception as e:  # offline, unknown id, no access
            raise ModelNotFoundError(f"decoder adapter {spec!r}: not a local folder and not downloadable ({e}).") from e
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{spec}: not a PEFT adapter folder (no {CONFIG}); give the folder peft's "
                              "save_pretrained wrote.")
    if not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{spec}: no {WEIGHTS} (refrag never loads pickled adapter_model.bin files); "
                              "re-save the adapter with safe_serialization=True.")
    return path


def adapter_digest(folder: Path) -> str:
    """sha256 over the adapter's config and weights (what a compressor trained with it depends on)."""
    parts = {name: sha256_of(folder / name) for name in (CONFIG, WEIGHTS)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def merge_user_adapter(decoder: torch.nn.Module, spec: str, expected_digest: str | None) -> tuple[torch.nn.Module, str]:
    """The decoder with the adapter at ``spec`` merged into its weights, and the adapter's digest.

    ``expected_digest`` (from a checkpoint's manifest): the adapter must be the one the compressor was trained
    with, else CheckpointError.
    """
    from peft import PeftModel

    from refrag.modeling import quiet_peft

    folder = adapter_folder(spec)
    digest = adapter_digest(folder)
    if expected_digest is not None and digest != expected_digest:
        raise CheckpointError(f"decoder adapter {spec}: its files (sha256 {digest[:12]}...) are not the adapter this "
                              f"compressor was trained with (sha256 {expected_digest[:12]}...). Give that adapter, "
                              "or train a compressor for this one (`refrag train reconstruct --decoder-adapter`).")
    try:
        with quiet_peft():
            adapted = PeftModel.from_pretrained(decoder, str(folder), autocast_adapter_dtype=False)
    except Exception as e:  # peft raises ValueError / KeyError / RuntimeError for an adapter of another model
        raise InputError(f"decoder adapter {spec} does not fit the decoder ({e}): give an adapter trained on it.") \
            from e
    return adapted.merge_and_unload().eval(), digest
