"""Pipeline: retrieval -> stored chunk vectors -> answer, with sources and timings."""

import pytest
from conftest import tiny_refrag
from index_helpers import build, corpus, options, retrieval_spec, rmodel  # noqa: F401 (fixtures)

from refrag.config import CompressionOptions, SamplingOptions
from refrag.errors import CheckpointError, InputError
from refrag.generation import prompt_positions
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


@pytest.mark.parametrize("mode", ["full", "refrag"])
def test_max_positions_drops_the_lowest_ranked_passages(corpus, tmp_path, rmodel, options, mode):  # noqa: F811
    index = build(corpus, tmp_path, rmodel, options)
    pipe = Pipeline(index, rmodel)
    compression = CompressionOptions(mode=mode)
    question = "Paris is the capital of France."
    every = pipe.retrieve(question, top_k=4, compression=compression)
    alone = pipe.retrieve(question, top_k=1, compression=compression)
    cap = prompt_positions(rmodel, alone.request, compression=compression)  # room for the best passage only
    fitted = pipe.retrieve(question, top_k=4, compression=compression, max_positions=cap)
    assert [h.id for h in fitted.hits] == [every.hits[0].id]
    assert [d.hit.id for d in fitted.dropped] == [h.id for h in every.hits[1:]]  # in rank order, reason given
    assert {d.reason for d in fitted.dropped} == {"max_positions"}
    answer = pipe.ask(question, top_k=4, compression=compression, max_positions=cap,
                      sampling=SamplingOptions(max_new_tokens=1))
    assert answer.answer.decoder_positions <= cap
    with pytest.raises(InputError, match="the best passage alone needs"):
        pipe.retrieve(question, top_k=4, compression=compression, max_positions=cap - 1)


def test_a_query_longer_than_the_retrieval_encoder_reads_is_a_warning(corpus, tmp_path, rmodel, options):  # noqa: F811
    index = build(corpus, tmp_path, rmodel, options)
    index.retriever.model.max_seq_length = 8
    with pytest.warns(UserWarning, match="reads its first 8"):
        index.search("Paris is the capital of France and rivers flow to the sea through Paris.", top_k=1)
