"""`eval reconstruction`: teacher-forced rows per number of chunks, and greedy generation of 1 x k chunks."""

import pytest
import torch
from conftest import TEXT, tiny_refrag

from refrag.chunking import chunk_token_ids
from refrag.eval.reconstruction import eval_reconstruction, greedy_reconstruction
from refrag.modeling import start_token


@pytest.fixture(scope="module")
def model():
    return tiny_refrag("llama", k=4)


def _by_hand(model, target):
    """[start] e, then greedy tokens one at a time, from the decoder's full logits."""
    vector = model.embed_chunks(chunk_token_ids(target, model.tokenizer, len(target)))
    made = []
    for _ in range(len(target)):
        layout = model.layout([[start_token(model.tokenizer)], vector, made])
        made.append(int(model.decoder_logits(model.build_inputs([layout]))[0, -1].argmax()))
    return made


def test_greedy_scores_the_decoders_own_generation(model):
    ids = model.tokenizer.encode(TEXT, add_special_tokens=False)
    targets = [tuple(ids[i : i + 4]) for i in range(0, 40, 4)]
    result = greedy_reconstruction(model, targets, batch_size=3)
    made = [_by_hand(model, t) for t in targets]
    right = torch.tensor([[a == b for a, b in zip(m, t)] for m, t in zip(made, targets)], dtype=torch.float)
    assert result.chunks == 10 and len(result.position_accuracy) == 4
    assert result.position_accuracy == pytest.approx(right.mean(0).tolist())
    assert result.exact == pytest.approx(float(right.all(1).float().mean()))
    assert greedy_reconstruction(model, targets, batch_size=1) == result  # batch-independent


def test_the_report_has_a_row_per_number_of_chunks_and_the_greedy_row(model, tmp_path):
    data = tmp_path / "held_out.txt"
    data.write_text(TEXT, encoding="utf-8")
    report = eval_reconstruction(model, str(data), max_chunks=4, examples=3, greedy=True, progress=False)
    assert [r.chunks for r in report.rows] == [1, 2, 4]
    assert all(0 <= r.accuracy <= 1 and r.tokens == 3 * r.chunks * 4 for r in report.rows)
    assert report.greedy is not None and report.greedy.chunks == 3
    assert eval_reconstruction(model, str(data), max_chunks=1, examples=3, progress=False).greedy is None
