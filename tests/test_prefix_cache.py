import torch

from refrag.modeling import segments_layout
from refrag.prefix_cache import prefix_kv

HEAD = [5, 9, 2, 7, 11, 3]


def _layouts(model):
    D = model.decoder.config.hidden_size
    vectors = torch.randn(3, D, generator=torch.Generator().manual_seed(0)) * 0.02
    return [
        segments_layout([HEAD, vectors[:2], [4, 8, 15]], D, model.dtype),
        segments_layout([HEAD, [16], vectors[2:], [23, 42, 6, 13, 9]], D, model.dtype),  # longer: row 0 is padded
    ]


def _last_logits(model, inputs, past=None, offset=0):
    mask = inputs.attention_mask
    if past is not None:
        mask = torch.cat([mask.new_ones(mask.shape[0], offset), mask], dim=1)
    out = model.decoder(inputs_embeds=inputs.inputs_embeds, attention_mask=mask,
                        position_ids=inputs.position_ids + offset, past_key_values=past, use_cache=True)
    return out.logits[:, -1]  # [B, V]


@torch.inference_mode()
def test_prefix_cache_gives_the_logits_of_a_full_prefill(model):
    """Head from the cache + padded rest == the whole padded layout prefilled at once (llama and qwen2)."""
    layouts = _layouts(model)
    reference = _last_logits(model, model.build_inputs(layouts))
    rest = model.build_inputs([x.without_head(len(HEAD)) for x in layouts])
    cached = _last_logits(model, rest, prefix_kv(model.decoder, HEAD, batch=2), offset=len(HEAD))
    torch.testing.assert_close(cached, reference, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_each_call_gets_its_own_copy(model):
    first = prefix_kv(model.decoder, HEAD, batch=1)
    rest = model.build_inputs([x.without_head(len(HEAD)) for x in _layouts(model)[:1]])
    _last_logits(model, rest, first, offset=len(HEAD))  # extends `first` in place
    assert first.get_seq_length() > len(HEAD)
    assert prefix_kv(model.decoder, HEAD, batch=1).get_seq_length() == len(HEAD)


def test_a_weight_update_invalidates_the_cache(model):
    before = prefix_kv(model.decoder, HEAD, batch=1).layers[0].keys.clone()
    with torch.no_grad():
        model.decoder.model.layers[0].self_attn.k_proj.weight.mul_(2.0)  # what an optimizer step does: in place
    after = prefix_kv(model.decoder, HEAD, batch=1).layers[0].keys
    assert not torch.allclose(before, after)
