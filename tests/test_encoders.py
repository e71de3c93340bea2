"""Chunk encoders: per-chunk independence, the self-encoder leaves the decoder alone, save/load, trainable parts."""

from dataclasses import replace

import pytest
import torch
from conftest import make_tokenizer, tiny_decoder, tiny_refrag

from refrag import checkpoint
from refrag.chunking import chunk_token_ids
from refrag.config import RefragConfig
from refrag.encoders import SelfEncoder, TokenEmbeddingEncoder
from refrag.errors import CheckpointError, InputError
from refrag.modeling import RefragModel, segments_layout

TEXT = "Paris is the capital of France. The quick brown fox jumps over the lazy dog. Rivers flow to the sea."


def _model(encoder: str, pooling: str = "mean", k: int = 4, lora_rank: int = 4) -> RefragModel:
    tok = make_tokenizer()
    decoder = tiny_decoder("llama", len(tok))
    config = RefragConfig(decoder="tiny-llama", encoder=encoder, k=k, pooling=pooling,  # type: ignore[arg-type]
                          encoder_layers=1, encoder_lora_rank=lora_rank, dtype="float32")
    from refrag.encoders import build_encoder

    model = RefragModel(config, build_encoder(config, decoder, tok), decoder, tok).eval()
    torch.manual_seed(5)
    with torch.no_grad():  # a trained-looking encoder: non-zero adapter / mixer
        for name, p in model.encoder.named_parameters():
            if "lora_B" in name or name in ("memory", "positions"):
                p.normal_(0, 0.3)
    return model


def _chunks(model):
    return chunk_token_ids(model.tokenizer.encode(TEXT, add_special_tokens=False), model.tokenizer, model.k)


ENCODERS = [("self", "mean"), ("self", "last"), ("self", "memory"), ("tokens", "mean")]


@pytest.mark.parametrize("encoder, pooling", ENCODERS)
def test_a_chunk_encodes_the_same_alone_or_in_a_batch(encoder, pooling):
    model = _model(encoder, pooling)
    chunks = list(_chunks(model))
    assert len({len(c.token_ids) for c in chunks}) > 1  # a shorter last chunk: padding is exercised
    batched = model.encode_chunks(chunks, batch_size=3)
    alone = torch.cat([model.encode_chunks([c]) for c in chunks])
    assert batched.shape == (len(chunks), model.hidden_size)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batched[0], batched[1])


def test_self_encoder_reads_decoder_tokens_not_retokenised_text():
    model = _model("self")
    chunk = _chunks(model)[0]
    as_text = model.encode_chunks([chunk.text])  # a text is cut into decoder tokens the same way
    torch.testing.assert_close(model.encode_chunks([chunk]), as_text)


@pytest.mark.parametrize("encoder", ["self", "tokens"])
def test_full_mode_logits_are_bit_identical_with_a_decoder_built_encoder(encoder):
    model = _model(encoder)
    plain = tiny_decoder("llama", len(model.tokenizer))  # the same weights, never touched by an encoder
    ids = torch.arange(10, 40)
    inputs = model.build_inputs([segments_layout([ids.tolist()], model.hidden_size, model.dtype)])
    model.decoder.requires_grad_(False)
    model.encoder.set_trainable(True)  # the shared embedding rows stay frozen: only the encoder's own parts train
    assert all(not p.requires_grad for p in model.decoder.parameters())
    assert torch.equal(model.decoder_logits(inputs), plain(input_ids=ids[None]).logits)


def test_only_the_adapter_and_memory_token_train():
    model = _model("self", "memory")
    names = {n for n, p in model.encoder.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or n == "memory" for n in names)
    mixer = _model("tokens").encoder
    assert {n for n, p in mixer.named_parameters() if p.requires_grad} == {
        n for n, _ in mixer.named_parameters() if not n.startswith("embed.")}


@pytest.mark.parametrize("encoder, pooling", ENCODERS)
def test_save_load_round_trip_stores_only_the_trained_part(tmp_path, encoder, pooling):
    model = _model(encoder, pooling)
    model.decoder.save_pretrained(tmp_path / "dec")
    model.tokenizer.save_pretrained(tmp_path / "dec")
    model.config = replace(model.config, decoder=str(tmp_path / "dec"))
    path = checkpoint.save(model, tmp_path / "ckpt", save_encoder=True)
    assert sorted(p.name for p in (path / "encoder").iterdir()) == ["encoder.safetensors"]
    loaded = checkpoint.load(path, dtype="float32", progress=False)
    assert loaded.config.encoder == encoder
    chunks = _chunks(model)
    torch.testing.assert_close(loaded.embed_chunks(chunks), model.embed_chunks(chunks))
    (path / "encoder" / "encoder.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="encoder.safetensors"):
        checkpoint.load(path, progress=False)


def test_weights_for_other_settings_are_refused(tmp_path):
    model = _model("self", lora_rank=4)
    model.encoder.save(tmp_path / "enc")
    other = _model("self", lora_rank=8)
    with pytest.raises(CheckpointError, match="does not match"):
        other.encoder.load_weights(tmp_path / "enc")


def test_bad_encoder_settings():
    decoder = tiny_decoder("llama", len(make_tokenizer()))
    with pytest.raises(InputError, match="encoder-layers"):
        SelfEncoder(decoder, 2, layers=5)  # the tiny decoder has 2 layers
    with pytest.raises(InputError, match="mean, last or memory"):
        SelfEncoder(decoder, 2, pooling="cls")
    assert TokenEmbeddingEncoder(decoder, k=4).hidden_size == decoder.config.hidden_size


def test_an_index_built_with_one_encoder_refuses_another(tmp_path):
    from index_helpers import save_retrieval_encoder, write_corpus

    from refrag.index import Index, IndexOptions

    options = IndexOptions(passage_tokens=16, retrieval_encoder=str(save_retrieval_encoder(tmp_path / "ret")))
    index = Index.build(write_corpus(tmp_path / "corpus"), tmp_path / "idx", _model("self"), options, progress=False)
    index.check_model(_model("self"))  # the same encoder (same weights): accepted
    for other in (_model("tokens"), tiny_refrag("llama", k=4)):
        with pytest.raises(CheckpointError, match="chunk_encoder"):
            index.check_model(other)
