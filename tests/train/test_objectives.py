import numpy as np
import pytest
import torch
from conftest import tiny_refrag

from refrag.errors import CheckpointError, InputError
from refrag.modeling import IGNORE_INDEX, start_token
from refrag.train import cpt, mixed, reconstruct
from refrag.train.common import StageOptions, check_stage_order
from refrag.train.objectives import (
    Example,
    choose_random_expanded,
    example_layouts,
    teacher_layouts,
    training_loss,
)


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
    recipe = {"reconstruct": reconstruct, "cpt": cpt, "mixed": mixed}[stage].RECIPE
    if ok:
        check_stage_order(recipe, init)
    else:
        with pytest.raises(CheckpointError, match="reconstruct -> cpt -> mixed"):
            check_stage_order(recipe, init)


def test_random_expansion_never_leaves_an_example_without_a_compressed_chunk():
    rng = np.random.default_rng(0)
    assert all(choose_random_expanded(1, 0.999, rng) == () for _ in range(20))
    picks = [choose_random_expanded(3, 0.999, rng) for _ in range(20)]
    assert all(len(p) == 2 and set(p) <= {0, 1, 2} for p in picks) and len(set(picks)) > 1
    rates = np.mean([len(choose_random_expanded(8, 0.1, rng)) for _ in range(2000)]) / 8
    assert rates == pytest.approx(0.1, abs=0.02)
    assert choose_random_expanded(8, 0.0, rng) == ()


def test_teacher_layout_reads_the_context_as_tokens_with_the_students_targets():
    model = tiny_refrag("llama", k=4)
    ex = Example(context=tuple(range(10, 18)), continuation=(30, 31, 32), expanded=(0,))
    (teacher,) = teacher_layouts(model, [ex])
    (student,) = example_layouts(model, [ex])
    assert not teacher.is_vector.any()
    assert teacher.token_ids.tolist() == [start_token(model.tokenizer), *range(10, 18), 30, 31]
    t_labels = teacher.labels[teacher.labels != IGNORE_INDEX].tolist()
    assert t_labels == student.labels[student.labels != IGNORE_INDEX].tolist() == [30, 31, 32]
    with pytest.raises(InputError, match="continuation"):
        teacher_layouts(model, [Example(context=ex.context, continuation=())])


def two_examples() -> list[Example]:
    """Two next-paragraph examples with different context lengths (so the batch is left-padded)."""
    return [Example(context=tuple(range(10, 18)), continuation=(30, 31, 32, 33)),
            Example(context=tuple(range(20, 24)), continuation=(40, 41, 42, 43))]


def test_distillation_loss_is_the_kl_from_the_full_context_decoder():
    torch.manual_seed(0)
    model = tiny_refrag("llama", k=4)
    examples = two_examples()
    kl = training_loss(model, examples, distill=1.0)
    # by hand: full logits of both layouts, one example at a time
    manual = []
    for ex in examples:
        s = model.decoder_logits(model.build_inputs(example_layouts(model, [ex])))[0, -4:].float()
        t = model.decoder_logits(model.build_inputs(teacher_layouts(model, [ex])))[0, -4:].float()
        manual.append((t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1))
    assert torch.allclose(kl, torch.cat(manual).mean(), atol=1e-5)
    ce = training_loss(model, examples)
    half = training_loss(model, examples, distill=0.5)
    assert torch.allclose(half, 0.5 * ce + 0.5 * kl, atol=1e-5)
    kl.backward()  # the teacher is constant: the gradient reaches the compressor only through the student
    assert model.projector.fc1.weight.grad is not None and model.projector.fc1.weight.grad.abs().sum() > 0


def test_hidden_distillation_is_each_layers_relative_distance_from_the_full_context_decoder():
    torch.manual_seed(0)
    model = tiny_refrag("llama", k=4)
    examples = two_examples()
    kl = training_loss(model, examples, distill=1.0)
    both = training_loss(model, examples, distill=1.0, distill_hidden=0.5)
    # by hand: every layer's output at the last 4 positions, one example at a time
    per_layer = []
    for ex in examples:
        def states(layouts):
            inputs = model.build_inputs(layouts)
            with model.decoder_for(inputs.compressed, inputs.vector_mask) as decoder:
                out = decoder(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                              position_ids=inputs.position_ids, output_hidden_states=True, use_cache=False)
            return torch.stack([h[0, -4:] for h in out.hidden_states[1:]])  # [layers, 4, D]
        s, t = states(example_layouts(model, [ex])), states(teacher_layouts(model, [ex]))
        per_layer.append(torch.log1p((s - t).square().sum(-1) / t.square().sum(-1)))  # [layers, 4]
    hidden = torch.cat(per_layer, dim=1).mean()
    assert hidden > 0.01  # compressed context: the student's states differ from the teacher's
    assert torch.allclose(both, kl + 0.5 * hidden, atol=1e-5)
    ce = training_loss(model, examples)
    assert torch.allclose(training_loss(model, examples, distill_hidden=2.0), ce + 2.0 * hidden, atol=1e-5)
    (both - kl).backward()
    assert model.projector.fc1.weight.grad is not None and model.projector.fc1.weight.grad.abs().sum() > 0
    with pytest.raises(InputError, match=">= 0"):
        StageOptions(distill_hidden=-1.0, continuation_tokens=8)
    with pytest.raises(InputError, match="continuation"):
        StageOptions(distill_hidden=0.5)


def test_distillation_is_refused_without_a_continuation():
    with pytest.raises(InputError, match="continuation"):
        StageOptions(distill=0.5)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        StageOptions(distill=1.5, continuation_tokens=8)
