"""--dtype auto / --bf16 default: bf16 only where the hardware multiplies it natively."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refrag import precision
from refrag.train.loop import TrainOptions


@pytest.fixture(autouse=True)
def fresh_probe():
    precision.native_bf16.cache_clear()
    yield
    precision.native_bf16.cache_clear()


@pytest.mark.parametrize(("native", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_auto_follows_the_hardware(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "native_bf16", lambda: native)
    assert precision.resolve_dtype("auto") == expected
    assert precision.resolve_bf16(None) is native
    assert TrainOptions(out_dir=Path("x"), steps=1).bf16 is native


def test_an_explicit_choice_is_kept(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    assert precision.resolve_dtype("float32") == "float32"
    assert precision.resolve_bf16(False) is False
    assert TrainOptions(out_dir=Path("x"), steps=1, bf16=False).bf16 is False


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [(False, False, False), (True, False, True),
                                                              (False, True, True)])
def test_x86_asks_torch_for_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert precision.native_bf16() is expected


@pytest.mark.parametrize(("flags", "expected"), [({"fp", "asimd", "bf16"}, True), ({"fp", "asimd"}, False), (set(), False)])
def test_other_cpus_read_their_feature_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    assert precision.native_bf16() is expected


def test_cpu_flags_parses_proc_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nFeatures\t: fp bf16\n")
    real = Path

    monkeypatch.setattr(precision, "Path", lambda p: info if p == "/proc/cpuinfo" else real(p))
    assert precision._cpu_flags() == {"fpu", "avx2", "avx512_bf16", "fp", "bf16"}

