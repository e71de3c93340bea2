"""Checkpoint folders: save / load round trips, the typed manifest, damaged files, and load_model's checks."""

import json
import warnings

import pytest
import torch
from conftest import tiny_refrag, with_trained_lora

from refrag import checkpoint
from refrag.checkpoint import CheckpointManifest, load_model
from refrag.errors import CheckpointError, InputError
from refrag.index.manifest import INDEX
from refrag.manifest import read_manifest
from refrag.modeling import segments_layout


def test_save_load_round_trip(tmp_path):
    model = tiny_refrag("llama")
    with torch.no_grad():
        model.projector.gain.mul_(1.5)
    path = checkpoint.save(model, tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    assert sorted(p.name for p in path.iterdir()) == ["decoder", "encoder", "projector.safetensors", "refrag.json"]
    loaded = checkpoint.load(path, dtype="float32", progress=False)
    texts = ["Paris is the capital", "of France."]
    torch.testing.assert_close(loaded.embed_chunks(texts), model.embed_chunks(texts))
    assert loaded.k == model.k and not list(tmp_path.glob(".ckpt.tmp-*"))


def test_corrupt_checkpoints_give_clear_errors(tmp_path):
    model = tiny_refrag("llama")
    good = checkpoint.save(model, tmp_path / "good", save_encoder=True, save_decoder=True)
    with pytest.raises(CheckpointError, match="not a folder"):
        checkpoint.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no refrag.json"):
        checkpoint.load(tmp_path / "empty")
    (good / "refrag.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(good)


def test_projector_shape_mismatch_is_rejected(tmp_path):
    path = checkpoint.save(tiny_refrag("llama"), tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    manifest = json.loads((path / "refrag.json").read_text())
    (path / "projector.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="projector.safetensors"):
        checkpoint.load(path, progress=False)
    from safetensors.torch import save_file

    save_file({k: torch.zeros(3, 3) for k in ("fc1.weight",)}, str(path / "projector.safetensors"))
    # a manifest that agrees with its projector (and records no files, as before 0.9), not with the models
    (path / "refrag.json").write_text(json.dumps({**manifest, "encoder_hidden": 3, "decoder_hidden": 3, "files": {}}))
    with pytest.raises(CheckpointError, match="hidden sizes"):
        checkpoint.load(path, progress=False)
    assert manifest["encoder_hidden"] == 32


def test_lora_adapter_round_trips_and_refuses_a_full_decoder_save(tmp_path):
    model = with_trained_lora(tmp_path)
    with pytest.raises(InputError, match="adapter alone"):
        checkpoint.save(model, tmp_path / "bad", save_decoder=True)
    assert not (tmp_path / "bad").exists()
    path = checkpoint.save(model, tmp_path / "ckpt", save_encoder=True)
    assert (path / "decoder_adapter" / "adapter_model.safetensors").is_file()
    assert not (path / "decoder_adapter" / "README.md").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # peft's deprecation noise is silenced
        loaded = checkpoint.load(path, dtype="float32", progress=False)
    assert loaded.has_adapter
    inputs = model.build_inputs([segments_layout([[2], torch.randn(2, 64), [5, 6]], 64, torch.float32)])
    torch.testing.assert_close(loaded.decoder_logits(inputs), model.decoder_logits(inputs))
    (path / "decoder_adapter" / "adapter_model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(CheckpointError, match="adapter"):
        checkpoint.load(path, progress=False)


def test_export_keeps_both_decoder_adapters_in_bf16(tmp_path):
    """`refrag train export` of a checkpoint with an answer adapter: both adapters ship (bf16, half the bytes) and
    the exported model computes what the trained one did, within bf16."""
    from safetensors.torch import load_file

    model = with_trained_lora(tmp_path)
    model.set_adapter_scope("chunks")
    model.add_answer_adapter(4)
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if ".answer." in name and "lora_B" in name:
                p.normal_(0, 0.5)
    source = checkpoint.save(model, tmp_path / "ckpt", save_encoder=True)
    target = checkpoint.export(source, tmp_path / "shipped")
    assert CheckpointManifest.read(target).answer_adapter == checkpoint.ANSWER
    weights = load_file(str(target / checkpoint.ANSWER / "adapter_model.safetensors"))
    assert weights and all(w.dtype == torch.bfloat16 for w in weights.values())
    loaded = checkpoint.load(target, dtype="float32", progress=False)
    assert loaded.has_answer_adapter and loaded.chunk_scoped
    layout = segments_layout([[2], torch.randn(2, 64), [5, 6]], 64, torch.float32)
    inputs = model.build_inputs([layout])
    torch.testing.assert_close(loaded.decoder_logits(loaded.build_inputs([layout])), model.decoder_logits(inputs),
                               atol=0.1, rtol=0.05)


@pytest.mark.parametrize("merge", [True, False])
def test_load_model_merges_the_adapter_only_when_asked(tmp_path, merge):
    path = checkpoint.save(with_trained_lora(tmp_path), tmp_path / "ckpt", save_encoder=True)
    loaded = load_model(path, dtype="float32", progress=False, merge=merge)
    assert loaded.has_adapter and (loaded.merged_decoder is not None) == merge


@pytest.mark.parametrize("progress", [False, True])
def test_loading_bars_follow_progress(tmp_path, capfd, progress):
    path = checkpoint.save(tiny_refrag("llama"), tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    capfd.readouterr()
    checkpoint.load(path, dtype="float32", progress=progress)
    assert ("Loading weights" in capfd.readouterr().err) is progress


def test_the_manifest_is_typed_and_version_checked(tmp_path):
    path = checkpoint.save(tiny_refrag("llama"), tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    manifest = CheckpointManifest.read(path)
    assert manifest.config.k == 4 and manifest.components["encoder"] == "encoder" and manifest.adapter is None
    raw = json.loads((path / "refrag.json").read_text())
    (path / "refrag.json").write_text(json.dumps({**raw, "version": 99}))
    with pytest.raises(CheckpointError, match="newer refrag"):
        checkpoint.load(path, progress=False)
    (path / "refrag.json").write_text(json.dumps({**raw, "config": "nope"}))
    with pytest.raises(CheckpointError, match="field config: expected an object"):
        checkpoint.load(path, progress=False)


@pytest.mark.parametrize(("change", "message"), [
    ({"config": {"k": "4"}}, r"field config\.k: expected int, got '4'"),
    ({"config": {"k": True}}, r"field config\.k: expected int, got True"),
    ({"config": {"pooling": "max"}}, r"field config\.pooling: expected one of 'mean', 'cls'"),
    ({"config": {"k": 0}}, r"field config: k must be"),
    ({"encoder_hidden": 12.5}, r"field encoder_hidden: expected int"),
    ({"components": {"encoder": 3}}, r"field components\.encoder: expected str"),
    ({"files": {"projector.safetensors": {"bytes": "9"}}}, r"field files\.projector\.safetensors\.bytes"),
])
def test_every_manifest_field_is_type_checked(tmp_path, change, message):
    path = checkpoint.save(tiny_refrag("llama", k=4), tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    raw = json.loads((path / "refrag.json").read_text())
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key == "config" else value
    (path / "refrag.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=message) as e:
        checkpoint.load(path, progress=False)
    assert "refrag.json" in str(e.value) and "Restore the checkpoint" in str(e.value)


def test_every_checkpoint_file_is_recorded_and_verified_on_load(tmp_path):
    path = checkpoint.save(tiny_refrag("llama"), tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    files = CheckpointManifest.read(path).files
    assert set(files) == {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"refrag.json"}
    projector = path / "projector.safetensors"
    data = bytearray(projector.read_bytes())
    data[-3] ^= 0xFF  # one weight's byte flipped: same size, still a valid safetensors file
    projector.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="projector.safetensors is damaged: its sha256 differs"):
        checkpoint.load(path, progress=False)
    projector.write_bytes(bytes(data[:-100]))
    with pytest.raises(CheckpointError, match="has [0-9,]+ bytes, [0-9,]+ when it was written"):
        checkpoint.load(path, progress=False)
    projector.unlink()
    with pytest.raises(CheckpointError, match="projector.safetensors is missing"):
        checkpoint.load(path, progress=False)


def test_hidden_sizes_that_contradict_the_weights_are_refused(tmp_path):
    path = checkpoint.save(tiny_refrag("llama"), tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    raw = json.loads((path / "refrag.json").read_text())
    (path / "refrag.json").write_text(json.dumps({**raw, "decoder_hidden": raw["decoder_hidden"] + 1}))
    with pytest.raises(CheckpointError, match="but its projector maps"):
        checkpoint.load(path, progress=False)


SHIPPED = sorted(checkpoint.SHIPPED.glob("*/refrag.json"))


@pytest.mark.parametrize("manifest_path", SHIPPED, ids=[p.parent.name for p in SHIPPED])
def test_the_shipped_checkpoint_records_its_files(manifest_path):
    folder = manifest_path.parent
    manifest = CheckpointManifest.read(folder)
    assert "projector.safetensors" in manifest.files and "decoder_adapter/adapter_model.safetensors" in manifest.files
    manifest.verify(folder)  # sha256 of every shipped file, as committed


@pytest.mark.parametrize("manifest_path", SHIPPED, ids=[p.parent.name for p in SHIPPED])
def test_the_shipped_checkpoint_is_what_the_default_names_load(manifest_path):
    """load_model() with the default decoder / encoder and a k takes the shipped folder of that k: its manifest
    must name them (else `--encoder self` or no flag at all would silently give an untrained projector)."""
    from refrag.config import DEFAULT_DECODER, DEFAULT_ENCODER

    config = CheckpointManifest.read(manifest_path.parent).config
    assert (config.decoder, config.encoder) == (DEFAULT_DECODER, DEFAULT_ENCODER)
    assert checkpoint.shipped_checkpoint(config.k) == manifest_path.parent
    assert config.dtype == "bfloat16"  # exported (`refrag train export`), not a training snapshot
    assert config.adapter_scope == "chunks"  # text positions run the original decoder (docs/training.md)
    manifest = CheckpointManifest.read(manifest_path.parent)  # a further stage starts from its compressor's stage
    assert manifest.compressor_stage in ("cpt", "mixed") and (manifest.answer_adapter is None) == (manifest.stage != "sft")


def test_the_default_k_ships_and_other_ks_fall_back_to_fresh_parts():
    from refrag.config import DEFAULT_K

    assert checkpoint.shipped_checkpoint(DEFAULT_K) == checkpoint.DEFAULT_CHECKPOINT
    assert checkpoint.shipped_checkpoint(5) is None


def test_one_reader_for_checkpoint_and_index_manifests(tmp_path):
    (tmp_path / "index.json").write_text(json.dumps({"format": "refrag-index", "version": 7}))
    with pytest.raises(CheckpointError, match="newer refrag"):
        read_manifest(tmp_path, INDEX)
    with pytest.raises(CheckpointError, match="not a refrag checkpoint manifest"):
        (tmp_path / "refrag.json").write_text(json.dumps({"format": "refrag-index", "version": 1}))
        checkpoint.load(tmp_path)


def test_options_that_contradict_the_checkpoint_are_errors(tmp_path):
    path = checkpoint.save(tiny_refrag("llama", k=4), tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    with pytest.raises(InputError, match="--k 16 .the checkpoint has 4"):
        load_model(path, k=16, dtype="float32", progress=False)
    assert load_model(path, k=4, dtype="float32", progress=False).k == 4  # agreeing is fine


def test_a_text_encoder_manifest_has_no_self_encoder_settings(tmp_path):
    path = checkpoint.save(tiny_refrag("llama"), tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    config = json.loads((path / "refrag.json").read_text())["config"]
    assert "encoder_layers" not in config and "encoder_lora_rank" not in config  # as written before self-encoders


def test_every_file_kind_of_a_checkpoint_is_checked(tmp_path):
    model = with_trained_lora(tmp_path)
    path = checkpoint.save(model, tmp_path / "ckpt", save_encoder=True)
    names = sorted(CheckpointManifest.read(path).files)
    assert {n.split("/")[0] for n in names} >= {"projector.safetensors", "encoder", "decoder_adapter"}
    for name in names:
        target = path / name
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])  # truncated
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            checkpoint.load(path, progress=False)
        target.write_bytes(data)
    checkpoint.load(path, progress=False)  # restored: loads again


def test_a_widened_adapter_computes_the_same_trains_its_new_directions_and_round_trips(tmp_path):
    """`--lora-rank` above an init's adapter rank widens it (RefragModel.widen_adapter): the model is unchanged
    until the new directions train; a checkpoint keeps the new rank; narrowing is refused."""
    from refrag.train.common import StageOptions, set_trainable

    model = with_trained_lora(tmp_path)
    model.set_adapter_scope("chunks")
    rank = model.adapter_rank
    layout = segments_layout([[2], torch.randn(2, 64), [5, 6]], 64, torch.float32)
    before = model.decoder_logits(model.build_inputs([layout]))
    set_trainable(model, StageOptions(train_decoder="lora", lora_rank=2 * rank), bf16=False)
    assert model.adapter_rank == 2 * rank
    torch.testing.assert_close(model.decoder_logits(model.build_inputs([layout])), before, rtol=0, atol=1e-5)
    wide = {n: p for n, p in model.decoder.named_parameters() if "lora_" in n}
    assert wide and all(p.requires_grad for p in wide.values())
    assert {p.shape[0] for n, p in wide.items() if "lora_A" in n} == {2 * rank}
    assert {p.shape[1] for n, p in wide.items() if "lora_B" in n} == {2 * rank}
    assert all(p[rank:].abs().sum() > 0 for n, p in wide.items() if "lora_A" in n)  # fresh rows, not zeros
    with torch.no_grad():  # the new directions are live: moving a new column of B changes the output
        next(p for n, p in wide.items() if "lora_B" in n and "layers.0." in n)[:, -1].fill_(0.5)
    moved = model.decoder_logits(model.build_inputs([layout]))
    assert not torch.allclose(moved, before)
    loaded = checkpoint.load(checkpoint.save(model, tmp_path / "ckpt"), dtype="float32", progress=False)
    assert loaded.adapter_rank == 2 * rank and loaded.chunk_scoped
    torch.testing.assert_close(loaded.decoder_logits(loaded.build_inputs([layout])), moved)
    with pytest.raises(InputError, match="widened, not narrowed"):
        set_trainable(model, StageOptions(train_decoder="lora", lora_rank=rank), bf16=False)
    set_trainable(model, StageOptions(train_decoder="lora"), bf16=False)  # no rank: train on at its own
    assert model.adapter_rank == 2 * rank
    with pytest.raises(InputError, match="needs --train-decoder lora"):
        set_trainable(model, StageOptions(lora_rank=4 * rank), bf16=False)
    with pytest.raises(InputError, match="no decoder adapter"):
        tiny_refrag("llama").widen_adapter(8)
