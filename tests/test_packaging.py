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


def test_importing_refrag_makes_openmp_wait_passively_unless_told_otherwise():
    import subprocess
    import sys

    code = "import os, refrag; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "PASSIVE"
    assert subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                          capture_output=True, text=True, check=True).stdout.strip() == "ACTIVE"
