"""Corpus reading: file discovery, jsonl rows, encodings."""

from __future__ import annotations

import json

import pytest

from refrag.errors import InputError
from refrag.index.ingest import find_files, iter_documents


def test_folders_are_searched_recursively(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.txt", "a/b/y.md", "a/b/z.jsonl", "a/skip.png"):
        (tmp_path / name).write_text("", "utf-8")
    assert [p.name for p in find_files([tmp_path])] == ["y.md", "z.jsonl", "x.txt"]  # sorted paths
    with pytest.raises(InputError, match="does not exist"):
        find_files([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .txt"):
        find_files([tmp_path / "empty"])


def test_jsonl_rows_keep_title_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join([json.dumps({"title": "T", "text": "hello"}), "", json.dumps({"text": "  "}),
                               json.dumps({"text": "world"})]), "utf-8")
    docs = list(iter_documents([path]))
    assert [(d.text, d.title, d.line) for d in docs] == [("hello", "T", 1), ("world", "", 4)]


@pytest.mark.parametrize("line, match", [("{not json", "c.jsonl:1 is not valid JSON"),
                                         ('{"body": "x"}', 'c.jsonl:1 needs a string "text"')])
def test_bad_jsonl_rows_name_the_line(tmp_path, line, match):
    path = tmp_path / "c.jsonl"
    path.write_text(line, "utf-8")
    with pytest.raises(InputError, match=match):
        list(iter_documents([path]))


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello".encode("utf-8"))
    assert next(iter_documents([path])).text == "hello"


def test_refrags_own_output_inside_a_source_folder_is_never_read(tmp_path):
    from refrag.index.ingest import find_files

    (tmp_path / "a.txt").write_text("a document")
    index = tmp_path / "my-index"
    (index / "passages").mkdir(parents=True)
    (index / "index.json").write_text("{}")
    (index / "passages" / "shard-0.jsonl").write_text('{"text": "a passage"}\n')
    (tmp_path / ".my-index.tmp-abc").mkdir()
    (tmp_path / ".my-index.tmp-abc" / "half.jsonl").write_text("{}\n")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "refrag.json").write_text("{}")
    (tmp_path / "ckpt" / "notes.txt").write_text("x")
    assert find_files([tmp_path]) == [tmp_path / "a.txt"]
