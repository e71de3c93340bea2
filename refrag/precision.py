"""Which float type is fast on this machine: bf16 where the hardware multiplies it natively, else fp32.

Measured on two hosts of the same cloud (docs/training.md, "bf16 or fp32 depends on the host"): a [512 x 576] x [576 x 1536]
matmul took 8.6 ms fp32 / 57.6 ms bf16 on an AMD EPYC without AVX512-BF16 (bf16 emulated: 7x slower) and
5.5 ms fp32 / 1.3 ms bf16 on one with it (4x faster). So ``"auto"`` (the default ``--dtype`` and ``--bf16``)
asks the hardware instead of assuming.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from refrag.config import DType

AUTO = "auto"


@functools.cache
def native_bf16() -> bool:
    """True where bf16 matmuls run natively: a CUDA GPU that supports bf16, or a CPU with AVX512-BF16 or AMX
    (x86), or the BF16 extension (aarch64). Unknown: False (fp32 is never the slow choice)."""
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if platform.machine().lower() in ("x86_64", "amd64") and any(probes):
        return any(bool(p()) for p in probes if p is not None)
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.lower().startswith(("flags", "features"))
            for flag in line.split(":", 1)[-1].split()}


def resolve_dtype(spec: str) -> DType | str:
    """``"auto"`` -> ``"bfloat16"`` where :func:`native_bf16`, else ``"float32"``; any other value unchanged (it is
    validated where it is used)."""
    if spec == AUTO:
        return "bfloat16" if native_bf16() else "float32"
    return spec


def resolve_bf16(flag: bool | None) -> bool:
    """Training's ``--bf16 / --no-bf16``; None (neither given) -> :func:`native_bf16`."""
    return native_bf16() if flag is None else flag
