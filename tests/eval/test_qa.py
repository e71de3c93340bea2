"""QA: mode parsing, data loading, gold passages with distractors, an end-to-end run on a tiny model."""

from __future__ import annotations

import json

import pytest

from refrag.errors import InputError
from refrag.eval.qa import QAFields, QAOptions, evaluate_qa, gold_passages, load_qa, parse_modes
from tests.conftest import tiny_refrag

ROWS = [
    {
        "q": f"Where is city {i}?",
        "a": f"place {i}",
        "ctx": f"City {i} is in place {i}. " * 3,
        "cf_answer": f"nowhere {i}",
        "cf_context": f"City {i} is in nowhere {i}.",
    }
    for i in range(6)
]


@pytest.fixture()
def qa_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_parse_modes():
    modes = parse_modes("full, refrag,refrag@8,llmlingua")
    assert [(m.kind, m.passages) for m in modes] == [
        ("full", None),
        ("refrag", None),
        ("refrag", 8),
        ("llmlingua", None),
    ]
    for bad in ("fast", "refrag@x", "refrag@0", ""):
        with pytest.raises(InputError):
            parse_modes(bad)


def test_load_qa_fields_limit_and_counterfactual(qa_file):
    fields = QAFields(question="q", answer="a", context="ctx")
    all_rows = load_qa(qa_file, fields)
    assert [e.answers for e in all_rows] == [(f"place {i}",) for i in range(6)]
    sample = load_qa(qa_file, fields, limit=3, seed=1)
    assert len(sample) == 3 and sample == load_qa(qa_file, fields, limit=3, seed=1)
    cf = load_qa(qa_file, fields, counterfactual=True)
    assert cf[2].answers == ("nowhere 2",) and cf[2].memory_answers == ("place 2",)
    assert cf[2].context == "City 2 is in nowhere 2."
    with pytest.raises(InputError, match="lacks"):
        load_qa(qa_file, QAFields(question="question"))


def test_gold_passage_is_always_included_once(qa_file):
    examples = load_qa(qa_file, QAFields(question="q", answer="a", context="ctx"))
    for i in range(len(examples)):
        texts = gold_passages(examples, i, 4, seed=0)
        assert len(texts) == 4 and texts.count(examples[i].context) == 1
    assert gold_passages(examples, 0, 1, seed=0) == [examples[0].context]


def test_evaluate_qa_runs_every_mode(qa_file):
    model = tiny_refrag("llama", k=4)
    examples = load_qa(qa_file, QAFields(question="q", answer="a", context="ctx"), counterfactual=True)[:2]
    options = QAOptions(parse_modes("full,refrag,refrag@3"), max_new_tokens=3)
    summaries, records = evaluate_qa(model, examples, options, progress=False)
    assert [s.mode for s in summaries] == ["full", "refrag", "refrag@3"] and len(records) == 6
    by_mode = {s.mode: s for s in summaries}
    assert by_mode["refrag@3"].passages == 3 and by_mode["full"].n == 2
    assert by_mode["refrag"].decoder_positions < by_mode["full"].decoder_positions
    assert all(s.memory is not None and s.ttft_p50_s > 0 for s in summaries)
    with pytest.raises(InputError, match="llmlingua"):
        evaluate_qa(model, examples, QAOptions(parse_modes("llmlingua")), progress=False)
