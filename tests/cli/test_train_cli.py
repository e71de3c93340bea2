import json

from conftest import tiny_refrag
from typer.testing import CliRunner

from refrag import checkpoint
from refrag.checkpoint import CheckpointManifest
from refrag.cli import app
from refrag.errors import CheckpointError, InputError

runner = CliRunner()
TINY = ["--steps", "2", "--batch-size", "2", "--micro-batch-size", "1", "--max-chunks", "2", "--eval-every", "2",
        "--save-every", "2", "--no-bf16"]


def test_the_three_stages_run_in_order_from_the_cli(tmp_path):
    base = checkpoint.save(tiny_refrag("llama", k=4), tmp_path / "tiny", save_encoder=True, save_decoder=True)
    text = tmp_path / "train.txt"
    text.write_text("The quick brown fox jumps over the lazy dog near the river bank. " * 200)
    data = ["--data", str(text)]
    stages = [("reconstruct", base), ("cpt", tmp_path / "reconstruct" / "final"), ("mixed", tmp_path / "cpt" / "final")]
    for stage, init in stages:
        extra = ["--continuation-tokens", "8", "--distill", "0.5"] if stage != "reconstruct" else []
        result = runner.invoke(app, ["train", stage, "--init", str(init), "--out", str(tmp_path / stage),
                                     *data, *TINY, *extra])
        assert result.exit_code == 0, result.output
        assert CheckpointManifest.read(tmp_path / stage / "final").stage == stage
    # skipping a stage is refused with the fix in the message
    result = runner.invoke(app, ["train", "mixed", "--init", str(tmp_path / "reconstruct" / "final"),
                                 "--out", str(tmp_path / "bad"), *data, *TINY, "--continuation-tokens", "8"])
    assert isinstance(result.exception, CheckpointError) and "run `refrag train cpt` first" in str(result.exception)
    assert not (tmp_path / "bad" / "final").exists()
    # the policy stage trains on the last stage's checkpoint; the policy ships in its output and answers `learned`
    result = runner.invoke(app, ["train", "policy", "--init", str(tmp_path / "mixed" / "final"), "--out",
                                 str(tmp_path / "policy"), *data, "--steps", "2", "--batch-size", "2", "--no-bf16",
                                 "--context-chunks", "4", "--continuation-tokens", "4", "--group", "2",
                                 "--hidden", "16", "--layers", "1"])
    assert result.exit_code == 0, result.output
    assert "learned (greedy) selection of 25%" in result.output and "random selection" in result.output
    trained = checkpoint.load(tmp_path / "policy" / "final", dtype="float32")
    assert trained.policy_network is not None and trained.has_adapter == checkpoint.load(
        tmp_path / "mixed" / "final", dtype="float32").has_adapter
    result = runner.invoke(app, ["train", "policy", "--init", str(base), "--out", str(tmp_path / "p2"), *data,
                                 "--steps", "2"])
    assert isinstance(result.exception, CheckpointError)
    # the QA reward on `refrag data qa` rows: a query-conditioned policy, scored against random and lexical
    rows = tmp_path / "rows.jsonl"
    passages = ["The quick brown fox jumps over the lazy dog near the river bank.", "A red kite flies high above."]
    rows.write_text("".join(json.dumps({"question": f"what jumps over the dog {i}?", "answer": "the fox",
                                        "passages": passages, "gold": 0}) + "\n" for i in range(6)))
    qa = ["train", "policy", "--init", str(tmp_path / "mixed" / "final"), "--out", str(tmp_path / "pqa"),
          "--steps", "2", "--batch-size", "2", "--no-bf16", "--group", "2", "--hidden", "16", "--layers", "1",
          "--eval-examples", "2", "--task", "qa"]
    result = runner.invoke(app, [*qa, "--qa-data", str(rows)])
    assert result.exit_code == 0, result.output
    assert "held-out answer, lexical selection of 25%" in result.output
    assert checkpoint.load(tmp_path / "pqa" / "final", dtype="float32").policy_network.config.query
    result = runner.invoke(app, qa)  # no rows
    assert isinstance(result.exception, InputError) and "--qa-data" in str(result.exception)


def test_sft_refuses_an_init_with_read_text_and_an_unknown_read(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("")
    result = runner.invoke(app, ["train", "sft", "--read", "text", "--init", str(tmp_path), "--data", str(rows),
                                 "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, InputError) and "leave out --init" in str(result.exception)
    result = runner.invoke(app, ["train", "sft", "--read", "pixels", "--data", str(rows), "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, InputError) and "--read" in str(result.exception)
    assert not (tmp_path / "o").exists()
