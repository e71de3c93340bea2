import numpy as np
import pytest
import torch
from conftest import tiny_refrag

from refrag.errors import CheckpointError
from refrag.modeling import IGNORE_INDEX, start_token
from refrag.train.objectives import Example, check_stage_order, choose_random_expanded, example_layouts


def test_reconstruction_layout_prefix_then_teacher_forced_tokens():
    model = tiny_refrag("llama", k=4)
    ctx = tuple(range(10, 22))  # 3 chunks of 4
    (lay,) = example_layouts(model, [Example(context=ctx, continuation=())])
    start = start_token(model.tokenizer)
    assert lay.length == 1 + 3 + 11  # start token (never a chunk at position 0: the attention sink), chunks, tokens
    assert lay.token_ids[0] == start and lay.is_vector.tolist() == [False] + [True] * 3 + [False] * 11
    assert lay.token_ids[4:].tolist() == list(ctx[:-1])
    assert lay.labels.tolist() == [IGNORE_INDEX] * 3 + list(ctx)  # loss on x_1..x_s only


def test_next_paragraph_layout_masks_context_and_keeps_expanded_tokens_in_place():
    model = tiny_refrag("llama", k=4)
    ctx, cont = tuple(range(10, 22)), (40, 41, 42)
    (lay,) = example_layouts(model, [Example(context=ctx, continuation=cont, expanded=(1,))])
    assert lay.is_vector.tolist() == [False, True] + [False] * 4 + [True] + [False] * 2
    assert lay.token_ids[2:6].tolist() == list(ctx[4:8])
    assert lay.labels.tolist() == [IGNORE_INDEX] * 6 + list(cont)


def test_loss_counts_only_labelled_tokens():
    torch.manual_seed(0)
    model = tiny_refrag("llama", k=4)
    ex = Example(context=tuple(range(10, 18)), continuation=(30, 31, 32, 33))
    inputs = model.build_inputs(example_layouts(model, [ex]))
    loss = model(inputs)
    logits = model.decoder_logits(inputs)[0]  # [T, V]
    T = logits.shape[0]
    manual = torch.nn.functional.cross_entropy(logits[T - 4 :].float(), torch.tensor([30, 31, 32, 33]))
    assert torch.allclose(loss, manual, atol=1e-5)
    changed = Example(context=ex.context, continuation=(30, 31, 32, 99))  # the last target changes the loss
    assert not torch.allclose(model(model.build_inputs(example_layouts(model, [changed]))), loss)


@pytest.mark.parametrize("stage, init, ok", [
    ("reconstruct", None, True), ("reconstruct", "reconstruct", True), ("reconstruct", "cpt", False),
    ("cpt", None, False), ("cpt", "reconstruct", True), ("cpt", "mixed", False),
    ("mixed", "reconstruct", False), ("mixed", "cpt", True),
])
def test_stage_order(stage, init, ok):
    if ok:
        check_stage_order(stage, init)
    else:
        with pytest.raises(CheckpointError, match="reconstruct -> cpt -> mixed"):
            check_stage_order(stage, init)


def test_random_expansion_never_leaves_an_example_without_a_compressed_chunk():
    rng = np.random.default_rng(0)
    assert all(choose_random_expanded(1, 0.999, rng) == () for _ in range(20))
    picks = [choose_random_expanded(3, 0.999, rng) for _ in range(20)]
    assert all(len(p) == 2 and set(p) <= {0, 1, 2} for p in picks) and len(set(picks)) > 1
    rates = np.mean([len(choose_random_expanded(8, 0.1, rng)) for _ in range(2000)]) / 8
    assert rates == pytest.approx(0.1, abs=0.02)
    assert choose_random_expanded(8, 0.0, rng) == ()
