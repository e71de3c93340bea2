"""The README's examples run: its Python blocks execute (on a tiny model), and every `refrag ...` command line it
shows names a real command with flags that command accepts. Docs cannot rot silently."""

import re
import shlex
from pathlib import Path

import pytest
import typer
from conftest import tiny_refrag

from refrag.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_the_python_examples_run(tmp_path, monkeypatch):
    code = blocks("python")
    assert code, "the README has a Python example"
    model = tiny_refrag("llama", k=4)
    monkeypatch.setattr("refrag.checkpoint.load_model", lambda *a, **kw: model)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "doc.txt").write_text("Herman Melville wrote Moby-Dick in 1851. " * 8, encoding="utf-8")
    for block in code:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})  # noqa: S102 (our own README)


def command_lines() -> list[list[str]]:
    lines = []
    for block in blocks("bash"):
        for line in block.splitlines():
            for part in line.split("#")[0].split("&&"):
                words = shlex.split(part)
                if words[:1] == ["refrag"]:
                    lines.append(words[1:])
    return lines


@pytest.mark.parametrize("words", command_lines(), ids=lambda w: " ".join(w[:2]))
def test_every_command_line_names_a_real_command_and_its_flags(words):
    command = typer.main.get_command(app)
    path = []
    while hasattr(command, "commands") and words and not words[0].startswith("-"):
        name = words.pop(0)
        assert name in command.commands, f"`refrag {' '.join(path)} {name}` is not a command"
        command, path = command.commands[name], [*path, name]
    flags = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    for word in words:
        if word.startswith("--"):
            assert word.split("=")[0] in flags, f"`refrag {' '.join(path)}` has no option {word}"
