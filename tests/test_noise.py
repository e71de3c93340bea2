"""The known third-party import noise is dropped; every other record of the same loggers still shows."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

import refrag  # noqa: F401  (installs the filters)


@pytest.mark.parametrize(
    ("logger", "message", "shown"),
    [
        ("torchao", "Failed to load /site-packages/torchao/_C_cutlass_90a.abi3.so: Could not load this library", False),
        ("torchao", "Failed to load /site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not", False),
        ("torchao", "Failed to load /site-packages/other/_C.so: missing", True),
        ("torchao", "Skipping import of cpp extensions due to incompatible torch version", True),
        ("torch.utils._pytree", "<enum 'X'> is an Enum subclass and is now natively supported by torch.compile", False),
        ("torch.utils._pytree", "something else", True),
    ],
)
def test_only_the_known_records_are_dropped(logger: str, message: str, shown: bool) -> None:
    record = logging.LogRecord(logger, logging.WARNING, __file__, 1, message, None, None)
    assert logging.getLogger(logger).filter(record) is shown


def test_importing_peft_after_refrag_prints_no_torchao_noise() -> None:
    code = "import refrag, peft"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert "Failed to load" not in out.stderr
    assert "is an Enum subclass" not in out.stderr
