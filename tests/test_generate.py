import pytest
import torch
from conftest import add_random_lora, tiny_refrag

from refrag.chunking import make_passage
from refrag.config import ChunkingOptions, CompressionOptions, SamplingOptions
from refrag.errors import InputError
from refrag.generation import Request, generate, prompt_positions, sample_next
from refrag.prompting import PromptTemplate, rag_layout

CONTEXT = ["Paris is the capital of France. The quick brown fox jumps over the lazy dog."] * 3
FULL = CompressionOptions(mode="full")


def _request(model, question="What is the capital of France?"):
    return Request.from_texts(question, CONTEXT, model.tokenizer, ChunkingOptions(k=model.k, passage_tokens=16))


def test_full_mode_greedy_equals_hf_generate(model):
    """KV-cached decoding from inputs_embeds reproduces HF greedy generation on the same tokens."""
    request = _request(model)
    template = PromptTemplate.for_tokenizer(model.tokenizer)
    layout = rag_layout(model, template, template.question_ids(model.tokenizer, request.question),
                        request.passages, None, set(range(len(request.chunks))))
    ours = generate(model, [request], compression=FULL, sampling=SamplingOptions(max_new_tokens=8))[0]
    ref = model.decoder.generate(layout.token_ids[None], attention_mask=torch.ones(1, layout.length, dtype=torch.long),
                                 max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert list(ours.token_ids) == ref[0, layout.length :].tolist()[: len(ours.token_ids)]
    assert len(ours.token_ids) >= 1 and ours.decoder_positions == layout.length


def test_batch_equals_single(model):
    a = _request(model)
    b = Request.from_texts("Where do rivers flow?", CONTEXT[:1], model.tokenizer, ChunkingOptions(k=model.k, passage_tokens=16))
    sampling = SamplingOptions(max_new_tokens=6)
    for mode in ("full", "refrag"):
        comp = CompressionOptions(mode=mode)
        batch = generate(model, [a, b], compression=comp, sampling=sampling)
        single = [generate(model, [r], compression=comp, sampling=sampling)[0] for r in (a, b)]
        assert [x.token_ids for x in batch] == [x.token_ids for x in single]


def test_refrag_uses_one_position_per_compressed_chunk(model):
    request = _request(model)
    n_chunks = sum(len(p.chunks) for p in request.passages)
    full = generate(model, [request], compression=FULL, sampling=SamplingOptions(max_new_tokens=1))[0]
    ref = generate(model, [request], sampling=SamplingOptions(max_new_tokens=1))[0]
    assert full.context_positions == full.context_tokens and full.compression == 1.0
    assert ref.context_positions == n_chunks
    separators = (len(request.passages) - 1) * len(PromptTemplate.for_tokenizer(model.tokenizer).separator_ids)
    assert separators > 0  # compressed passages follow each other without separator tokens
    assert ref.decoder_positions == full.decoder_positions - full.context_tokens - separators + n_chunks
    assert ref.kv_cache_bytes < full.kv_cache_bytes


def test_precomputed_vectors_give_the_same_answer(model):
    request = _request(model)
    encoded = tuple(model.encode_chunks([c.text for c in p.chunks]) for p in request.passages)
    cached = Request(request.question, request.passages, encoded)
    s = SamplingOptions(max_new_tokens=5)
    fresh, pre = generate(model, [request], sampling=s)[0], generate(model, [cached], sampling=s)[0]
    assert fresh.token_ids == pre.token_ids
    assert pre.timings.encode_s == 0.0 and fresh.timings.encode_s > 0.0
    with pytest.raises(InputError, match="chunk count"):
        generate(model, [Request(request.question, request.passages, encoded[:1])])


def test_streaming_concatenates_to_the_answer_and_stop_strings_cut(model):
    request = _request(model)
    pieces: list[str] = []
    answer = generate(model, [request], sampling=SamplingOptions(max_new_tokens=12),
                      on_text=lambda row, t: pieces.append(t))[0]
    assert "".join(pieces).strip() == answer.text
    long = generate(model, [request], sampling=SamplingOptions(max_new_tokens=12, ignore_eos=True))[0]
    assert len(long.text) > 3  # 12 tokens of a random model: the stop string below always exists
    stop = long.text[2:4]
    cut = generate(model, [request], sampling=SamplingOptions(max_new_tokens=12, ignore_eos=True, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and long.text.startswith(cut.text)


def test_sampling_is_seeded():
    logits = torch.randn(4, 50)
    a = sample_next(logits, SamplingOptions(temperature=1.0, top_p=0.9), torch.Generator().manual_seed(3))
    b = sample_next(logits, SamplingOptions(temperature=1.0, top_p=0.9), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    greedy = sample_next(logits, SamplingOptions(), None)
    assert torch.equal(greedy, logits.argmax(-1))
    top1 = sample_next(logits, SamplingOptions(temperature=1.0, top_p=1e-6), torch.Generator().manual_seed(0))
    assert torch.equal(top1, logits.argmax(-1))  # nucleus of one token is greedy


def test_expanded_chunks_reduce_compression(model):
    request = _request(model)
    half = generate(model, [request], compression=CompressionOptions(expand_fraction=0.5),
                    sampling=SamplingOptions(max_new_tokens=1))[0]
    n = sum(len(p.chunks) for p in request.passages)
    assert len(half.expanded_chunks) == round(0.5 * n)
    assert 1.0 < half.compression < model.k


@pytest.mark.parametrize("question", ["", "   "])
def test_empty_question(model, question):
    with pytest.raises(InputError, match="question is empty"):
        generate(model, [Request(question, _request(model).passages)])


def test_empty_context_and_too_long_context():
    model = tiny_refrag("llama")
    with pytest.raises(InputError, match="context is empty"):
        Request.from_texts("q?", [""], model.tokenizer)
    with pytest.raises(InputError, match="context is empty"):
        generate(model, [Request("q?", ())])
    long_ids = list(range(10, 300)) * 3  # 870 tokens > the tiny decoder's 512 window
    passages = tuple(make_passage(long_ids[i : i + 64], model.tokenizer, model.k) for i in range(0, 870, 64))
    with pytest.raises(InputError, match="window is 512: in full mode every context token is a position"):
        generate(model, [Request("q?", passages)], compression=FULL)
    ok = generate(model, [Request("q?", passages)], sampling=SamplingOptions(max_new_tokens=1))[0]
    assert ok.decoder_positions < 512  # refrag mode fits 4x more context in the same window
    assert prompt_positions(model, Request("q?", passages)) == ok.decoder_positions
    assert prompt_positions(model, Request("q?", passages), compression=FULL) > 512
    with pytest.raises(InputError, match="window is 512: in refrag mode .* keep fewer chunks raw"):
        generate(model, [Request("q?", passages * 3)], sampling=SamplingOptions(max_new_tokens=1))


def test_ignore_eos_generates_exactly_max_new_tokens():
    model = tiny_refrag("llama")
    request = _request(model)
    eos = model.decoder.generation_config.eos_token_id
    with torch.no_grad():  # make EOS the certain next token
        model.decoder.lm_head.bias = torch.nn.Parameter(torch.zeros(model.decoder.config.vocab_size))
        model.decoder.lm_head.bias[eos] = 1e4
    stopped = generate(model, [request], sampling=SamplingOptions(max_new_tokens=5))[0]
    forced = generate(model, [request], sampling=SamplingOptions(max_new_tokens=5, ignore_eos=True))[0]
    assert stopped.finish_reason == "eos" and stopped.token_ids == ()
    assert len(forced.token_ids) == 5 and forced.finish_reason == "length"


def test_a_decoder_adapter_changes_refrag_answers_only():
    plain, adapted = tiny_refrag("llama"), add_random_lora(tiny_refrag("llama"))
    sampling = SamplingOptions(max_new_tokens=6, ignore_eos=True)
    full = [generate(m, [_request(m)], compression=FULL, sampling=sampling)[0].token_ids for m in (plain, adapted)]
    assert full[0] == full[1]  # plain RAG runs the original decoder
    refrag = [generate(m, [_request(m)], sampling=sampling)[0].token_ids for m in (plain, adapted)]
    assert refrag[0] != refrag[1]
    adapted.merge_adapter()  # the merged copy answers as the unmerged adapter did
    assert generate(adapted, [_request(adapted)], sampling=sampling)[0].token_ids == refrag[1]
    assert generate(adapted, [_request(adapted)], compression=FULL, sampling=sampling)[0].token_ids == full[0]


def test_generate_keeps_the_callers_train_mode(model):
    model.train()
    generate(model, [_request(model)], sampling=SamplingOptions(max_new_tokens=1))
    assert model.training  # restored after
    model.eval()
    generate(model, [_request(model)], sampling=SamplingOptions(max_new_tokens=1))
    assert not model.training


def test_non_finite_vectors_or_weights_are_an_error_not_an_empty_answer():
    from refrag.config import CompressionOptions, SamplingOptions
    from refrag.errors import CheckpointError

    model = tiny_refrag("llama", k=4)
    request = Request.from_texts("What is it?", ["Paris is the capital of France. " * 3], model.tokenizer)
    cached = request.with_encodings(model)
    broken = Request(cached.question, cached.passages, tuple(torch.full_like(e, float("nan")) for e in cached.encoded))
    with pytest.raises(CheckpointError, match="NaN"):
        generate(model, [broken], sampling=SamplingOptions(max_new_tokens=2))
    with torch.no_grad():
        model.decoder.model.norm.weight.fill_(float("nan"))
    with pytest.raises(CheckpointError, match="NaN"):
        generate(model, [request], compression=CompressionOptions(mode="full"), sampling=SamplingOptions(max_new_tokens=2))


def _prompt_layout(model):
    """The compressed prompt of ``_request`` (every chunk a vector)."""
    template = PromptTemplate.for_tokenizer(model.tokenizer)
    request = _request(model).with_encodings(model)
    with torch.no_grad():
        vectors = model.project(torch.cat(list(request.encoded)))
    return rag_layout(model, template, template.question_ids(model.tokenizer, request.question), request.passages,
                      vectors, set())


def _recomputed_greedy(model, answer) -> list[int]:
    """The greedy pick after every answer prefix, by ONE uncached forward over prompt + answer (compressed)."""
    from refrag.modeling import Layout

    prompt = _prompt_layout(model)
    tail = torch.tensor(list(answer[:-1]))
    whole = Layout(torch.cat([prompt.token_ids, tail]), torch.cat([prompt.is_vector, torch.zeros_like(tail, dtype=torch.bool)]),
                   prompt.vectors)
    logits = model.decoder_logits(model.build_inputs([whole]))[0, prompt.length - 1 :]  # [n, V]
    return logits.argmax(-1).tolist()


def test_chunk_scoped_adapter_decoding_equals_recomputing_the_whole_sequence():
    """Cached decoding of new tokens (text: the original weights) picks the tokens a full recompute of prompt +
    answer, with the adapter at the vector positions only, picks."""
    model = add_random_lora(tiny_refrag("llama"))
    model.set_adapter_scope("chunks")
    sampling = SamplingOptions(max_new_tokens=6, ignore_eos=True)
    answer = generate(model, [_request(model)], sampling=sampling)[0].token_ids
    assert _recomputed_greedy(model, answer) == list(answer)
    longer = _request(model, "What is the capital of France, and which river runs through it?")
    batched = generate(model, [_request(model), longer], sampling=sampling)  # left-padded rows, one mask
    assert [a.token_ids for a in batched] == [answer, generate(model, [longer], sampling=sampling)[0].token_ids]
    model.set_adapter_scope("sequence")
    assert generate(model, [_request(model)], sampling=sampling)[0].token_ids != answer  # the scope matters


def test_answer_adapter_decoding_equals_recomputing_the_whole_sequence():
    """An answer adapter (beside a chunk-scoped compressor adapter) runs at every position of a compressed call,
    cached decoding of the new tokens included: greedy decoding picks what a full recompute picks."""
    model = add_random_lora(tiny_refrag("llama"))
    model.set_adapter_scope("chunks")
    sampling = SamplingOptions(max_new_tokens=6, ignore_eos=True)
    without = generate(model, [_request(model)], sampling=sampling)[0].token_ids
    plain_full = generate(model, [_request(model)], compression=FULL, sampling=sampling)[0].token_ids
    model.add_answer_adapter(4)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if "lora_B.answer" in name:
                p.normal_(0, 0.5)
    answer = generate(model, [_request(model)], sampling=sampling)[0].token_ids
    assert answer != without
    assert generate(model, [_request(model)], compression=FULL, sampling=sampling)[0].token_ids == plain_full
    assert _recomputed_greedy(model, answer) == list(answer)
    model.merge_adapter()  # the answer adapter merged into a copy's weights, the compressor's kept chunk-scoped
    assert model.merged_decoder is not None
    assert generate(model, [_request(model)], sampling=sampling)[0].token_ids == answer
    assert generate(model, [_request(model)], compression=FULL, sampling=sampling)[0].token_ids == plain_full
    inputs = model.build_inputs([_prompt_layout(model)])
    with torch.no_grad():
        merged = model.decoder_logits(inputs)
        model.merged_decoder = None
        torch.testing.assert_close(merged, model.decoder_logits(inputs), atol=1e-4, rtol=1e-4)
