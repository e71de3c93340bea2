"""KV cache of the constant prompt head (chat header, system turn, "Context:"), computed once per decoder.

Every question starts with the same template tokens, so their keys/values are the same for every request:
prefill them once, keep them, and let each request prefill only its context and question (the standard
"prompt caching" of LLM servers). Both ``full`` and ``refrag`` modes use it, so their comparison stays fair.

The stored cache is keyed by the prefix tokens and a signature of the decoder's weights (storage address +
in-place version counter of every parameter), so training steps, ``load_state_dict`` or a dtype change
invalidate it without any bookkeeping by the caller.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from weakref import WeakKeyDictionary

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

_STORE: WeakKeyDictionary[PreTrainedModel, tuple[tuple, Cache]] = WeakKeyDictionary()


def _signature(decoder: PreTrainedModel) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype) for p in decoder.parameters())


def prefix_kv(decoder: PreTrainedModel, prefix_ids: Sequence[int], batch: int) -> Cache:
    """A fresh cache holding the KV of ``prefix_ids`` for ``batch`` identical rows (the caller may extend it)."""
    key = (tuple(prefix_ids), _signature(decoder))
    stored = _STORE.get(decoder)
    if stored is None or stored[0] != key:
        ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=decoder.device)  # [1, P]
        with torch.inference_mode():
            cache = decoder(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
        _STORE[decoder] = stored = (key, cache)
    cache = copy.deepcopy(stored[1])
    if batch > 1:
        cache.batch_repeat_interleave(batch)
    return cache
