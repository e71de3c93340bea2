"""Typed options: every bad value is an InputError naming the option; one range check for fractions."""

import pytest

from refrag.config import ChunkingOptions, CompressionOptions, RefragConfig, SamplingOptions, check_fraction
from refrag.errors import InputError


def test_bad_options():
    with pytest.raises(InputError, match="mode"):
        CompressionOptions(mode="zip")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="expand_fraction"):
        CompressionOptions(expand_fraction=1.5)
    with pytest.raises(InputError, match="policy"):
        CompressionOptions(policy="best")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="max_new_tokens"):
        SamplingOptions(max_new_tokens=0)
    with pytest.raises(InputError, match="top_p"):
        SamplingOptions(top_p=0)
    with pytest.raises(InputError, match="k must be"):
        ChunkingOptions(k=0)
    with pytest.raises(InputError, match="pooling"):
        RefragConfig(pooling="max")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="fp16"):
        RefragConfig(dtype="float16")  # type: ignore[arg-type]


def test_fraction_range_check():
    check_fraction(1.0, "--p")  # expanding every chunk is full mode: allowed at inference
    with pytest.raises(InputError, match=r"--p must be in \[0, 1\)"):
        check_fraction(1.0, "--p", below_one=True)
    for bad in (-0.1, 1.01, "0.5"):
        with pytest.raises(InputError, match="--p"):
            check_fraction(bad, "--p")  # type: ignore[arg-type]
    assert CompressionOptions(expand_fraction=1.0).expand_fraction == 1.0
