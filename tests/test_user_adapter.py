"""A user's own decoder: a fine-tuned HF folder as --decoder, a PEFT LoRA adapter as --decoder-adapter."""

import json
import logging

import pytest
import torch
from conftest import make_tokenizer, tiny_decoder
from index_helpers import save_retrieval_encoder
from peft import LoraConfig, PeftModel, get_peft_model

from refrag import checkpoint
from refrag.checkpoint import CheckpointManifest, load_model
from refrag.config import CompressionOptions
from refrag.errors import CheckpointError, InputError
from refrag.generation import Request

IDS = torch.tensor([[1, 5, 9, 23, 42, 7, 11]])


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny base decoder folder, a tiny encoder folder, and two LoRA adapters of the base (safetensors)."""
    root = tmp_path_factory.mktemp("user")
    tokenizer = make_tokenizer()
    base = tiny_decoder("llama", len(tokenizer))
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapters = []
    for seed in (4, 5):
        lora = get_peft_model(tiny_decoder("llama", len(tokenizer)), LoraConfig(r=4, target_modules="all-linear"))
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)  # peft starts lora_B at zero: make the adapter change the outputs
        lora.save_pretrained(root / f"adapter{seed}")
        adapters.append(root / f"adapter{seed}")
    return {"base": root / "base", "encoder": save_retrieval_encoder(root / "enc"), "adapters": adapters}


def adapted_logits(parts, adapter) -> torch.Tensor:
    """What the user's fine-tuned model says: base + adapter, unmerged, as peft runs it."""
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(parts["base"]), str(adapter)).eval()
    with torch.no_grad():
        return model(IDS).logits


def full_logits(model) -> torch.Tensor:
    with torch.no_grad(), model.decoder_for(False) as decoder:
        return decoder(IDS).logits


def test_a_fine_tuned_folder_works_as_the_decoder(parts):
    from transformers import AutoModelForCausalLM

    model = load_model(decoder=str(parts["base"]), encoder=str(parts["encoder"]), k=4, dtype="float32",
                       progress=False)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(parts["base"])(IDS).logits
    torch.testing.assert_close(full_logits(model), expected)


@pytest.mark.parametrize(("native", "dtype"), [(False, torch.float32), (True, torch.bfloat16)])
def test_load_model_resolves_dtype_auto_from_the_hardware(parts, monkeypatch, native, dtype):
    from refrag import precision

    monkeypatch.setattr(precision, "native_bf16", lambda: native)
    model = load_model(decoder=str(parts["base"]), encoder=str(parts["encoder"]), k=4, progress=False)  # "auto"
    assert model.config.dtype == str(dtype).removeprefix("torch.") and model.dtype == dtype


def test_full_mode_is_base_plus_the_users_adapter(parts):
    model = load_model(decoder=str(parts["base"]), encoder=str(parts["encoder"]), k=4, dtype="float32",
                       progress=False, decoder_adapter=str(parts["adapters"][0]))
    expected = adapted_logits(parts, parts["adapters"][0])
    torch.testing.assert_close(full_logits(model), expected, atol=1e-5, rtol=1e-4)
    base = load_model(decoder=str(parts["base"]), encoder=str(parts["encoder"]), k=4, dtype="float32",
                      progress=False)
    assert not torch.allclose(full_logits(base), expected, atol=1e-3)  # the adapter does change the outputs
    answer = __import__("refrag").generate(model, [Request.from_texts("q?", ["Paris is in France."],
                                                                      model.tokenizer)],
                                           compression=CompressionOptions(mode="full"))[0]
    assert answer.decoder_positions > 0


def test_a_compressor_records_its_adapter_and_refuses_another(parts, tmp_path):
    model = load_model(decoder=str(parts["base"]), encoder=str(parts["encoder"]), k=4, dtype="float32",
                       progress=False, decoder_adapter=str(parts["adapters"][0]))
    path = checkpoint.save(model, tmp_path / "ckpt")
    config = CheckpointManifest.read(path).config
    assert config.decoder_adapter == str(parts["adapters"][0].resolve()) and len(config.decoder_adapter_sha256) == 64
    again = checkpoint.load(path, dtype="float32", progress=False)  # the recorded adapter, found and verified
    torch.testing.assert_close(full_logits(again), full_logits(model))
    with pytest.raises(CheckpointError, match="not the adapter this compressor was trained with"):
        checkpoint.load(path, dtype="float32", progress=False, decoder_adapter=str(parts["adapters"][1]))
    raw = json.loads((path / "refrag.json").read_text())
    raw["config"]["decoder_adapter_sha256"] = "0" * 64  # the adapter's files changed since training
    (path / "refrag.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="not the adapter this compressor was trained with"):
        checkpoint.load(path, dtype="float32", progress=False)


def test_a_base_compressor_composes_with_an_adapter_and_says_so(parts, tmp_path, caplog):
    base = load_model(decoder=str(parts["base"]), encoder=str(parts["encoder"]), k=4, dtype="float32",
                      progress=False)
    path = checkpoint.save(base, tmp_path / "ckpt")
    assert "decoder_adapter" not in json.loads((path / "refrag.json").read_text())["config"]  # as before
    with caplog.at_level(logging.WARNING, logger="refrag.checkpoint"):
        model = load_model(path, dtype="float32", progress=False, decoder_adapter=str(parts["adapters"][1]))
    assert "trained on the base decoder" in caplog.text
    torch.testing.assert_close(full_logits(model), adapted_logits(parts, parts["adapters"][1]), atol=1e-5, rtol=1e-4)


def test_bad_adapters_are_clear_errors(parts, tmp_path):
    kwargs = {"decoder": str(parts["base"]), "encoder": str(parts["encoder"]), "k": 4, "dtype": "float32",
              "progress": False}
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
        load_model(**kwargs, decoder_adapter=str(tmp_path / "empty"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((parts["adapters"][0] / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="never loads pickled"):
        load_model(**kwargs, decoder_adapter=str(pickled))
    other = tmp_path / "other"  # an adapter of a decoder with another width
    lora = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"]))
    lora.save_pretrained(other)
    with pytest.raises(InputError, match="does not fit the decoder"):
        load_model(**kwargs, decoder_adapter=str(other))


def test_a_recorded_adapter_that_moved_is_named_and_found_again(parts, tmp_path):
    import shutil

    moved = tmp_path / "adapter-copy"
    shutil.copytree(parts["adapters"][0], moved)
    model = load_model(decoder=str(parts["base"]), encoder=str(parts["encoder"]), k=4, dtype="float32",
                       progress=False, decoder_adapter=str(moved))
    path = checkpoint.save(model, tmp_path / "ckpt")
    shutil.rmtree(moved)
    with pytest.raises(CheckpointError, match="adapter-copy does not exist.*--decoder-adapter PATH"):
        checkpoint.load(path, dtype="float32", progress=False)
    again = checkpoint.load(path, dtype="float32", progress=False, decoder_adapter=str(parts["adapters"][0]))
    torch.testing.assert_close(full_logits(again), full_logits(model))  # same files elsewhere: same digest


def test_a_saved_decoder_holds_the_adapter_once(parts, tmp_path):
    model = load_model(decoder=str(parts["base"]), encoder=str(parts["encoder"]), k=4, dtype="float32",
                       progress=False, decoder_adapter=str(parts["adapters"][0]))
    path = checkpoint.save(model, tmp_path / "ckpt", save_decoder=True)
    config = CheckpointManifest.read(path).config
    assert config.decoder_adapter is None and config.extra["merged_decoder_adapter"]
    torch.testing.assert_close(full_logits(checkpoint.load(path, dtype="float32", progress=False)),
                               full_logits(model))


def self_encoder_compressor(parts, tmp_path):
    """A saved compressor of the base decoder whose chunk encoder is built from the decoder's own first layer."""
    from dataclasses import replace

    from refrag.checkpoint import from_config

    base = load_model(decoder=str(parts["base"]), encoder=str(parts["encoder"]), k=4, dtype="float32",
                      progress=False)
    selfish = from_config(replace(base.config, encoder="self", encoder_layers=1, encoder_lora_rank=2),
                          progress=False)
    return selfish, checkpoint.save(selfish, tmp_path / "ckpt")


def test_a_self_encoder_compressor_of_the_base_composes_with_an_adapter_its_vectors_unchanged(parts, tmp_path,
                                                                                              caplog):
    selfish, path = self_encoder_compressor(parts, tmp_path)
    with caplog.at_level(logging.WARNING, logger="refrag.checkpoint"):
        model = checkpoint.load(path, dtype="float32", progress=False, decoder_adapter=str(parts["adapters"][0]))
    assert "trained on the base decoder" in caplog.text
    chunks = [selfish.as_chunk(t) for t in ("the cat sat on", "a dog ran far away")]
    with torch.no_grad():  # the encoder is the base decoder's layers, as trained: not the adapted decoder's
        torch.testing.assert_close(model.encode_chunks(chunks), selfish.encode_chunks(chunks))
    torch.testing.assert_close(full_logits(model), adapted_logits(parts, parts["adapters"][0]), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(full_logits(model), full_logits(selfish))  # and the decoder is the adapted one


def test_an_adapter_that_changes_the_shared_embeddings_is_refused(parts, tmp_path):
    _, path = self_encoder_compressor(parts, tmp_path)
    tokenizer = make_tokenizer()
    lora = get_peft_model(tiny_decoder("llama", len(tokenizer)), LoraConfig(r=4, target_modules=["embed_tokens"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_embedding" in name:  # peft starts A at zero: make the update non-zero
                p.normal_(0, 0.5)
    lora.save_pretrained(tmp_path / "embedding-adapter")
    with pytest.raises(InputError, match="changes the token embeddings"):
        checkpoint.load(path, dtype="float32", progress=False, decoder_adapter=str(tmp_path / "embedding-adapter"))


def test_an_index_remembers_the_adapter_for_ask(parts, tmp_path):
    from index_helpers import write_corpus

    from refrag.cli.common import ModelChoice
    from refrag.index import Index, IndexOptions

    choice = ModelChoice(decoder=str(parts["base"]), encoder=str(parts["encoder"]), k=4, dtype="float32",
                         decoder_adapter=str(parts["adapters"][0]))
    model = choice.load(progress=False)
    index = Index.build(write_corpus(tmp_path / "corpus"), tmp_path / "idx", model,
                        IndexOptions(passage_tokens=16, retrieval_encoder=str(parts["encoder"])), progress=False)
    again = ModelChoice(dtype="float32").for_index(index)
    assert again.decoder_adapter == str(parts["adapters"][0].resolve())
    torch.testing.assert_close(full_logits(again.load(progress=False)), full_logits(model))
