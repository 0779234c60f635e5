"""`load_model`: what the user writes -> a loaded transformers model and tokenizer.

Accepted, in this order: an embedded name (works offline), an existing path (a transformers model
directory or a `.gguf` file), a Hugging Face hub id `owner/name`. Embedded models and GGUF files are
converted once into a safetensors directory in the tuneforge cache; every load reads a directory.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tuneforge.errors import ModelLoadError
from tuneforge.models.embedded import EMBEDDED_MODELS, embedded_gguf_source
from tuneforge.models.gguf_cache import GgufSource, cached_conversion
from tuneforge.models.hub import hub_model_dir, looks_like_hub_id
from tuneforge.models.placement import parse_device, parse_dtype
from tuneforge.models.special_tokens import configure_generation_stops, ensure_pad_token

# Written before the path check only to tell "a path that does not exist" from a hub id or a typo.
_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


@dataclass
class LoadedModel:
    """A model ready for training or `generate`, with the tokenizer that belongs to it."""

    model: PreTrainedModel = field(repr=False)  # a module tree is too long to print in a repr
    tokenizer: PreTrainedTokenizerBase = field(repr=False)
    source: str  # the name or path the user gave
    local_dir: Path  # the directory holding config.json and the safetensors (the cache dir for GGUF)


def load_model(name_or_path: str, *, dtype: str = "auto", device: str = "cpu",
               quantization: dict | None = None) -> LoadedModel:
    """Load a causal language model and its tokenizer.

    `dtype`: float32, bfloat16, float16 or auto (the checkpoint's dtype; float32 for embedded and
    GGUF models). `device`: cpu, cuda, cuda:N or auto (a GPU when there is one). `quantization`:
    keyword arguments of `tuneforge.quant.loading.load_quantized` (bits, quant_type, double_quant,
    blocksize, compute_dtype, skip_modules); the Linear layers are then quantized as they are read.
    """
    torch_dtype = parse_dtype(dtype)  # both checked before any slow work
    torch_device = parse_device(device)
    local_dir = resolve_model_dir(name_or_path)
    tokenizer = _tokenizer_from_dir(local_dir, name_or_path)
    if quantization is not None:
        from tuneforge.quant.loading import load_quantized

        weights_dtype = torch.float32 if torch_dtype == "auto" else torch_dtype
        model = load_quantized(local_dir, dtype=weights_dtype, **quantization).to(torch_device)
    else:
        model = _model_from_dir(local_dir, name_or_path, torch_dtype).to(torch_device)
    configure_generation_stops(model.generation_config, tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, source=name_or_path, local_dir=local_dir)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer alone; a hub model's weights are not downloaded for it."""
    return _tokenizer_from_dir(_resolve(name_or_path, need_weights=False), name_or_path)


def resolve_model_dir(name_or_path: str) -> Path:
    """The local transformers directory for `name_or_path`, converting or downloading it if needed."""
    return _resolve(name_or_path, need_weights=True)


def _resolve(name_or_path: str, *, need_weights: bool) -> Path:
    embedded = EMBEDDED_MODELS.get(name_or_path.lower())
    if embedded is not None:
        return cached_conversion(embedded_gguf_source(embedded))
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _local_model_dir(path)
    if name_or_path.startswith(_PATH_PREFIXES) or name_or_path.lower().endswith(".gguf"):
        raise ModelLoadError(f"No file or directory at {name_or_path!r} ({path.absolute()}). {_accepted_sources()}")
    if looks_like_hub_id(name_or_path):
        return hub_model_dir(name_or_path, need_weights=need_weights, offline_hint=_offline_hint())
    raise ModelLoadError(_unknown_name_message(name_or_path))


def _local_model_dir(path: Path) -> Path:
    if path.is_file() and path.suffix.lower() == ".gguf":
        return cached_conversion(gguf_file_source(path))
    if path.is_file():
        raise ModelLoadError(f"{str(path)!r} is a file but not a .gguf file; give a model directory (with config.json) or a .gguf file.")
    if (path / "config.json").is_file():
        return path.resolve()
    ggufs = sorted(child.name for child in path.glob("*.gguf"))
    if ggufs:
        raise ModelLoadError(f"The directory {str(path)!r} has no config.json but holds GGUF files ({', '.join(ggufs)}); pass the path of one, e.g. {str(path / ggufs[0])!r}.")
    raise ModelLoadError(f"The directory {str(path)!r} has no config.json, so it is not a transformers model directory; save one with model.save_pretrained(...).")


def gguf_file_source(path: Path) -> GgufSource:
    """A user's GGUF file, cached by its absolute path; a changed size or mtime converts it again.

    Hashing the content would cost seconds per load for multi-GB files; path, size and mtime
    change whenever the file is replaced or edited in place.
    """
    resolved = path.resolve()
    stat = resolved.stat()
    path_key = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    readable_stem = re.sub(r"[^\w.-]+", "_", resolved.stem)[:60]
    return GgufSource(
        label=str(path),
        cache_name=f"gguf/{readable_stem}-{path_key}",
        fingerprint=f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}",
        materialize=lambda scratch: resolved,
    )


def _tokenizer_from_dir(local_dir: Path, source: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(local_dir)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"Cannot load the tokenizer of {source!r} from {local_dir}: {error}") from error
    ensure_pad_token(tokenizer, source)
    return tokenizer


def _model_from_dir(local_dir: Path, source: str, dtype: torch.dtype | str) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(local_dir, dtype=dtype)
    except ValueError as error:
        if "Unrecognized configuration class" in str(error):
            raise ModelLoadError(f"{source!r} ({local_dir}) is not a causal language model, which tuneforge finetunes: {error}") from error
        raise ModelLoadError(f"Cannot load the model {source!r} from {local_dir}: {error}") from error
    except (OSError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"Cannot load the model {source!r} from {local_dir}: {error}") from error


def _unknown_name_message(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), list(EMBEDDED_MODELS), n=2, cutoff=0.6)
    suggestion = f" Did you mean {' or '.join(repr(match) for match in close)}?" if close else ""
    return f"Unknown model {name!r}: not an embedded model, an existing path or a hub id.{suggestion} {_accepted_sources()}"


def _accepted_sources() -> str:
    return (
        f"Embedded models (offline): {_embedded_list()}. Also accepted: a model directory with config.json, "
        "a .gguf file, or a Hugging Face hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'."
    )


def _offline_hint() -> str:
    return f"Embedded models work offline: {_embedded_list()}; a local path works too (a model directory with config.json, or a .gguf file)."


def _embedded_list() -> str:
    return "; ".join(f"{model.name} ({model.description})" for model in EMBEDDED_MODELS.values())
