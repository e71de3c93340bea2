"""`refrag index build|add`, `refrag search`, `refrag ask` end to end on a saved tiny checkpoint."""

from __future__ import annotations

import json
import re

import pytest
import torch
import typer
from conftest import tiny_refrag
from index_helpers import corpus, retrieval_spec  # noqa: F401
from typer.testing import CliRunner

from refrag import checkpoint
from refrag.cli import ask as ask_cli
from refrag.cli import index as cli
from refrag.cli.common import ModelChoice
from refrag.config import DEFAULT_POLICY
from refrag.errors import CheckpointError, InputError
from refrag.index import Index


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(cli.app, name="index")
    app.command("search")(ask_cli.search_cmd)
    app.command("ask")(ask_cli.ask_cmd)
    return app


def run(app, *args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def test_build_add_search_ask(app, corpus, tmp_path, retrieval_spec):
    ckpt = checkpoint.save(tiny_refrag("llama", k=4), tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    idx = tmp_path / "idx"
    built = json.loads(run(app, "index", "build", corpus, "--out", idx, "--model", ckpt, "--retrieval-encoder",
                           retrieval_spec, "--passage-tokens", 16, "--json"))
    assert built["passages"] > 0 and built["chunks"] >= built["passages"]
    extra = tmp_path / "extra.md"
    extra.write_text("# Extra\n\nThe lazy dog sleeps by the sea.", "utf-8")
    added = json.loads(run(app, "index", "add", idx, extra, "--model", ckpt, "--json"))
    assert added["passages"] >= 1
    hits = json.loads(run(app, "search", idx, "The lazy dog sleeps by the sea.", "--top-k", 2, "--json"))
    assert hits[0]["title"] == "Extra" and len(hits) == 2
    out = json.loads(run(app, "ask", idx, "Where does the dog sleep?", "--model", ckpt, "--mode", "refrag",
                         "--max-new-tokens", 2, "--top-k", 3, "--policy", "none", "--json"))
    assert [a["mode"] for a in out["answers"]] == ["refrag"] and len(out["sources"]) == 3
    assert out["answers"][0]["ttft_s"] > 0 and out["ttft_ratio"] is None
    text = run(app, "ask", idx, "Where does the dog sleep?", "--model", ckpt, "--mode", "both",
               "--max-new-tokens", 2)
    assert "[full]" in text and "[refrag]" in text and "TTFT full / refrag" in text and "[1]" in text
    assert f"raw chunks ({DEFAULT_POLICY}): " in text  # the default policy, 10% of the chunks raw
    plain = run(app, "ask", idx, "Where does the dog sleep?", "--model", ckpt, "--policy", "none", "--max-new-tokens", 2)
    assert "raw chunks (none): none (every chunk compressed)" in plain
    raw = json.loads(run(app, "ask", idx, "Where does the dog sleep?", "--model", ckpt, "--policy", "lexical",
                         "--expand-tokens", 8, "--max-new-tokens", 2, "--top-k", 3, "--json"))["answers"][0]
    assert raw["policy"] == "lexical" and raw["expanded_chunks"] and raw["timings"]["policy_s"] > 0
    assert raw["decoder_positions"] > out["answers"][0]["decoder_positions"]
    questions, answers = tmp_path / "q.jsonl", tmp_path / "answers.jsonl"
    questions.write_text('{"question": "Where does the dog sleep?"}\n{"question": "What jumps?"}\n')
    batch = ["ask", idx, "--questions", questions, "--out", answers, "--model", ckpt, "--max-new-tokens", 2, "--json"]
    assert json.loads(run(app, *batch))["answered"] == 2 and len(answers.read_text().splitlines()) == 2
    again = json.loads(run(app, *batch))  # a rerun answers nothing twice
    assert again["answered"] == 0 and again["already"] == 2 and len(answers.read_text().splitlines()) == 2


def test_a_refined_index_is_built_and_asked(app, corpus, tmp_path, retrieval_spec):
    ckpt = checkpoint.save(tiny_refrag("llama", k=4), tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    idx = tmp_path / "idx"
    built = json.loads(run(app, "index", "build", corpus, "--out", idx, "--model", ckpt, "--retrieval-encoder",
                           retrieval_spec, "--passage-tokens", 16, "--refine-steps", 2, "--json"))
    assert built["refine_s"] > 0 and Index.open(idx).manifest.refine["steps"] == 2
    out = json.loads(run(app, "ask", idx, "Where does the dog sleep?", "--model", ckpt, "--mode", "refrag",
                         "--max-new-tokens", 2, "--policy", "none", "--json"))
    assert out["answers"][0]["mode"] == "refrag"
    bad = CliRunner().invoke(app, ["index", "build", str(corpus), "--out", str(tmp_path / "bad"), "--refine-steps",
                                   "-1"])
    assert bad.exit_code == 2 and "--refine-steps" in bad.output and not (tmp_path / "bad").exists()


def test_ask_with_another_k_is_refused(app, corpus, tmp_path, retrieval_spec):
    ckpt = checkpoint.save(tiny_refrag("llama", k=4), tmp_path / "ckpt4", save_encoder=True, save_decoder=True)
    other = checkpoint.save(tiny_refrag("llama", k=8), tmp_path / "ckpt8", save_encoder=True, save_decoder=True)
    idx = tmp_path / "idx"
    run(app, "index", "build", corpus, "--out", idx, "--model", ckpt, "--retrieval-encoder", retrieval_spec,
        "--passage-tokens", 16, "--json")
    with pytest.raises(CheckpointError, match="rebuild the index"):
        run(app, "ask", idx, "Where?", "--model", other, "--json")


def test_ask_finds_the_checkpoint_the_index_was_built_from(app, corpus, tmp_path, retrieval_spec):
    saved = tiny_refrag("llama", k=4)
    ckpt = checkpoint.save(saved, tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    idx = tmp_path / "idx"
    run(app, "index", "build", corpus, "--out", idx, "--model", ckpt, "--retrieval-encoder", retrieval_spec,
        "--passage-tokens", 16, "--json")
    loaded = ModelChoice(dtype="float32").for_index(Index.open(idx)).load(progress=False)  # what `ask` uses
    torch.testing.assert_close(loaded.projector.fc1.weight, saved.projector.fc1.weight)  # trained, not fresh


def test_build_refuses_a_users_folder_before_loading_any_model(app, corpus, tmp_path, monkeypatch):
    from refrag.errors import InputError

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.md").write_text("keep me")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(ModelChoice, "load", no_model)
    with pytest.raises(InputError, match="not a refrag index"):
        run(app, "index", "build", corpus, "--out", mine)
    with pytest.raises(InputError, match="does not exist"):
        run(app, "index", "build", tmp_path / "missing", "--out", tmp_path / "new")
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "index.json").write_text("{}")  # ask checks its arguments before it even reads the index
    with pytest.raises(InputError, match="question is empty"):
        run(app, "ask", idx, "  ")
    with pytest.raises(InputError, match="top_k must be a positive"):
        run(app, "ask", idx, "Where?", "--top-k", 0)
    assert (mine / "todo.md").read_text() == "keep me"


def test_index_check_says_ok_or_lists_every_problem(app, corpus, tmp_path, retrieval_spec):
    ckpt = checkpoint.save(tiny_refrag("llama", k=4), tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    idx = tmp_path / "idx"
    run(app, "index", "build", corpus, "--out", idx, "--model", ckpt, "--retrieval-encoder", retrieval_spec,
        "--passage-tokens", 16, "--json")
    assert run(app, "index", "check", idx).strip().endswith("ok")
    again = run(app, "index", "add", idx, corpus, "--model", ckpt)
    assert "+0 passages" in again and "skipped" in again and "already in the index" in again
    meta = next(idx.glob("*.jsonl"))
    meta.write_bytes(meta.read_bytes()[:-1] + b"x")  # same size, other bytes
    (idx / "vectors.faiss").write_bytes(b"")
    result = CliRunner().invoke(app, ["index", "check", str(idx), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert not report["ok"] and len(report["problems"]) >= 3  # the shard's sha256, the faiss file's size, faiss
    assert any(meta.name in p and "damaged" in p for p in report["problems"])


def test_index_remove_and_update_commands(app, corpus, tmp_path, retrieval_spec):
    ckpt = checkpoint.save(tiny_refrag("llama", k=4), tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    idx = tmp_path / "idx"
    built = json.loads(run(app, "index", "build", corpus, "--out", idx, "--model", ckpt, "--retrieval-encoder",
                           retrieval_spec, "--passage-tokens", 16, "--json"))
    removed = json.loads(run(app, "index", "remove", idx, corpus / "numbers.txt", "--json"))
    assert removed["removed"] >= 1
    (corpus / "numbers.txt").write_text("Letters: a b c.", "utf-8")
    text = run(app, "index", "update", idx, corpus / "numbers.txt", corpus / "docs.jsonl", "--model", ckpt)
    assert re.search(r"\+[1-9]\d* passages, -[1-9]\d* removed", text)  # docs.jsonl out and in again, numbers in
    assert json.loads(run(app, "index", "check", idx, "--json"))["passages"] == built["passages"] - \
        removed["removed"] + 1


def test_threads_is_applied_before_the_model_loads(app, corpus, tmp_path, retrieval_spec, monkeypatch):
    ckpt = checkpoint.save(tiny_refrag("llama", k=4), tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # so that 1 is a change on any machine
    try:
        run(app, "index", "build", corpus, "--out", tmp_path / "idx", "--model", ckpt, "--retrieval-encoder",
            retrieval_spec, "--passage-tokens", 16, "--threads", 1, "--json")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded despite a bad --threads")

    monkeypatch.setattr("refrag.checkpoint.load_model", no_model)
    with pytest.raises(InputError, match="--threads must be >= 1"):
        run(app, "index", "add", tmp_path / "idx", corpus, "--model", ckpt, "--threads", 0)


def test_ask_max_positions_reports_what_it_dropped(app, corpus, tmp_path, retrieval_spec):
    from refrag.generation import prompt_positions
    from refrag.pipeline import Pipeline

    ckpt = checkpoint.save(tiny_refrag("llama", k=4), tmp_path / "ckpt", save_encoder=True, save_decoder=True)
    idx = tmp_path / "idx"
    run(app, "index", "build", corpus, "--out", idx, "--model", ckpt, "--retrieval-encoder", retrieval_spec,
        "--passage-tokens", 16, "--json")
    pipe = ModelChoice(str(ckpt)).pipeline(idx, progress=False)
    assert isinstance(pipe, Pipeline)
    best = pipe.retrieve("What jumps?", top_k=1).request
    cap = prompt_positions(pipe.model, best)
    out = json.loads(run(app, "ask", idx, "What jumps?", "--model", ckpt, "--top-k", 3, "--max-positions", cap,
                         "--max-new-tokens", 1, "--policy", "none", "--json"))
    answer = out["answers"][0]
    assert len(answer["dropped_to_fit"]) == 2 and answer["decoder_positions"] <= cap
    text = run(app, "ask", idx, "What jumps?", "--model", ckpt, "--top-k", 3, "--max-positions", cap,
               "--max-new-tokens", 1, "--policy", "none")
    assert text.count(f"dropped in refrag mode to fit --max-positions {cap}") == 2
