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


def test_a_users_own_folder_is_never_replaced(tmp_path):
    from refrag.errors import InputError
    from refrag.io import check_replaceable

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match="not a refrag index.*thesis.tex"), \
            atomic_dir(mine, replaces=("index.json", "refrag index")) as tmp:
        (tmp / "index.json").write_text("{}")
    assert (mine / "thesis.tex").read_text() == "years of work" and not (mine / "index.json").exists()
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", "index.json", "refrag index")  # empty: fine
    check_replaceable(tmp_path / "absent", "index.json", "refrag index")  # absent: fine
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "index.json").write_text("{}")
    with atomic_dir(tmp_path / "old", replaces=("index.json", "refrag index")) as tmp:  # an index: replaced
        (tmp / "index.json").write_text('{"new": 1}')
    assert (tmp_path / "old" / "index.json").read_text() == '{"new": 1}'
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        check_replaceable(tmp_path / "file", "index.json", "refrag index")
