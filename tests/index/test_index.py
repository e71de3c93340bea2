"""Index build / open / add / search / passages, crash safety and bad inputs, on tiny random models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_refrag
from index_helpers import DOCS, build, corpus, options, retrieval_spec, rmodel, write_corpus  # noqa: F401

from refrag.errors import CheckpointError, InputError
from refrag.index import Index
from refrag.index.check import check_index
from refrag.refine import RefineOptions, refine_encodings


def test_build_search_roundtrip(corpus, tmp_path, rmodel, options):
    index = build(corpus, tmp_path, rmodel, options)
    assert len(index) == index.stats.passages > len(DOCS)  # passages of <= 16 tokens: several per document
    assert len(index.manifest.shards) > 1  # 4 passages per shard: ids cross shard boundaries
    for pid in range(len(index)):
        hit = index.search(index.meta(pid).text, top_k=1)[0]
        assert hit.id == pid and hit.score == pytest.approx(1.0, abs=1e-2)  # bf16 retrieval encoder
        passage = index.passage(pid, rmodel.tokenizer)
        assert 0 < passage.num_tokens <= options.passage_tokens
        stored = index.encoded(pid)  # [L, E]
        fresh = rmodel.encode_chunks([c.text for c in passage.chunks])
        assert stored.shape == fresh.shape == (len(passage.chunks), rmodel.encoder.hidden_size)
        torch.testing.assert_close(stored.float(), fresh.float(), atol=2e-2, rtol=2e-2)
    metas = [index.meta(i) for i in range(len(index))]
    assert {Path(m.source).name for m in metas} == {"docs.jsonl", "numbers.txt", "mountains.md"}
    fox = next(m for m in metas if m.title == "Fox")
    assert fox.line == 2 and fox.text in DOCS[1][1]
    assert next(m for m in metas if m.source.endswith(".md")).title == "Mountains"
    second = [m for m in metas if m.title == "Paris"][1]
    assert DOCS[0][1][second.offset :].startswith(second.text[:10])  # offset points into the document


def test_open_and_add(corpus, tmp_path, rmodel, options):
    index = build(corpus, tmp_path, rmodel, options)
    before = [index.meta(i) for i in range(len(index))]
    extra = tmp_path / "extra.txt"
    extra.write_text("Question answer context passage chunk token vector encoder decoder projector.", "utf-8")
    stats = index.add([extra], rmodel, progress=False)
    reopened = Index.open(tmp_path / "idx")
    assert len(reopened) == len(index) == len(before) + stats.passages
    assert [reopened.meta(i) for i in range(len(before))] == before  # old ids unchanged
    new_id = len(before)
    assert reopened.search(reopened.meta(new_id).text, 1)[0].id == new_id
    assert len(reopened.manifest.builds) == 2


def test_bad_inputs(corpus, tmp_path, rmodel, options):
    index = build(corpus, tmp_path, rmodel, options)
    with pytest.raises(InputError, match="empty"):
        index.search("   ")
    assert len(index.search("fox", top_k=1000)) == len(index)  # top-k larger than the corpus
    with pytest.raises(InputError, match="top_k"):
        index.search("fox", top_k=0)
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("  \n\n ", "utf-8")
    with pytest.raises(InputError, match="empty"):
        Index.build(blank, tmp_path / "other", rmodel, options, progress=False)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x89PNG\x00\x00\x01")
    with pytest.raises(InputError, match="bin.txt.*binary"):
        Index.build(binary, tmp_path / "other", rmodel, options, progress=False)
    latin = tmp_path / "latin.md"
    latin.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(InputError, match="latin.md is not valid UTF-8"):
        Index.build(latin, tmp_path / "other", rmodel, options, progress=False)
    with pytest.raises(InputError, match="unsupported"):
        Index.build(tmp_path / "idx" / "index.json", tmp_path / "other", rmodel, options, progress=False)
    assert not (tmp_path / "other").exists()


def test_model_mismatch_is_an_error(corpus, tmp_path, rmodel, options):
    index = build(corpus, tmp_path, rmodel, options)
    index.check_model(tiny_refrag("llama", k=4))  # same weights, same k: accepted
    with pytest.raises(CheckpointError, match="k: index 4 vs model 8"):
        index.check_model(tiny_refrag("llama", k=8))
    other = tiny_refrag("llama", k=4)
    with torch.no_grad():
        other.encoder.model.embeddings.word_embeddings.weight.mul_(1.5)  # a retrained chunk encoder
    with pytest.raises(CheckpointError, match="chunk_encoder_sha256.*rebuild the index"):
        index.add(corpus, other, progress=False)


def test_failed_add_leaves_index_intact(corpus, tmp_path, rmodel, options):
    index = build(corpus, tmp_path, rmodel, options)
    n = len(index)
    bad = tmp_path / "bad"
    write_corpus(bad)
    (bad / "zz.txt").write_bytes(b"\x00\x01binary")  # read after the good files: fails mid-add
    with pytest.raises(InputError, match="zz.txt"):
        index.add(bad, rmodel, progress=False)
    assert len(Index.open(tmp_path / "idx")) == len(index) == n
    assert len(index.search("fox", 100)) == n
    assert not list(tmp_path.glob(".idx.tmp-*"))


KILLED_BUILD = """
import sys, torch
sys.path[:0] = [{tests!r}, {index_tests!r}]
from conftest import tiny_refrag
from refrag.index import Index, IndexOptions
opts = IndexOptions(passage_tokens=16, retrieval_encoder={retrieval!r}, batch_passages=2)
model = tiny_refrag("llama", k=4)
encode = model.encode_chunks
def slow(texts, *a, **kw):  # so the kill lands mid-build
    import time; time.sleep(0.2); return encode(texts, *a, **kw)
model.encode_chunks = slow
Index.build({corpus!r}, {out!r}, model, opts, progress=False)
"""


def test_killed_build_leaves_old_index_loadable(corpus, tmp_path, rmodel, options, retrieval_spec):
    index = build(corpus, tmp_path, rmodel, options)
    n = len(index)
    big = tmp_path / "big.txt"
    big.write_text(" ".join(text for _, text in DOCS) * 30, "utf-8")
    tests = Path(__file__).resolve().parent
    script = KILLED_BUILD.format(tests=str(tests.parent), index_tests=str(tests), retrieval=retrieval_spec,
                                 corpus=str(big), out=str(tmp_path / "idx"))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)])
    deadline = time.time() + 60
    while not list(tmp_path.glob(".idx.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".idx.tmp-*"))  # the half-written build is left aside ...
    reopened = Index.open(tmp_path / "idx")  # ... and the old index is intact
    assert len(reopened) == n and reopened.search(reopened.meta(0).text, 1)[0].id == 0
    rebuilt = Index.build(corpus, tmp_path / "idx", rmodel, options, progress=False)  # a rerun restarts cleanly
    assert len(rebuilt) == n and not list(tmp_path.glob(".idx.tmp-*"))


@pytest.mark.parametrize("damage", ["faiss", "meta-truncated", "meta-garbled"])
def test_damaged_index_files_are_clear_errors(corpus, tmp_path, rmodel, options, damage):
    index = build(corpus, tmp_path, rmodel, options)
    folder = index.path
    if damage == "faiss":
        target = next(folder.rglob("*.faiss"))
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target = min(folder.glob("*.jsonl"))
        data = target.read_bytes()
        target.write_bytes(data[:-10] if damage == "meta-truncated" else data[:5] + b"\xff{" + data[7:])
    with pytest.raises(CheckpointError, match="(?i)rebuild the index"):
        reopened = Index.open(folder)
        for i in range(len(reopened)):
            reopened.meta(i)
    report = check_index(folder, progress=False)
    assert not report.ok and any(target.name in p for p in report.problems)


def test_a_sound_index_passes_the_full_check(corpus, tmp_path, rmodel, options):
    index = build(corpus, tmp_path, rmodel, options)
    report = check_index(index.path, progress=False)
    assert report.ok, report.problems
    assert report.passages == len(index) and report.files_checked == 2 * len(index.manifest.shards) + 1


def test_nan_vectors_of_the_same_size_are_found_by_the_check(corpus, tmp_path, rmodel, options):
    index = build(corpus, tmp_path, rmodel, options)
    shard = index.path / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    begin, _ = json.loads(data[8:header])["chunks"]["data_offsets"]
    data[header + begin : header + begin + 4] = b"\xc0\x7f\xc0\x7f"  # two bf16 NaNs in the first chunk row
    shard.write_bytes(bytes(data))
    Index.open(index.path)  # same sizes, sound structure: opening does not read every vector
    problems = check_index(index.path, progress=False).problems
    assert any("1 of" in p and "not finite" in p for p in problems)
    assert any("shard-00000.safetensors is damaged" in p for p in problems)


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m["model"].update(k="4"), r"field model\.k: expected int"),
    (lambda m: m["shards"][0].update(passages=None), r"field shards\[0\]\.passages: expected int"),
    (lambda m: m.pop("chunk_dim"), r"field chunk_dim: missing"),
    (lambda m: m["model"].update(k=8), r"chunk counts are not ceil\(tokens / 8\)"),
    (lambda m: m.update(chunk_dim=m["chunk_dim"] + 1), r"wide chunk rows"),
    (lambda m: m["shards"][1].update(chunks=m["shards"][1]["chunks"] + 1), r"chunk rows, the manifest says"),
])
def test_a_manifest_that_contradicts_its_files_is_refused(corpus, tmp_path, rmodel, options, change, message):
    index = build(corpus, tmp_path, rmodel, options)
    raw = json.loads((index.path / "index.json").read_text())
    change(raw)
    (index.path / "index.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=message):
        Index.open(index.path)


def test_adding_what_is_already_there_adds_nothing(corpus, tmp_path, rmodel, options):
    index = build(corpus, tmp_path, rmodel, options)
    n = len(index)
    again = index.add([corpus], rmodel, progress=False)
    assert again.passages == 0 and again.skipped_duplicates == n and len(Index.open(index.path)) == n
    extra = tmp_path / "extra.txt"
    extra.write_text(DOCS[0][1], "utf-8")  # the same text from another file is another passage
    assert index.add([corpus / "numbers.txt", extra], rmodel, progress=False).passages >= 1
    assert index.stats.skipped_duplicates >= 1 and check_index(index.path, progress=False).ok


def test_remove_and_update_by_source(corpus, tmp_path, rmodel, options):
    index = build(corpus, tmp_path, rmodel, options)
    metas = [index.meta(i) for i in range(len(index))]
    numbers = [m for m in metas if m.source.endswith("numbers.txt")]
    stats = index.remove([corpus / "numbers.txt"], progress=False)
    reopened = Index.open(index.path)
    assert stats.removed == len(numbers) and len(reopened) == len(metas) - len(numbers)
    assert [reopened.meta(i) for i in range(len(reopened))] == [m for m in metas if m not in numbers]  # in order
    for pid in range(len(reopened)):  # ids, vectors and stored chunks still line up
        assert reopened.search(reopened.meta(pid).text, 1)[0].id == pid
    assert check_index(index.path, progress=False).ok
    (corpus / "numbers.txt").write_text("Numbers were replaced by letters: a b c d e f g.", "utf-8")
    updated = index.update([corpus / "numbers.txt"], rmodel, progress=False)
    assert updated.removed == 0 and updated.passages >= 1  # a file new to the index is simply added
    (corpus / "sub" / "mountains.md").write_text("# Hills\n\nHills are small mountains.", "utf-8")
    mountains = sum(m.source.endswith("mountains.md") for m in metas)
    changed = index.update([corpus / "sub"], rmodel, progress=False)  # a folder: every file under it
    assert changed.removed == mountains and changed.passages >= 1
    texts = [Index.open(index.path).meta(i).text for i in range(len(index))]
    assert any("Hills" in t for t in texts) and not any("clouds" in t for t in texts)
    assert check_index(index.path, progress=False).ok
    fresh = Index.build(corpus, tmp_path / "fresh", rmodel, options, progress=False)
    assert sorted(texts) == sorted(fresh.meta(i).text for i in range(len(fresh)))  # as if rebuilt
    (corpus / "numbers.txt").write_text("", "utf-8")
    emptied = index.update([corpus / "numbers.txt"], rmodel, progress=False)  # an emptied file: its passages out
    assert emptied.removed >= 1 and emptied.passages == 0
    with pytest.raises(InputError, match="nothing to remove"):
        index.remove([tmp_path / "elsewhere.txt"], progress=False)
    with pytest.raises(InputError, match="empty index"):
        index.remove([corpus], progress=False)


def _as_written_before_records(folder: Path) -> None:
    """Rewrite an index as refrag 0.8 wrote it: plain shard entries, no file records, no content_ids tensor,
    metadata lines without the resolved path."""
    from safetensors.torch import load_file, save_file

    manifest = json.loads((folder / "index.json").read_text())
    for entry in manifest["shards"]:
        tensors = load_file(str(folder / f"{entry['name']}.safetensors"))
        del tensors["content_ids"]
        lines = [json.dumps({k: v for k, v in json.loads(line).items() if k != "path"}).encode() + b"\n"
                 for line in (folder / f"{entry['name']}.jsonl").read_bytes().splitlines()]
        (folder / f"{entry['name']}.jsonl").write_bytes(b"".join(lines))
        tensors["meta_offsets"] = torch.tensor([0, *np.cumsum([len(b) for b in lines])], dtype=torch.int64)
        save_file(tensors, str(folder / f"{entry['name']}.safetensors"))
        entry.pop("files")
    manifest.pop("store_files")
    (folder / "index.json").write_text(json.dumps(manifest))


def test_an_index_written_before_file_records_still_opens_adds_and_removes(corpus, tmp_path, rmodel, options):
    index = build(corpus, tmp_path, rmodel, options)
    n = len(index)
    _as_written_before_records(index.path)
    old = Index.open(index.path)
    assert len(old) == n and old.meta(0).path == ""
    report = check_index(index.path, progress=False)
    assert report.ok and report.warnings and report.files_checked == 0
    assert old.add([corpus], rmodel, progress=False).skipped_duplicates == n  # identities computed from metadata
    assert old.remove([corpus / "numbers.txt"], progress=False).removed >= 1
    assert check_index(index.path, progress=False).ok


def test_sources_are_matched_by_absolute_path_from_any_folder(corpus, tmp_path, rmodel, options, monkeypatch):
    monkeypatch.chdir(corpus.parent)
    index = Index.build([Path(corpus.name)], tmp_path / "idx", rmodel, options, progress=False)  # a relative path
    assert not Path(index.meta(0).source).is_absolute() and Path(index.meta(0).path).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    removed = index.remove([corpus / "numbers.txt"], progress=False).removed
    assert removed >= 1
    assert index.add([corpus], rmodel, progress=False).passages == removed  # the rest is recognised, not re-added


def test_every_file_kind_of_an_index_is_checked_on_open(corpus, tmp_path, rmodel, options):
    index = build(corpus, tmp_path, rmodel, options)
    for target in sorted(p for p in index.path.iterdir() if p.suffix in (".safetensors", ".jsonl", ".faiss")):
        data = target.read_bytes()
        target.write_bytes(data[:-7])  # truncated
        with pytest.raises(CheckpointError, match=target.name.replace(".", r"\.")):
            Index.open(index.path)
        target.write_bytes(data)
    assert check_index(index.path, progress=False).ok


def test_a_refined_index_stores_refined_encodings_keyed_to_the_compressor(corpus, tmp_path, rmodel, options):
    refine = RefineOptions(steps=3)
    index = Index.build(corpus, tmp_path / "refined", rmodel, replace(options, refine=refine), progress=False)
    assert index.manifest.refine == refine.to_json() and index.stats.refine_s > 0
    assert Index.open(tmp_path / "refined").options.refine == refine  # add / update refine new passages alike
    several = [pid for pid in range(len(index)) if len(index.passage(pid, rmodel.tokenizer).chunks) > 1]
    assert several
    for pid in several:
        chunks = index.passage(pid, rmodel.tokenizer).chunks
        with torch.no_grad():
            expected = refine_encodings(rmodel, [chunks], rmodel.encode_chunks(chunks), refine)
        torch.testing.assert_close(index.encoded(pid).float(), expected.float(), atol=2e-2, rtol=2e-2)  # bf16
        assert not torch.allclose(index.encoded(pid).float(), rmodel.encode_chunks(chunks).float(), atol=2e-2)
    extra = tmp_path / "extra.txt"
    extra.write_text("Question answer context passage chunk token vector encoder decoder projector.", "utf-8")
    n = len(index)
    index.add([extra], rmodel, progress=False)
    added = [pid for pid in range(n, len(index)) if len(index.passage(pid, rmodel.tokenizer).chunks) > 1]
    assert added  # the new passages are refined with the index's own options
    for pid in added:
        chunks = index.passage(pid, rmodel.tokenizer).chunks
        with torch.no_grad():
            expected = refine_encodings(rmodel, [chunks], rmodel.encode_chunks(chunks), refine)
        torch.testing.assert_close(index.encoded(pid).float(), expected.float(), atol=2e-2, rtol=2e-2)
    other = tiny_refrag("llama", k=4)  # the same chunk encoder, another projector: unrefined indexes accept it
    with torch.no_grad():
        other.projector.gain.mul_(1.5)
    build(corpus, tmp_path / "plain", rmodel, options).check_model(other)
    with pytest.raises(CheckpointError, match="refined for another compressor"):
        index.check_model(other)


def test_an_index_manifest_without_refine_fields_opens_and_a_damaged_one_is_refused(corpus, tmp_path, rmodel,
                                                                                     options):
    index = build(corpus, tmp_path, rmodel, options)
    manifest = tmp_path / "idx" / "index.json"
    raw = json.loads(manifest.read_text())
    for key in ("refine", "refined_for"):  # as written before refinement existed
        del raw[key]
    manifest.write_text(json.dumps(raw))
    assert Index.open(tmp_path / "idx").options.refine is None and len(Index.open(tmp_path / "idx")) == len(index)
    manifest.write_text(json.dumps({**raw, "refine": {"steps": 10, "objective": "next-token"}}))
    with pytest.raises(CheckpointError, match="refine entry .* is not valid"):
        Index.open(tmp_path / "idx")
