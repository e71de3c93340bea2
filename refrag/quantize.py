"""Weight-only quantization of the decoder for inference (``--quantize int8|int4``, ``pip install 'refrag[quantize]'``).

What was measured on this project's 2-core AMD EPYC (torch 2.13 CPU, 8 linear layers of SmolLM2's shapes,
docs/byo.md): torchao's ``Int8WeightOnlyConfig`` is faster than optimum-quanto's int8; int4 on CPU is only
available through optimum-quanto's ``qint4`` (torchao's CPU int4 needs the ``mslk`` kernels, absent here). Both
save memory, not time: the weights are dequantized for every matmul. Only the decoder's linear layers are quantized: not the LM head (tied
with the input embeddings in SmolLM2, so quantizing it would add a copy; an untied head is quantized), not
LoRA matrices, not the chunk encoder (the ``self`` encoder's layers are a copy made before). Quantized weights are inference-only (no training on them); a checkpoint records the scheme and
``load_model`` applies it again, the decoder weights themselves stay referenced, never saved quantized.
"""

from __future__ import annotations

import fnmatch
from dataclasses import replace
from typing import Literal

import torch

from refrag.errors import InputError, MissingPackageError
from refrag.modeling import RefragModel

Scheme = Literal["int8", "int4"]
SKIP = ("*lora_A*", "*lora_B*", "*lora_embedding*")  # module names left as they are (LoRA matrices are tiny)
PIP = "pip install 'refrag[quantize]'"


def _targets(decoder: torch.nn.Module) -> list[str]:
    """Names of the linear layers to quantize: all but LoRA matrices and an LM head that shares its weight with
    the input embeddings (quantizing it would add a copy and change the embeddings' role)."""
    head = decoder.get_output_embeddings()
    tied = head is not None and head.weight is decoder.get_input_embeddings().weight
    return [n for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)
            and not any(fnmatch.fnmatch(n, p) for p in SKIP) and not (tied and m is head)]


def quantize_decoder(model: RefragModel, scheme: str) -> None:
    """Quantize the weights of every decoder ``nn.Linear`` (of the merged copy for compressed inputs too) in
    place. Run after ``merge_adapter`` (a LoRA adapter cannot be merged into quantized weights)."""
    if scheme not in ("int8", "int4"):
        raise InputError(f"--quantize must be int8 or int4 (got {scheme!r}).")
    if model.device.type != "cpu":
        raise InputError("--quantize is implemented for CPU inference (torchao int8 / quanto int4); on a GPU "
                         "load a bitsandbytes-quantized decoder folder as --decoder instead.")
    decoders = [d for d in (model.decoder, model.merged_decoder) if d is not None]
    with torch.inference_mode():  # quanto's int4 weights must be inference tensors to run under inference_mode
        for decoder in decoders:
            (_int8 if scheme == "int8" else _int4)(decoder, set(_targets(decoder)))
            decoder.requires_grad_(False)
    model.config = replace(model.config, quantize=scheme)  # recorded: a saved checkpoint loads quantized again
    _release_freed_memory()


def _release_freed_memory() -> None:
    """Hand the freed full-precision weights back to the OS (glibc keeps freed blocks in its pools otherwise, so
    the process would stay as large as before quantizing)."""
    import ctypes
    import gc
    import sys

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim with
            pass


def _int8(module: torch.nn.Module, names: set[str]) -> None:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise MissingPackageError("int8 quantization (torchao)", PIP) from e
    quantize_(module, Int8WeightOnlyConfig(), filter_fn=lambda m, name: name in names)


def _int4(module: torch.nn.Module, names: set[str]) -> None:
    try:
        from optimum.quanto import freeze, qint4, quantize
    except ImportError as e:
        raise MissingPackageError("int4 quantization (optimum-quanto)", PIP) from e
    quantize(module, weights=qint4, include=sorted(names))
    freeze(module)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer's storage, counted once (tied weights once; quantized tensors by
    their packed data and scales)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        for part in _storages(t):
            if part.data_ptr() not in seen:
                seen.add(part.data_ptr())
                total += part.nbytes()
    return total


def _storages(t: torch.Tensor) -> list:
    """The untyped storages behind a tensor (a tensor subclass such as a quantized weight holds several)."""
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        names, _ = inner()
        return [s for name in names for s in _storages(getattr(t, name))]
    return [t.untyped_storage()]
