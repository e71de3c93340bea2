import json

import pytest
from conftest import tiny_refrag
from typer.testing import CliRunner

from refrag.checkpoint import save
from refrag.cli import app
from refrag.config import DEFAULT_POLICY

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save(tiny_refrag("llama", k=4), tmp_path_factory.mktemp("ckpt") / "tiny", save_decoder=True)


@pytest.fixture()
def context(tmp_path):
    path = tmp_path / "ctx.txt"
    path.write_text("Paris is the capital of France. The quick brown fox jumps over the lazy dog. " * 3)
    return path


@pytest.mark.parametrize("mode", ["full", "refrag"])
def test_generate_json(checkpoint, context, mode):
    result = runner.invoke(app, ["generate", "-c", str(context), "-q", "What is the capital?", "--mode", mode,
                                 "--model", str(checkpoint), "--dtype", "float32", "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["mode"] == mode and data["timings"]["ttft_s"] > 0
    assert data["compression"] == (1.0 if mode == "full" else pytest.approx(data["context_tokens"] / data["context_positions"]))
    if mode == "refrag":
        assert data["policy"] == DEFAULT_POLICY and data["expanded_chunks"]  # the default: 10% of the chunks raw
        plain = runner.invoke(app, ["generate", "-c", str(context), "-q", "What is the capital?", "--policy", "none",
                                    "--model", str(checkpoint), "--dtype", "float32", "--max-new-tokens", "2", "--json"])
        assert json.loads(plain.stdout)["compression"] > 3 > data["compression"]


def test_generate_streams_text_and_reports_timings(checkpoint, context):
    result = runner.invoke(app, ["generate", "-c", str(context), "-q", "What is the capital?", "--model",
                                 str(checkpoint), "--dtype", "float32", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "TTFT" in result.output and "positions" in result.output


def test_bad_inputs_exit_with_a_clear_message(checkpoint, context, tmp_path):
    binary = tmp_path / "bin.dat"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    cases = [
        (["-c", str(tmp_path / "missing.txt"), "-q", "q?"], "not found"),
        (["-c", str(binary), "-q", "q?"], "not UTF-8"),
        (["-c", str(context), "-q", "  "], "question is empty"),
        (["-c", str(context), "-q", "q?", "--mode", "zip"], "mode must be"),
        (["-c", str(context), "-q", "q?", "--expand-fraction", "2"], "expand_fraction"),
        (["-c", str(context), "-q", "q?", "--policy", "best"], "policy must be one of"),
        (["-c", str(context), "-q", "q?", "--expand-fraction", "0.2", "--expand-tokens", "8"], "not both"),
        (["-c", str(context), "-q", "q?", "--k", "16"], "--k 16 (the checkpoint has 4)"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["generate", *args, "--model", str(checkpoint), "--dtype", "float32"])
        assert result.exit_code != 0
        assert message in str(result.exception), (args, result.exception)


def test_unknown_model_name_is_a_clear_error(context):
    result = runner.invoke(app, ["generate", "-c", str(context), "-q", "q?", "--decoder", "no-such-model"])
    assert result.exit_code != 0 and "unknown model" in str(result.exception)


def test_main_prints_one_line_errors(capsys, monkeypatch, context):
    from refrag.cli import main

    monkeypatch.setattr("sys.argv", ["refrag", "generate", "-c", str(context), "-q", "q?", "--decoder", "nope"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "error: unknown model: 'nope'" in capsys.readouterr().err


def test_every_model_command_takes_the_same_model_options():
    """The model-selection flags are one declaration: every command that loads a model offers all of them."""
    import click
    import typer

    root = typer.main.get_command(app)
    ctx = click.Context(root)
    paths = [("generate",), ("ask",), ("bench", "ttft"), ("bench", "index"), ("eval", "qa"),
             ("eval", "reconstruction"), ("index", "build"), ("index", "add")]
    for path in paths:
        command = root
        for name in path:
            command = command.get_command(ctx, name)  # type: ignore[union-attr]
        flags = {opt for p in command.params for opt in p.opts}
        assert {"--model", "--decoder", "--encoder", "--k", "--dtype"} <= flags, path


def test_answer_commands_run_the_answer_adapter_and_text_measurements_do_not():
    """--answer-adapter defaults: on where refrag mode answers questions, off where the compressor is measured on
    text (the perplexity protocol and reconstruction read the compressor alone)."""
    import click
    import typer

    root = typer.main.get_command(app)
    ctx = click.Context(root)
    expected = {("generate",): True, ("ask",): True, ("serve",): True, ("bench", "ttft"): True, ("eval", "qa"): True,
                ("eval", "perplexity"): False, ("eval", "reconstruction"): False}
    for path, default in expected.items():
        command = root
        for name in path:
            command = command.get_command(ctx, name)  # type: ignore[union-attr]
        [param] = [p for p in command.params if p.name == "answer_adapter"]
        assert param.default is default, path
        assert "--no-answer-adapter" in param.secondary_opts, path
