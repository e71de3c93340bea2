import tomllib
from pathlib import Path

import refrag
from refrag.checkpoint import DEFAULT_CHECKPOINT, MANIFEST

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_compressor_is_package_data():
    """A wheel must carry the default checkpoint, or `pip install refrag` answers with an untrained projector."""
    package = Path(refrag.__file__).resolve().parent
    assert (DEFAULT_CHECKPOINT / MANIFEST).is_file() and DEFAULT_CHECKPOINT.is_relative_to(package)
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["refrag"]
    packaged = {p for pattern in patterns for p in package.glob(pattern)}
    shipped = {p for p in DEFAULT_CHECKPOINT.rglob("*") if p.is_file()}
    assert shipped and shipped <= packaged, sorted(map(str, shipped - packaged))
