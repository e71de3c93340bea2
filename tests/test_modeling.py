import json
import warnings

import pytest
import torch
from conftest import add_random_lora, tiny_refrag

from refrag.config import RefragConfig
from refrag.errors import CheckpointError, InputError
from refrag.loading import load_model
from refrag.modeling import IGNORE_INDEX, Layout, Projector, RefragModel, embedding_rms, segments_layout


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


def test_save_load_round_trip(tmp_path):
    model = tiny_refrag("llama")
    with torch.no_grad():
        model.projector.gain.mul_(1.5)
    path = model.save(tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    assert sorted(p.name for p in path.iterdir()) == ["decoder", "encoder", "projector.safetensors", "refrag.json"]
    loaded = RefragModel.load(path, dtype="float32", progress=False)
    texts = ["Paris is the capital", "of France."]
    torch.testing.assert_close(loaded.embed_chunks(texts), model.embed_chunks(texts))
    assert loaded.k == model.k and not list(tmp_path.glob(".ckpt.tmp-*"))


def test_corrupt_checkpoints_give_clear_errors(tmp_path):
    model = tiny_refrag("llama")
    good = model.save(tmp_path / "good", save_encoder=True, save_decoder=True)
    with pytest.raises(CheckpointError, match="not a folder"):
        RefragModel.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no refrag.json"):
        RefragModel.load(tmp_path / "empty")
    (good / "refrag.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        RefragModel.load(good)


def test_projector_shape_mismatch_is_rejected(tmp_path):
    path = tiny_refrag("llama").save(tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    manifest = json.loads((path / "refrag.json").read_text())
    (path / "projector.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="projector.safetensors"):
        RefragModel.load(path, progress=False)
    from safetensors.torch import save_file

    save_file({k: torch.zeros(3, 3) for k in ("fc1.weight",)}, str(path / "projector.safetensors"))
    with pytest.raises(CheckpointError, match="hidden sizes"):
        RefragModel.load(path, progress=False)
    assert manifest["encoder_hidden"] == 32


def test_fp16_config_is_refused():
    with pytest.raises(InputError, match="fp16"):
        RefragConfig(dtype="float16")  # type: ignore[arg-type]


def _with_trained_lora(tmp_path) -> RefragModel:
    """A tiny model whose decoder lives in a folder (so a checkpoint can reference it) + a non-zero adapter."""
    model = tiny_refrag("llama")
    model.decoder.save_pretrained(tmp_path / "dec")
    model.tokenizer.save_pretrained(tmp_path / "dec")
    model.config.decoder = str(tmp_path / "dec")
    return add_random_lora(model)


def test_lora_adapter_applies_to_compressed_inputs_only(tmp_path):
    model = _with_trained_lora(tmp_path)
    plain = tiny_refrag("llama")  # the same decoder weights, no adapter
    text = model.build_inputs([segments_layout([[2, 5, 6, 7]], 64, torch.float32)])
    assert not text.compressed
    torch.testing.assert_close(model.decoder_logits(text), plain.decoder_logits(text))
    vec = torch.randn(1, 64)
    mixed = model.build_inputs([segments_layout([[2], vec, [5, 6]], 64, torch.float32)])
    assert mixed.compressed
    assert not torch.allclose(model.decoder_logits(mixed), plain.decoder_logits(mixed), atol=1e-3)


def test_merged_adapter_gives_the_adapter_logits_and_leaves_text_inputs_alone(tmp_path):
    model = _with_trained_lora(tmp_path)
    text = model.build_inputs([segments_layout([[2, 5, 6, 7]], 64, torch.float32)])
    mixed = model.build_inputs([segments_layout([[2], torch.randn(2, 64), [5, 6]], 64, torch.float32)])
    before = model.decoder_logits(text), model.decoder_logits(mixed)
    model.merge_adapter()
    assert model.merged_decoder is not None and not hasattr(model.merged_decoder, "disable_adapter")
    torch.testing.assert_close(model.decoder_logits(mixed), before[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.decoder_logits(text), before[0])  # still the original decoder
    with model.decoder_for(compressed=True) as decoder:
        assert decoder is model.merged_decoder


def test_lora_adapter_round_trips_and_refuses_a_full_decoder_save(tmp_path):
    model = _with_trained_lora(tmp_path)
    with pytest.raises(InputError, match="adapter alone"):
        model.save(tmp_path / "bad", save_decoder=True)
    assert not (tmp_path / "bad").exists()
    path = model.save(tmp_path / "ckpt", save_encoder=True)
    assert (path / "decoder_adapter" / "adapter_model.safetensors").is_file()
    assert not (path / "decoder_adapter" / "README.md").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # peft's deprecation noise is silenced
        loaded = RefragModel.load(path, dtype="float32", progress=False)
    assert loaded.has_adapter
    inputs = model.build_inputs([segments_layout([[2], torch.randn(2, 64), [5, 6]], 64, torch.float32)])
    torch.testing.assert_close(loaded.decoder_logits(inputs), model.decoder_logits(inputs))
    (path / "decoder_adapter" / "adapter_model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(CheckpointError, match="adapter"):
        RefragModel.load(path, progress=False)


@pytest.mark.parametrize("merge", [True, False])
def test_load_model_merges_the_adapter_only_when_asked(tmp_path, merge):
    path = _with_trained_lora(tmp_path).save(tmp_path / "ckpt", save_encoder=True)
    loaded = load_model(path, dtype="float32", progress=False, merge=merge)
    assert loaded.has_adapter and (loaded.merged_decoder is not None) == merge


@pytest.mark.parametrize("progress", [False, True])
def test_loading_bars_follow_progress(tmp_path, capfd, progress):
    path = tiny_refrag("llama").save(tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    capfd.readouterr()
    RefragModel.load(path, dtype="float32", progress=progress)
    assert ("Loading weights" in capfd.readouterr().err) is progress
