"""Pipeline: retrieval -> stored chunk vectors -> answer, with sources and timings."""

import pytest
from conftest import tiny_refrag
from index_helpers import build, corpus, options, retrieval_spec, rmodel  # noqa: F401 (fixtures)

from refrag.config import CompressionOptions, SamplingOptions
from refrag.errors import CheckpointError
from refrag.pipeline import Pipeline


def test_ask_uses_stored_chunk_vectors(corpus, tmp_path, rmodel, options):  # noqa: F811
    index = build(corpus, tmp_path, rmodel, options)
    pipe = Pipeline(index, rmodel)
    sampling = SamplingOptions(max_new_tokens=3)
    refrag = pipe.ask("Paris is the capital of France.", top_k=2, sampling=sampling)
    full = pipe.ask("Paris is the capital of France.", top_k=2, compression=CompressionOptions(mode="full"),
                    sampling=sampling)
    assert refrag.hits[0].meta.title == "Paris" and len(refrag.hits) == 2
    assert refrag.answer.timings.encode_s == 0.0  # cached path: nothing encoded at query time
    assert refrag.answer.decoder_positions < full.answer.decoder_positions
    assert refrag.ttft_s >= refrag.retrieval_s > 0


def test_a_model_the_index_was_not_built_with_is_refused(corpus, tmp_path, rmodel, options):  # noqa: F811
    index = build(corpus, tmp_path, rmodel, options)
    Pipeline(index, tiny_refrag("llama", k=4))  # same weights, same k: accepted
    with pytest.raises(CheckpointError, match="k: index 4 vs model 8"):
        Pipeline(index, tiny_refrag("llama", k=8))
