import subprocess
from pathlib import Path

import pytest

from refrag.errors import InputError
from refrag.eval.suite import SUITES, run_suite, suite_commands


def _fake(calls, fail_on=()):
    """Stands in for the child `refrag` process: records argv, writes the step's outputs, fails on request."""

    def run(argv):
        calls.append(argv)
        args = argv[3:]  # after python -m refrag.cli
        if any(word in args for word in fail_on):
            return subprocess.CompletedProcess(argv, 2, stdout="")
        if "--out" in args:
            out = args[args.index("--out") + 1]
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "summary.json").write_text("{}")
        return subprocess.CompletedProcess(argv, 0, stdout='{"rows": []}')

    return run


def test_suite_runs_every_step_then_resumes_without_rerunning(tmp_path):
    results, calls = tmp_path / "r", []
    assert run_suite("quick", results, tmp_path, model="ckpt", runner=_fake(calls)) == []
    assert len(calls) == len(SUITES["quick"])
    assert all(c[-2:] == ["--model", "ckpt"] for c in calls)
    assert (results / "ttft.json").read_text() == '{"rows": []}'  # stdout of bench saved as its output
    commands = (results / "commands.txt").read_text().splitlines()
    assert commands[0].startswith("refrag eval perplexity --data ") and "--limit 24" in commands[0]
    run_suite("quick", results, tmp_path, model="ckpt", runner=_fake(calls))
    assert len(calls) == len(SUITES["quick"])  # nothing ran twice


def test_a_failed_step_is_reported_and_the_rest_still_runs(tmp_path):
    results, calls = tmp_path / "r", []
    failures = run_suite("quick", results, tmp_path, runner=_fake(calls, fail_on=("llmlingua",)))
    assert len(failures) == 1 and "llmlingua" in failures[0]
    assert "llmlingua" in (results / "failures.md").read_text()
    assert (results / "ttft.json").exists() and len(calls) == len(SUITES["quick"])
    assert run_suite("quick", results, tmp_path, runner=_fake(calls)) == []  # retried; now passes
    assert not (results / "failures.md").exists()


def test_paper_suite_meets_the_protocol_sizes(tmp_path):
    args = [" ".join(a) for _, a in suite_commands("paper", tmp_path / "r", tmp_path, None)]
    assert "--s 512 --o 128" in args[0] and "--limit 200" in args[0]
    assert "--limit 300" in args[1] and "full,refrag,refrag@8" in args[1]
    assert "512,1024,2048,4096,8000" in args[-1]


def test_bad_suite_or_data_folder(tmp_path):
    with pytest.raises(InputError, match="unknown suite"):
        suite_commands("nope", tmp_path, tmp_path, None)
    with pytest.raises(InputError, match="data folder not found"):
        suite_commands("quick", tmp_path, tmp_path / "missing", None)


@pytest.mark.parametrize("name", sorted(SUITES))
def test_every_step_parses_as_a_refrag_command(name, tmp_path):
    """The suites' argument lists are valid for the real CLI (flags exist, values have the right types)."""
    import typer
    from typer.core import TyperGroup

    from refrag.cli import app

    for _, args in suite_commands(name, tmp_path / "r", tmp_path, "ckpt"):
        command, rest = typer.main.get_command(app), list(args)
        while isinstance(command, TyperGroup):
            command = command.get_command(command.context_class(command), rest.pop(0))
            assert command is not None, args
        assert not rest or rest[0].startswith("-"), args
        command.make_context("refrag", rest)  # raises a UsageError on an unknown or malformed option
