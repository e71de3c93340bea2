"""Drop two known, harmless warnings that third-party imports print on every run.

torchao (installed for ``--quantize int8``; peft and transformers import it whenever it is installed) logs
``Failed to load .../torchao/_C_*.so`` for its CUDA-only kernels on a CPU build of torch, and torch's pytree logs
a deprecation for each Enum torchao registers. Neither affects refrag (the int8 path uses torchao's Python
kernels); every other record of those loggers still shows.
"""

from __future__ import annotations

import logging
import re

_KNOWN = {
    "torchao": re.compile(r"Failed to load \S*torchao\S*/_C\S*\.so"),
    "torch.utils._pytree": re.compile(r"is an Enum subclass and is now natively supported"),
}


class _DropKnown(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def silence_known_noise() -> None:
    """Attach the filters (idempotent). Loggers are created lazily, so this works before torch is imported."""
    for name, pattern in _KNOWN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(pattern))
