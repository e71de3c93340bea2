import torch
from conftest import tiny_refrag

from refrag.eval.llmlingua_baseline import _LegacyKV


@torch.inference_mode()
def test_legacy_kv_round_trip_gives_the_same_logits():
    """LLMLingua passes [[k, v], ...] back in; the wrapper must continue the same sequence as a real cache."""
    decoder = tiny_refrag("llama", k=4).decoder
    wrapped = _LegacyKV(decoder)
    ids = torch.tensor([[5, 9, 2, 7, 11, 3, 8, 6]])
    first = wrapped(ids[:, :5], use_cache=True)
    assert isinstance(first.past_key_values, list) and len(first.past_key_values[0]) == 2
    trimmed = [[k[..., :4, :], v[..., :4, :]] for k, v in first.past_key_values]  # LLMLingua slices like this
    second = wrapped(ids[:, 4:], past_key_values=trimmed, use_cache=True)
    reference = decoder(ids).logits[:, 4:]
    torch.testing.assert_close(second.logits, reference, atol=1e-4, rtol=1e-4)
    assert wrapped.config is decoder.config  # attributes reach the model
