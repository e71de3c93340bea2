"""End to end on the real offline default models (converted once into the shared cache, then reused)."""

import pytest
import torch

from refrag import checkpoint
from refrag.config import CompressionOptions, RefragConfig, SamplingOptions
from refrag.generation import Request, generate

pytestmark = pytest.mark.integration

CONTEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by the engineering "
    "company of Gustave Eiffel and completed in 1889 for the World's Fair. It is 330 metres tall."
)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return checkpoint.from_config(RefragConfig(), progress=False)


def test_full_context_answer_reads_the_context(model):
    request = Request.from_texts("When was the Eiffel Tower completed?", [CONTEXT], model.tokenizer)
    answer = generate(model, [request], compression=CompressionOptions(mode="full"),
                      sampling=SamplingOptions(max_new_tokens=24))[0]
    assert "1889" in answer.text


def test_expand_everything_equals_full_mode(model):
    """With every chunk expanded, refrag mode is plain RAG: same positions, same greedy tokens."""
    request = Request.from_texts("Who designed the tower?", [CONTEXT], model.tokenizer)
    sampling = SamplingOptions(max_new_tokens=8)
    full = generate(model, [request], compression=CompressionOptions(mode="full"), sampling=sampling)[0]
    expanded = generate(model, [request], compression=CompressionOptions(expand_fraction=1.0), sampling=sampling)[0]
    assert expanded.token_ids == full.token_ids and expanded.decoder_positions == full.decoder_positions
    compressed = generate(model, [request], sampling=sampling)[0]
    assert compressed.decoder_positions == full.decoder_positions - full.context_tokens + compressed.context_positions
