"""LLMLingua (microsoft/LLMLingua, ``pip install llmlingua``) as a peer baseline, offline.

LLMLingua drops low-information tokens by the perplexity a small causal LM assigns them; the kept text is
then read by the decoder as plain tokens. Offline it needs one fix: its constructor calls
``tiktoken.encoding_for_model("gpt-3.5-turbo")``, which downloads ``cl100k_base.tiktoken`` from
openaipublic.blob.core.windows.net, only to COUNT tokens for its budget. We give it the scorer's own
tokenizer instead, so ``target_token`` is counted in decoder tokens: exactly the budget REFRAG's positions set.
A second fix is for transformers >= 5: LLMLingua 0.2.2 slices ``past_key_values`` as a list of ``[k, v]`` pairs
when a prompt spans several of its windows, but the model now returns a Cache object (``ValueError: too many
values to unpack``); :class:`_LegacyKV` converts between the two around the scorer's forward.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from unittest import mock

from refrag.errors import MissingPackageError


class _DecoderTokenCounter:
    """Stands in for a tiktoken Encoding (encode/decode) using a Hugging Face tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str, **_: object) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], **_: object) -> str:
        return self.tokenizer.decode(list(ids))


class _LegacyKV:
    """The scorer model, taking and returning past key/values as ``[[k, v], ...]`` (LLMLingua's format)."""

    def __init__(self, model) -> None:
        self._model = model

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def __call__(self, *args, past_key_values=None, **kwargs):
        from transformers import DynamicCache

        if past_key_values is not None and not isinstance(past_key_values, DynamicCache):
            cache = DynamicCache()
            for layer, (k, v) in enumerate(past_key_values):
                cache.update(k, v, layer)
            past_key_values = cache
        out = self._model(*args, past_key_values=past_key_values, **kwargs)
        if isinstance(out.past_key_values, DynamicCache):
            out.past_key_values = [[layer.keys, layer.values] for layer in out.past_key_values.layers]
        return out


@dataclass(frozen=True)
class Compressed:
    text: str
    tokens: int  # decoder tokens of the compressed text
    seconds: float  # compression time (counted in the baseline's TTFT)


class LLMLinguaCompressor:
    """Compress passages to a decoder-token budget with LLMLingua, scored by a local causal LM folder."""

    def __init__(self, scorer_path: str, tokenizer) -> None:
        try:
            from llmlingua import PromptCompressor
        except ImportError as e:
            raise MissingPackageError("the LLMLingua baseline", "pip install llmlingua") from e
        counter = _DecoderTokenCounter(tokenizer)
        with mock.patch("tiktoken.encoding_for_model", return_value=counter):
            self.compressor = PromptCompressor(model_name=scorer_path, device_map="cpu")
        self.compressor.oai_tokenizer = counter
        self.compressor.model = _LegacyKV(self.compressor.model)
        self.counter = counter

    def compress(self, passages: Sequence[str], question: str, target_tokens: int) -> Compressed:
        """The passages' text cut to about ``target_tokens`` decoder tokens (question-aware ranking)."""
        t0 = time.perf_counter()
        out = self.compressor.compress_prompt(
            list(passages), question=question, target_token=target_tokens, use_sentence_level_filter=False
        )
        seconds = time.perf_counter() - t0
        text = out["compressed_prompt"]
        return Compressed(text, len(self.counter.encode(text)), seconds)
