"""--quantize int8 / int4: the decoder's linear layers quantized for inference, outputs close, checkpoints."""

import json

import pytest
import torch
from conftest import tiny_refrag, with_trained_lora

from refrag import checkpoint
from refrag.config import CompressionOptions, SamplingOptions
from refrag.errors import InputError
from refrag.generation import Request, generate
from refrag.quantize import quantize_decoder, weight_bytes

pytest.importorskip("torchao")
pytest.importorskip("optimum.quanto")

CONTEXT = ["Paris is the capital of France. The quick brown fox jumps over the lazy dog."] * 2


def logits(model, mode: str) -> torch.Tensor:
    request = Request.from_texts("Where is Paris?", CONTEXT, model.tokenizer)
    answer = generate(model, [request], compression=CompressionOptions(mode=mode),  # type: ignore[arg-type]
                      sampling=SamplingOptions(max_new_tokens=3, ignore_eos=True))[0]
    assert len(answer.token_ids) == 3
    ids = torch.tensor([[1, *request.passages[0].token_ids]])
    with torch.inference_mode(), model.decoder_for(mode == "refrag") as decoder:
        return decoder(ids).logits


@pytest.mark.parametrize(("scheme", "ratio", "tolerance"), [("int8", 0.45, 0.05), ("int4", 0.35, 0.5)])
def test_quantized_decoders_generate_close_to_fp32_with_fewer_bytes(scheme, ratio, tolerance):
    model = tiny_refrag("llama")
    before = {mode: logits(model, mode) for mode in ("full", "refrag")}
    linear_bytes = sum(m.weight.nbytes for n, m in model.decoder.named_modules()
                       if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    total = weight_bytes(model.decoder)
    quantize_decoder(model, scheme)
    assert model.config.quantize == scheme
    assert weight_bytes(model.decoder) < total - (1 - ratio) * linear_bytes  # int8: ~1/4 of fp32, int4 ~1/8
    for mode, reference in before.items():
        after = logits(model, mode)
        assert (after - reference).abs().max() < tolerance * reference.abs().max()
        assert not torch.equal(after, reference)  # the weights did change
    assert not any(p.requires_grad for p in model.decoder.parameters())


def test_a_quantized_model_with_an_adapter_and_its_checkpoint(tmp_path):
    model = with_trained_lora(tmp_path)
    path = checkpoint.save(model, tmp_path / "ckpt")
    loaded = checkpoint.load_model(path, dtype="float32", progress=False, quantize="int8")
    assert loaded.merged_decoder is not None  # merged before quantizing, both copies quantized
    for decoder in (loaded.decoder, loaded.merged_decoder):  # the tiny decoder's head is untied: quantized too
        kinds = {type(m.weight).__name__ for n, m in decoder.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lora_" not in n}
        assert kinds == {"Int8Tensor"}, kinds
    assert loaded.config.quantize == "int8"
    logits(loaded, "refrag")
    again = checkpoint.save(loaded, tmp_path / "ckpt2")
    assert json.loads((again / "refrag.json").read_text())["config"]["quantize"] == "int8"
    reloaded = checkpoint.load_model(again, dtype="float32", progress=False)  # the recorded scheme, applied again
    assert reloaded.config.quantize == "int8"
    plain = checkpoint.load_model(again, dtype="float32", progress=False, quantize="none")  # the recorded one, off
    assert plain.config.quantize is None
    assert checkpoint.load(again, dtype="float32", progress=False).config.quantize is None  # training: as trained
    with pytest.raises(InputError, match="quantized decoder is not saved"):
        checkpoint.save(loaded, tmp_path / "ckpt3", save_decoder=True)
    with pytest.raises(InputError, match="int8 or int4"):
        quantize_decoder(tiny_refrag("llama"), "int3")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_head_tied_to_the_embeddings_is_left_as_it_is(scheme):
    model = tiny_refrag("llama")
    decoder = model.decoder
    decoder.get_output_embeddings().weight = decoder.get_input_embeddings().weight  # tied, as in SmolLM2
    quantize_decoder(model, scheme)
    head = decoder.get_output_embeddings()
    assert head.weight is decoder.get_input_embeddings().weight and type(head.weight) is torch.nn.Parameter
    expected = {"int8": "Int8Tensor", "int4": "WeightQBitsTensor"}[scheme]
    assert type(decoder.model.layers[0].mlp.up_proj.weight).__name__ == expected  # the other layers are quantized
