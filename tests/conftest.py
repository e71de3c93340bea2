"""Shared fixtures: tiny random-weight models and a tiny BPE tokenizer trained on the fly (no network)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from refrag.config import RefragConfig
from refrag.encoders import TextEncoder
from refrag.modeling import RefragModel

torch.set_num_threads(2)

TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
    "Rivers flow to the sea; mountains rise above the clouds. Numbers: 0 1 2 3 4 5 6 7 8 9. "
    "Question answer context passage chunk token vector encoder decoder projector. "
) * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def tiny_decoder(arch: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    common = {
        "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "eos_token_id": 3,
    }
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()


def tiny_encoder(vocab: int) -> torch.nn.Module:
    torch.manual_seed(1)
    return BertModel(
        BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=128)
    ).eval()


def tiny_refrag(arch: str = "llama", k: int = 4, dtype: torch.dtype = torch.float32) -> RefragModel:
    tok = make_tokenizer()
    vocab = len(tok)
    dec, enc = tiny_decoder(arch, vocab).to(dtype), tiny_encoder(vocab).to(dtype)
    torch.manual_seed(2)
    cfg = RefragConfig(decoder=f"tiny-{arch}", encoder="tiny-bert", k=k, dtype="float32")
    return RefragModel(cfg, encoder=TextEncoder(enc, tok), decoder=dec, tokenizer=tok).eval()


@pytest.fixture(params=["llama", "qwen2"])
def model(request) -> RefragModel:
    return tiny_refrag(request.param)


def add_random_lora(model: RefragModel, rank: int = 4) -> RefragModel:
    """Give the decoder a LoRA adapter that changes its outputs (peft initialises lora_B to zero)."""
    model.add_lora(rank)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def with_trained_lora(tmp_path) -> RefragModel:
    """A tiny model whose decoder lives in a folder (so a checkpoint can reference it) + a non-zero adapter."""
    model = tiny_refrag("llama")
    model.decoder.save_pretrained(tmp_path / "dec")
    model.tokenizer.save_pretrained(tmp_path / "dec")
    model.config.decoder = str(tmp_path / "dec")
    return add_random_lora(model)
