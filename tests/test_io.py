import os

import pytest

from refrag.io import atomic_dir, write_json_atomic


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_written_files_and_folders_are_not_private(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d"):
            pass
        write_json_atomic(tmp_path / "d" / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "d" / "m.json").stat().st_mode & 0o777 == 0o644
