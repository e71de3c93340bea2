
import pytest
import torch
from conftest import tiny_refrag, with_trained_lora

from refrag.config import RefragConfig
from refrag.errors import InputError
from refrag.modeling import (
    IGNORE_INDEX,
    Layout,
    Projector,
    RefragModel,
    context_segments,
    embedding_rms,
    mean_nll,
    scored_layout,
    segments_layout,
    token_nll,
)


def _random_ids(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, model.decoder.config.vocab_size, (n,), generator=g)


def test_all_expanded_matches_plain_decoder(model):
    """Parity: token rows through build_inputs give the plain HF decoder's logits (llama and qwen2)."""
    ids = _random_ids(model, 37)
    layout = segments_layout([ids[:20].tolist(), ids[20:].tolist()], model.decoder.config.hidden_size, model.dtype)
    ours = model.decoder_logits(model.build_inputs([layout]))
    ref = model.decoder(input_ids=ids[None]).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_left_padding_does_not_change_logits(model):
    short, long = _random_ids(model, 9, 1), _random_ids(model, 23, 2)
    dim = model.decoder.config.hidden_size
    vec = torch.randn(3, dim)
    layouts = [segments_layout([short.tolist(), vec], dim, model.dtype), segments_layout([long.tolist(), vec], dim, model.dtype)]
    batch = model.decoder_logits(model.build_inputs(layouts))  # [2, T, V]
    alone = model.decoder_logits(model.build_inputs(layouts[:1]))
    T = batch.shape[1]
    assert T == 26
    torch.testing.assert_close(batch[0, T - 12 :], alone[0], rtol=1e-4, atol=1e-4)


def test_mixed_layout_places_vectors_and_tokens_in_order(model):
    dim = model.decoder.config.hidden_size
    v = torch.randn(2, dim)
    layout = segments_layout([[11, 12], v[:1], [13, 14, 15], v[1:], [16]], dim, model.dtype)
    assert layout.is_vector.tolist() == [False, False, True, False, False, False, True, False]
    inputs = model.build_inputs([layout])
    emb = model.decoder.get_input_embeddings()
    rows = inputs.inputs_embeds[0]
    torch.testing.assert_close(rows[2], v[0])
    torch.testing.assert_close(rows[6], v[1])
    torch.testing.assert_close(rows[[0, 1, 3, 4, 5, 7]], emb(torch.tensor([11, 12, 13, 14, 15, 16])))
    assert inputs.position_ids[0].tolist() == list(range(8))


def test_vector_count_mismatch_is_an_error(model):
    with pytest.raises(InputError, match="vector positions"):
        Layout(torch.zeros(3, dtype=torch.long), torch.tensor([True, False, True]), torch.randn(1, 4))


def test_projector_output_rms_matches_decoder_embeddings(model):
    out = model.embed_chunks(["Paris is the capital", "of France.", "x"])  # [3, D]
    assert out.shape == (3, model.decoder.config.hidden_size)
    rms = out.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, embedding_rms(model.decoder)), rtol=1e-3, atol=1e-4)
    p = Projector(8, 16, target_rms=3.0)
    assert torch.allclose(p(torch.randn(5, 8) * 100).pow(2).mean(-1).sqrt(), torch.full((5,), 3.0), rtol=1e-3)


def test_encode_chunks_keeps_order_across_length_sorted_batches(model):
    texts = ["a much longer chunk of text than the others", "b", "medium chunk here", "c c"]
    batched = model.encode_chunks(texts, batch_size=2)
    single = torch.cat([model.encode_chunks([t]) for t in texts])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


def test_memoized_encodings_encode_each_distinct_chunk_once_and_match_plain_encoding(model, monkeypatch):
    chunks = [model.as_chunk(t) for t in ("alpha beta gamma", "delta", "alpha beta gamma", "epsilon zeta")]
    with torch.no_grad():
        plain = model.encode_chunks(chunks)
    seen = []
    encode = model.encoder.encode
    monkeypatch.setattr(model.encoder, "encode", lambda items, *a: seen.append(len(items)) or encode(items, *a))
    with torch.no_grad(), model.memoized_encodings():
        first = model.encode_chunks(chunks)
        again = model.encode_chunks(chunks[1:2] + [model.as_chunk("eta")])
        with model.memoized_encodings():  # a nested block shares the memo
            model.encode_chunks(chunks)
        with torch.enable_grad():
            model.encode_chunks(chunks[:1])  # with gradients the memo is bypassed: the encoder runs
    assert seen == [3, 1, 1]  # three distinct chunks, then only the new one, then the bypass
    torch.testing.assert_close(first, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again[0], plain[1], rtol=1e-4, atol=1e-4)
    model.encode_chunks(chunks[:1])  # outside the block: no memo, the encoder runs again
    assert seen == [3, 1, 1, 1] and model._memo is None


def test_loss_only_counts_labelled_positions(model):
    ids = _random_ids(model, 12, 3)
    dim = model.decoder.config.hidden_size
    layout = segments_layout([torch.randn(2, dim), ids.tolist()], dim, model.dtype)
    labels = torch.full((14,), IGNORE_INDEX)
    labels[1:13] = ids  # vector 2 predicts x1, x1 predicts x2, ...
    layout.labels = labels
    loss = model(model.build_inputs([layout]))
    logits = model.decoder_logits(model.build_inputs([layout]))[0]  # [14, V]
    ref = torch.nn.functional.cross_entropy(logits[1:13], ids)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_lora_adapter_applies_to_compressed_inputs_only(tmp_path):
    model = with_trained_lora(tmp_path)
    plain = tiny_refrag("llama")  # the same decoder weights, no adapter
    text = model.build_inputs([segments_layout([[2, 5, 6, 7]], 64, torch.float32)])
    assert not text.compressed
    torch.testing.assert_close(model.decoder_logits(text), plain.decoder_logits(text))
    vec = torch.randn(1, 64)
    mixed = model.build_inputs([segments_layout([[2], vec, [5, 6]], 64, torch.float32)])
    assert mixed.compressed
    assert not torch.allclose(model.decoder_logits(mixed), plain.decoder_logits(mixed), atol=1e-3)


def test_merged_adapter_gives_the_adapter_logits_and_leaves_text_inputs_alone(tmp_path):
    model = with_trained_lora(tmp_path)
    text = model.build_inputs([segments_layout([[2, 5, 6, 7]], 64, torch.float32)])
    mixed = model.build_inputs([segments_layout([[2], torch.randn(2, 64), [5, 6]], 64, torch.float32)])
    before = model.decoder_logits(text), model.decoder_logits(mixed)
    model.merge_adapter()
    assert model.merged_decoder is not None and not hasattr(model.merged_decoder, "disable_adapter")
    torch.testing.assert_close(model.decoder_logits(mixed), before[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.decoder_logits(text), before[0])  # still the original decoder
    with model.decoder_for(compressed=True) as decoder:
        assert decoder is model.merged_decoder


def test_context_segments_is_the_one_interleaving():
    from refrag.chunking import Chunk

    chunks = [Chunk((10 + i, 20 + i), f"c{i}") for i in range(4)]
    vectors = torch.randn(2, 8)
    segments = context_segments([chunks[:2], chunks[2:]], {1, 2}, vectors, separator=(99,))
    assert [s.tolist() if isinstance(s, torch.Tensor) else list(s) for s in segments] == [
        vectors[:1].tolist(), [11, 21], [99], [12, 22], vectors[1:].tolist()]
    assert context_segments([chunks], set(range(4)), None) == [c.token_ids for c in chunks]
    with pytest.raises(InputError, match="no chunk vector"):
        context_segments([chunks], {0}, vectors)
    with pytest.raises(InputError, match="2 chunk vectors for 1"):
        context_segments([chunks], {0, 1, 2}, vectors)


def test_scored_layout_puts_the_first_target_after_the_prefix():
    layout = scored_layout([[1, 2], torch.zeros(1, 4)], [7, 8, 9], 4, torch.float32)
    assert layout.token_ids.tolist() == [1, 2, 0, 7, 8]
    assert layout.labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9]
    skipped = scored_layout([[1]], [7, 8], 4, torch.float32, skip_first=True)
    assert skipped.labels.tolist() == [IGNORE_INDEX, 8]
    assert scored_layout([], [7, 8, 9], 4, torch.float32, skip_first=True).labels.tolist() == [8, 9]
    with pytest.raises(InputError, match="skip_first"):
        scored_layout([], [7, 8], 4, torch.float32)


def test_token_nll_is_cross_entropy_on_labelled_positions():
    logits, labels = torch.randn(2, 3, 11), torch.tensor([[1, IGNORE_INDEX, 4], [IGNORE_INDEX, 2, 3]])
    nll, mask = token_nll(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    torch.testing.assert_close(nll.flatten(), ref)
    assert mask.tolist() == [[True, False, True], [False, True, True]]
    torch.testing.assert_close(mean_nll(logits, labels),
                               torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()))


def test_the_model_does_not_change_the_callers_config(model):
    from conftest import make_tokenizer, tiny_decoder, tiny_encoder

    from refrag.encoders import TextEncoder

    config = RefragConfig(decoder="d", encoder="e", k=4, dtype="float32")
    tok = make_tokenizer()
    built = RefragModel(config, TextEncoder(tiny_encoder(len(tok)), tok), tiny_decoder("llama", len(tok)), tok)
    assert config.target_rms is None and built.config.target_rms is not None


def _scoped(tmp_path):
    model = with_trained_lora(tmp_path)
    model.set_adapter_scope("chunks")
    return model


def test_chunk_scoped_adapter_leaves_every_text_position_to_the_original_weights(tmp_path):
    """Positions before the first vector (and rows without vectors) are the plain decoder's; after it they are
    not (the vector's adapted keys / values are read), and differ from the adapter at every position too."""
    model, plain = _scoped(tmp_path), tiny_refrag("llama")
    vec = torch.randn(1, 64)
    layouts = [segments_layout([[2, 5, 6], vec, [7, 8, 9]], 64, torch.float32),
               segments_layout([[2, 5, 6, 7, 8, 9, 10]], 64, torch.float32)]
    inputs = model.build_inputs(layouts)
    assert inputs.vector_mask.tolist() == [[False] * 3 + [True] + [False] * 3, [False] * 7]
    ours, ref = model.decoder_logits(inputs), plain.decoder_logits(inputs)
    torch.testing.assert_close(ours[0, :3], ref[0, :3])
    torch.testing.assert_close(ours[1], ref[1])  # a text-only row of a compressed batch
    assert not torch.allclose(ours[0, 3:], ref[0, 3:], atol=1e-3)
    model.set_adapter_scope("sequence")
    everywhere = model.decoder_logits(inputs)
    assert not torch.allclose(everywhere[0, 4:], ours[0, 4:], atol=1e-3)
    assert not torch.allclose(everywhere[1], ref[1], atol=1e-3)


def test_chunk_scoped_adapter_is_not_merged_and_refuses_calls_outside_decoder_for(tmp_path):
    model = _scoped(tmp_path)
    model.merge_adapter()
    assert model.merged_decoder is None  # a merged copy would adapt every position
    with pytest.raises(RuntimeError, match="without its \\[B, T\\] vector mask"):
        model.decoder(inputs_embeds=torch.randn(1, 3, 64))
    with pytest.raises(InputError, match="vector_mask"), model.decoder_for(True):
        pass


def test_chunk_scope_survives_a_checkpoint_round_trip(tmp_path):
    from refrag.checkpoint import CheckpointManifest, load, save

    save(_scoped(tmp_path), tmp_path / "ckpt")
    assert CheckpointManifest.read(tmp_path / "ckpt").config.adapter_scope == "chunks"
    loaded = load(tmp_path / "ckpt", progress=False)
    assert loaded.chunk_scoped and loaded.chunk_scope._handles
    save(with_trained_lora(tmp_path / "b"), tmp_path / "plain")  # the default scope is not written
    assert "adapter_scope" not in (tmp_path / "plain" / "refrag.json").read_text()


def test_vllm_refuses_a_chunk_scoped_adapter_before_starting(tmp_path):
    from refrag.serve.vllm import VLLMOptions, VLLMServer

    with pytest.raises(InputError, match="--backend torch"):
        VLLMServer(_scoped(tmp_path), VLLMOptions("python")).start()


def test_vllm_refuses_an_answer_adapter_before_starting(tmp_path):
    from refrag.serve.vllm import VLLMOptions, VLLMServer

    model = with_trained_lora(tmp_path)  # a sequence-scoped compressor adapter vLLM could serve alone
    model.add_answer_adapter(4)
    with pytest.raises(InputError, match="answer adapter"):
        VLLMServer(model, VLLMOptions("python")).start()
