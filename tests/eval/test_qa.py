"""QA: mode parsing, data loading, gold passages with distractors, an end-to-end run on a tiny model."""

from __future__ import annotations

import json

import pytest

from refrag.errors import InputError
from refrag.eval.qa import (
    QAFields,
    QAOptions,
    compare_modes,
    evaluate_qa,
    extract,
    gold_passages,
    load_qa,
    parse_modes,
)
from refrag.generation import Request
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


def test_policies_and_budgets_multiply_the_refrag_and_extractive_rows():
    modes = parse_modes("full,refrag,extractive", ["lexical", "random"], [0.1], [96])
    assert [m.name for m in modes] == [
        "full", "refrag", "refrag+lexical10%", "refrag+lexical96t", "refrag+random10%", "refrag+random96t",
        "extractive+lexical10%", "extractive+lexical96t", "extractive+random10%", "extractive+random96t",
    ]
    twin = modes[3]
    assert (twin.policy, twin.fraction, twin.tokens) == ("lexical", 0.0, 96)
    assert twin.selection(0).expand_tokens == 96 and twin.selection(0).mode == "refrag"
    with pytest.raises(InputError, match="extractive"):
        parse_modes("extractive")
    with pytest.raises(InputError, match="policy"):
        parse_modes("refrag", ["best"], [0.1])
    with pytest.raises(InputError, match="twice"):
        parse_modes("refrag,refrag")
    assert [m.name for m in parse_modes("refrag", ["lexical"], [0.101, 0.104])][1:] == [
        "refrag+lexical10.1%", "refrag+lexical10.4%"]
    with pytest.raises(InputError, match="expand_fraction"):
        parse_modes("refrag", ["lexical"], [1.5])


def test_extract_keeps_only_the_chosen_chunks_as_plain_passages():
    model = tiny_refrag("llama", k=4)
    request = Request.from_texts("q?", ["City 1 is in place 1. " * 2, "City 2 is in place 2. " * 2], model.tokenizer)
    chunks = request.chunks
    n0 = len(request.passages[0].chunks)
    keep = {0, 1, n0}  # a run of two in the first passage, the first chunk of the second
    cut = extract(request, keep)
    assert [len(p.chunks) for p in cut.passages] == [2, 1]
    assert cut.chunks == [chunks[0], chunks[1], chunks[n0]]
    assert cut.passages[0].token_ids == chunks[0].token_ids + chunks[1].token_ids
    assert cut.passages[0].text == chunks[0].text + chunks[1].text and cut.passages[1].text == chunks[n0].text
    with pytest.raises(InputError, match="keeps no chunk"):
        extract(request, set())


def test_extractive_and_policy_rows_run_and_compare_pairwise(qa_file):
    model = tiny_refrag("llama", k=4)
    examples = load_qa(qa_file, QAFields(question="q", answer="a", context="ctx"))[:3]
    options = QAOptions(parse_modes("full,refrag,extractive", ["lexical"], [0.5]), passages=2, max_new_tokens=2)
    summaries, records = evaluate_qa(model, examples, options, progress=False)
    by_mode = {s.mode: s for s in summaries}
    assert list(by_mode) == ["full", "refrag", "refrag+lexical50%", "extractive+lexical50%"]
    assert by_mode["extractive+lexical50%"].decoder_positions < by_mode["full"].decoder_positions
    assert by_mode["refrag"].decoder_positions < by_mode["refrag+lexical50%"].decoder_positions
    lexical = [r for r in records if r.mode == "refrag+lexical50%"]
    extractive = [r for r in records if r.mode == "extractive+lexical50%"]
    assert [r.expanded_chunks for r in lexical] == [r.expanded_chunks for r in extractive]  # the same chunks
    assert all(r.expanded_chunks for r in lexical)
    pairs = [(c.mode, c.baseline) for c in compare_modes(options.modes, records)]
    assert pairs == [("refrag", "full"), ("refrag+lexical50%", "full"), ("extractive+lexical50%", "full"),
                     ("refrag+lexical50%", "extractive+lexical50%")]


def test_eval_qa_cli_takes_policies_and_budgets(qa_file, tmp_path):
    from typer.testing import CliRunner

    from refrag.checkpoint import save
    from refrag.cli import app

    ckpt = save(tiny_refrag("llama", k=4), tmp_path / "ckpt", save_decoder=True)
    args = ["eval", "qa", "--data", str(qa_file), "--question-field", "q", "--answer-field", "a", "--context-field",
            "ctx", "--model", str(ckpt), "--dtype", "float32", "--limit", "2", "--max-new-tokens", "2",
            "--modes", "refrag,extractive", "--policy", "lexical,first", "--expand-fraction", "0.5", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [m["mode"] for m in data["modes"]] == ["refrag", "refrag+lexical50%", "refrag+first50%",
                                                  "extractive+lexical50%", "extractive+first50%"]
    assert len(data["comparisons"]) == 6 and {"mean", "low", "high"} <= set(data["comparisons"][0]["contains"])
    bad = CliRunner().invoke(app, [*args[:-7], "--modes", "refrag", "--expand-fraction", "0.5,x"])
    assert bad.exit_code != 0 and "--expand-fraction: 'x'" in str(bad.exception)


def test_mode_family_strips_exactly_the_budget_parse_modes_appends():
    from refrag.eval.qa import mode_family

    modes = parse_modes("full,refrag,refrag@8,extractive", ["lexical", "random"], [0.1, 0.025], [48])
    families = {m.name: mode_family(m.name) for m in modes}
    assert families["full"] == "full" and families["refrag@8"] == "refrag@8"
    for m in modes:
        if m.policy is not None:
            assert families[m.name].endswith(f"+{m.policy}"), m.name
