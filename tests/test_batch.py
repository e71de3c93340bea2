"""`refrag ask --questions`: batched, appended as it goes, resumable without duplicates, bad lines skipped."""

import json

from index_helpers import build, corpus, options, retrieval_spec, rmodel  # noqa: F401 (fixtures)

from refrag.batch import BatchOptions, answer_questions
from refrag.config import SamplingOptions
from refrag.pipeline import Pipeline
from refrag.relevance import HitFilter

QUESTIONS = ["Paris is the capital of France.", "Rivers flow to the sea?", "What is a fox?", "Numbers?",
             "Which mountains?"]


def write_questions(path, extra_lines=()):
    lines = [json.dumps({"id": f"q{i}", "question": q}) for i, q in enumerate(QUESTIONS)]
    path.write_text("\n".join([*lines[:2], *extra_lines, *lines[2:]]) + "\n")
    return path


def rows(path):
    """The output rows without their timings (which differ run to run)."""
    return [{k: v for k, v in json.loads(line).items() if k != "timings"} for line in path.read_text().splitlines()]


def test_batches_answer_every_question_and_skip_bad_lines(corpus, tmp_path, rmodel, options):  # noqa: F811
    pipe = Pipeline(build(corpus, tmp_path, rmodel, options), rmodel)
    questions = write_questions(tmp_path / "q.jsonl", ["{not json", json.dumps({"id": "x"}),
                                                       json.dumps({"question": "   "})])
    out = tmp_path / "answers.jsonl"
    report = answer_questions(pipe, questions, out, BatchOptions(batch_size=2, top_k=2,
                                                                 sampling=SamplingOptions(max_new_tokens=3)),
                              progress=False)
    assert report.answered == 5 and len(report.skipped) == 3
    assert [s.split(":")[0] for s in report.skipped] == ["line 3", "line 4", "line 5"]
    got = rows(out)
    assert [r["id"] for r in got] == [f"q{i}" for i in range(5)] and all(len(r["sources"]) == 2 for r in got)
    single = pipe.ask(QUESTIONS[0], top_k=2, sampling=SamplingOptions(max_new_tokens=3))
    assert got[0]["answer"] == single.answer.text  # batched = one at a time


def test_a_killed_run_resumes_without_duplicates(corpus, tmp_path, rmodel, options):  # noqa: F811
    pipe = Pipeline(build(corpus, tmp_path, rmodel, options), rmodel)
    questions = write_questions(tmp_path / "q.jsonl")
    out = tmp_path / "answers.jsonl"
    opts = BatchOptions(batch_size=2, top_k=2, sampling=SamplingOptions(max_new_tokens=2))
    answer_questions(pipe, questions, out, opts, progress=False)
    complete = rows(out)
    kept = out.read_text().splitlines(keepends=True)[:3]
    out.write_text("".join(kept) + kept[0][:15])  # killed while writing the 4th row: a torn line
    report = answer_questions(pipe, questions, out, opts, progress=False)
    assert report.already == 3 and report.answered == 2
    again = rows(out)
    assert [r["id"] for r in again] == [r["id"] for r in complete]
    assert rounded(again) == rounded(complete)  # a retrieval score depends on its batch in the 7th digit


def rounded(rows: list[dict]) -> list[dict]:
    return [{**r, "sources": [{**s, "score": round(s["score"], 5)} for s in r["sources"]]} for r in rows]


def test_a_question_the_filter_empties_is_skipped_not_fatal(corpus, tmp_path, rmodel, options):  # noqa: F811
    pipe = Pipeline(build(corpus, tmp_path, rmodel, options), rmodel)
    questions = write_questions(tmp_path / "q.jsonl")
    out = tmp_path / "answers.jsonl"
    report = answer_questions(pipe, questions, out, BatchOptions(batch_size=5, top_k=2, hit_filter=HitFilter(
        min_score=2.0), sampling=SamplingOptions(max_new_tokens=2)), progress=False)  # cosine <= 1: all dropped
    assert report.answered == 0 and len(report.skipped) == 5 and "relevance filter" in report.skipped[0]
