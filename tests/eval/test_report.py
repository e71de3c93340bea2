"""The report reads every number from the results folder and writes its plots next to the markdown."""

from __future__ import annotations

import json

import pytest

from refrag.errors import InputError
from refrag.eval.report import ReportInputs, _rate, training_series, write_report


def test_report_tables_and_plots(tmp_path):
    res = tmp_path / "results"
    (res / "ppl").mkdir(parents=True)
    (res / "ppl" / "summary.json").write_text(
        json.dumps(
            {
                "s": 64,
                "o": 16,
                "n": 3,
                "ks": [16],
                "seed": 0,
                "data": ["d.txt"],
                "log_ppl": {"no_context": 3.0, "full": 2.0, "truncated": 2.75, "refrag16": 2.5},
                "recovered": {"truncated": 0.25, "refrag16": 0.5},
            }
        )
    )
    (res / "qa_nq").mkdir()
    mode = {
        "n": 2,
        "em": 0.5,
        "f1": 0.625,
        "contains": 1.0,
        "memory": None,
        "ttft_p50_s": 0.1234,
        "decoder_positions": 40.0,
        "passages": 1,
    }
    (res / "qa_nq" / "summary.json").write_text(
        json.dumps({"modes": [{**mode, "mode": "full"}], "counterfactual": False})
    )
    (res / "commands.txt").write_text("refrag eval perplexity --s 64")
    runs = tmp_path / "runs" / "a"
    runs.mkdir(parents=True)
    (runs / "metrics.csv").write_text("step,name,value\n1,train/loss,4.0\n2,train/loss,3.5\n")
    out = write_report(ReportInputs(res, tmp_path / "docs" / "report.md", tmp_path / "runs"))
    text = out.read_text()
    assert "| refrag16 | 2.500 | 0.500 |" in text and "| truncated | 2.750 | 0.250 |" in text
    assert "| nq | full | 1 | 2 | 0.500 | 0.625 | 1.000 | - | 123 | 40 |" in text
    assert "refrag eval perplexity --s 64" in text and "TTFT sweep" not in text
    for png in ("quality_vs_rate.png", "qa_quality_vs_ttft.png", "training_curves.png"):
        assert (out.parent / png).stat().st_size > 1000


def test_missing_results_folder(tmp_path):
    with pytest.raises(InputError, match="results folder"):
        write_report(ReportInputs(tmp_path / "nope", tmp_path / "r.md"))


def test_training_curves_take_train_loss_and_held_out_log_ppl(tmp_path):
    run = tmp_path / "runs" / "rec"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text(
        "step,name,value\n1,train/loss,4.0\n1,train/lr,0.1\n2,train/loss,3.5\n"
        "2,eval/log_ppl_1xk,3.9\n2,eval/acc_1xk,0.3\n"
    )
    assert training_series(tmp_path / "runs") == {
        "rec: train/loss": [(1, 4.0), (2, 3.5)],
        "rec: eval/log_ppl_1xk": [(2, 3.9)],
    }
    assert training_series(tmp_path / "missing") == {}


@pytest.mark.parametrize("method, rate", [
    ("full", 1.0), ("truncated", 16.0), ("truncated152", 512 / 152), ("refrag16", 16.0), ("no_context", None),
    ("refrag16+last25", None), ("no_context_adapter", None), ("foreign_vectors", None),
])
def test_quality_vs_rate_places_methods_and_skips_controls(method, rate):
    assert _rate(method, 512, 16) == (rate if rate is None else pytest.approx(rate))


def test_qa_series_group_budgets_by_policy_and_the_plot_is_written(tmp_path):
    from refrag.eval.report import plot_qa_positions, qa_series

    rows = [{"mode": m, "decoder_positions": p, "contains": c} for m, p, c in [
        ("full", 464.0, 0.16), ("refrag", 74.0, 0.03), ("refrag+lexical25%", 190.0, 0.12),
        ("refrag+lexical10%", 115.0, 0.12), ("refrag+lexical48t", 118.0, 0.11), ("extractive+lexical10%", 98.0, 0.2),
        ("refrag@8+similarity2.5%", 300.0, 0.1)]]
    series = qa_series(rows)
    assert series["refrag+lexical"] == [(115.0, 0.12), (118.0, 0.11), (190.0, 0.12)]  # sorted by positions
    assert series["full"] == [(464.0, 0.16)] and series["refrag"] == [(74.0, 0.03)]
    assert series["extractive+lexical"] == [(98.0, 0.2)] and series["refrag@8+similarity"] == [(300.0, 0.1)]
    path = plot_qa_positions(rows, tmp_path / "q.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
