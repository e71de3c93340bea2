import pytest
import torch
from conftest import add_random_lora, tiny_refrag

from refrag.chunking import chunk_token_ids
from refrag.errors import InputError
from refrag.modeling import start_token
from refrag.refine import RefineOptions, compressor_fingerprint, cut_points, refine_encodings
from refrag.train.objectives import kl_between, teacher_outputs


def test_cut_points_spread_over_the_passage_and_end_before_its_last_chunk():
    assert cut_points(1, 5) == [] and cut_points(0, 5) == []
    assert cut_points(2, 5) == [1]
    assert cut_points(4, 5) == [1, 2, 3]
    assert cut_points(32, 5) == [1, 8, 16, 24, 31]
    assert cut_points(16, 1) == [15]


@pytest.mark.parametrize("bad", [{"steps": 0}, {"cuts": 0}, {"group": 0}, {"lr": 0.0}, {"lr": 2.0}])
def test_bad_options_are_refused(bad):
    with pytest.raises(InputError):
        RefineOptions(**bad)


def _passages(model, lengths):
    torch.manual_seed(5)
    out = []
    for n in lengths:
        ids = torch.randint(10, len(model.tokenizer), (n * model.k,)).tolist()
        out.append(chunk_token_ids(ids, model.tokenizer, model.k))
    return out


def _kl(model, passages, encoded, options):
    """The objective refine_encodings lowers, recomputed from scratch."""
    head = [[start_token(model.tokenizer)]]
    student, teacher, row = [], [], 0
    with torch.no_grad():
        vectors = model.project(encoded)
    for chunks in passages:
        for i in cut_points(len(chunks), options.cuts):
            student.append(model.scored_layout([*head, vectors[row : row + i]], chunks[i].token_ids))
            teacher.append(model.scored_layout([*head, [t for c in chunks[:i] for t in c.token_ids]],
                                               chunks[i].token_ids))
        row += len(chunks)
    with torch.no_grad():
        return float(kl_between(model.label_outputs(model.build_inputs(student)), teacher_outputs(model, teacher)))


def test_refinement_lowers_its_objective_and_leaves_the_model_and_one_chunk_passages_alone():
    model = add_random_lora(tiny_refrag("llama", k=4))
    passages = _passages(model, [6, 1, 4])
    with torch.no_grad():
        encoded = model.encode_chunks([c for p in passages for c in p])  # [11, E]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    options = RefineOptions(steps=8, lr=0.05, group=2)  # two groups: [6, 1] and [4]
    with torch.inference_mode():  # as index building calls it
        refined = refine_encodings(model, passages, encoded, options)
    assert refined.shape == encoded.shape and refined.dtype == encoded.dtype
    assert torch.equal(refined[6], encoded[6])  # the one-chunk passage
    assert not torch.equal(refined[:6], encoded[:6]) and not torch.equal(refined[7:], encoded[7:])
    assert _kl(model, passages, refined, options) < _kl(model, passages, encoded, options)
    assert all(torch.equal(p, weights[n]) and p.grad is None for n, p in model.named_parameters())


def test_a_passage_is_refined_the_same_alone_or_beside_others():
    model = tiny_refrag("llama", k=4)
    passages = _passages(model, [5, 3])
    with torch.no_grad():
        encoded = model.encode_chunks([c for p in passages for c in p])
    options = RefineOptions(steps=3)
    both = refine_encodings(model, passages, encoded, options)
    alone = refine_encodings(model, passages[1:], encoded[5:], options)
    torch.testing.assert_close(both[5:], alone, rtol=1e-4, atol=1e-5)


def test_mismatched_encodings_are_refused():
    model = tiny_refrag("llama", k=4)
    passages = _passages(model, [3])
    with pytest.raises(InputError, match="2 encodings for 3 chunks"):
        refine_encodings(model, passages, torch.zeros(2, model.encoder.hidden_size), RefineOptions())


def test_compressor_fingerprint_follows_the_projector_and_the_adapter():
    model = tiny_refrag("llama", k=4)
    before = compressor_fingerprint(model)
    add_random_lora(model)
    with_adapter = compressor_fingerprint(model)
    with torch.no_grad():
        model.projector.gain.mul_(1.5)
    assert len({before, with_adapter, compressor_fingerprint(model)}) == 3


def test_an_answer_adapter_is_off_while_refining_and_back_after():
    model = add_random_lora(tiny_refrag("llama", k=4))
    passages = _passages(model, [5])
    with torch.no_grad():
        encoded = model.encode_chunks([c for p in passages for c in p])
    options = RefineOptions(steps=3)
    alone = refine_encodings(model, passages, encoded, options)
    model.add_answer_adapter(4)
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if ".answer." in name and "lora_B" in name:
                p.normal_(0, 0.5)  # an answer adapter that changes compressed calls
    trainable = {n: p.requires_grad for n, p in model.decoder.named_parameters()}
    torch.testing.assert_close(refine_encodings(model, passages, encoded, options), alone)
    assert {n: p.requires_grad for n, p in model.decoder.named_parameters()} == trainable
    assert set(model.decoder.base_model.active_adapters) == {"default", "answer"}
    model.merge_adapter()  # inference's merged copy (the answer adapter folded in) is not what is refined for
    assert model.merged_decoder is not None
    torch.testing.assert_close(refine_encodings(model, passages, encoded, options), alone)
    assert model.merged_decoder is not None
