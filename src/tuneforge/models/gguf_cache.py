"""Convert a GGUF file once into a float32 safetensors model directory in the tuneforge cache.

Reading GGUF through transformers takes tens of seconds (it parses the tokenizer metadata field by
field and dequantises every tensor); loading the converted directory takes a fraction of a second.
The directory appears only by one rename of a finished staging directory, so a crashed or
concurrent conversion never leaves a half directory that a later load would take as valid.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tuneforge.errors import ModelLoadError
from tuneforge.models.special_tokens import configure_generation_stops, ensure_pad_token

logger = logging.getLogger(__name__)

# Written last into the staging directory: which GGUF the directory was made from, so a changed
# source (a package upgrade, an edited file) is converted again instead of silently reused.
SOURCE_RECORD = "tuneforge_source.json"
# A staging directory this old belongs to a process that was killed (a conversion takes minutes, not
# hours); it can hold a GB of weights, so the next conversion of the same model removes it.
ABANDONED_AFTER_S = 24 * 3600
CONVERSION_STEPS = ("preparing the GGUF file", "reading GGUF weights", "reading GGUF tokenizer", "writing safetensors")


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file to convert, and where its converted directory lives under `<home>/models/`."""

    label: str  # what the user wrote, for messages
    cache_name: str  # relative directory under <home>/models/
    fingerprint: str  # changes whenever the GGUF content may have changed
    # Returns the GGUF path, given a scratch directory it may write into (a split GGUF is joined there).
    materialize: Callable[[Path], Path]


def tuneforge_home() -> Path:
    """The cache root: `$TUNEFORGE_HOME`, or `~/.cache/tuneforge`."""
    configured = os.environ.get("TUNEFORGE_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "tuneforge"


def models_cache_dir() -> Path:
    return tuneforge_home() / "models"


def cached_conversion(source: GgufSource) -> Path:
    """The converted directory for `source`, converting it first if it is missing or stale."""
    final = models_cache_dir() / source.cache_name
    if is_current(final, source.fingerprint):
        return final
    logger.info("Converting %s from GGUF to a float32 safetensors model once; the cache goes to %s", source.label, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(final)
    # Beside the final directory, so the closing rename stays on one filesystem and is atomic.
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        staged = scratch / "model"
        _convert_into(source, scratch, staged)
        _publish(staged, final, source.fingerprint, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def is_current(model_dir: Path, fingerprint: str) -> bool:
    """True when `model_dir` is a finished conversion of the GGUF that `fingerprint` describes."""
    try:
        record = json.loads((model_dir / SOURCE_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return record.get("fingerprint") == fingerprint and (model_dir / "config.json").is_file()


def read_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file with transformers, dequantised to float32 (the slow step the cache avoids)."""
    model = _read_gguf_weights(gguf_path)
    return model, _read_gguf_tokenizer(gguf_path)


def write_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, destination: Path) -> None:
    """Save a GGUF-loaded model and its tokenizer as an ordinary transformers directory."""
    plain = _plain_copy(model)
    ensure_pad_token(tokenizer, str(destination))
    configure_generation_stops(plain.generation_config, tokenizer)
    plain.save_pretrained(destination)
    tokenizer.save_pretrained(destination)  # also writes the chat template (chat_template.jinja)


def _convert_into(source: GgufSource, scratch: Path, staged: Path) -> None:
    with _conversion_progress(source.label) as next_step:
        next_step()
        gguf_path = source.materialize(scratch)
        next_step()
        model = _read_gguf_weights(gguf_path)
        next_step()
        tokenizer = _read_gguf_tokenizer(gguf_path)
        next_step()
        write_model_dir(model, tokenizer, staged)
    record = {"source": source.label, "fingerprint": source.fingerprint, "transformers": transformers.__version__}
    (staged / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _read_gguf_weights(gguf_path: Path) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        raise ModelLoadError(_unreadable_gguf_message(gguf_path, error)) from error


def _read_gguf_tokenizer(gguf_path: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        raise ModelLoadError(_unreadable_gguf_message(gguf_path, error)) from error


def _unreadable_gguf_message(gguf_path: Path, error: Exception) -> str:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    architectures = sorted(key for key in GGUF_CONFIG_MAPPING if key not in ("general", "tokenizer"))
    return (
        f"transformers {transformers.__version__} could not read the GGUF file {gguf_path}: {error}. "
        f"It reads these GGUF architectures: {', '.join(architectures)}."
    )


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model without the GGUF quantization config.

    transformers refuses to `save_pretrained` a model that still carries the GGUF quantizer, and
    its config would make a later load look for a GGUF file. The weights are already float32.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no random init: every tensor is replaced below
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    plain.tie_weights()  # assign=True gives the embedding and lm_head separate tensors again
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def _remove_abandoned_staging(final: Path) -> None:
    for staging in final.parent.glob(f".{final.name}.partial-*"):
        try:
            abandoned = time.time() - staging.stat().st_mtime > ABANDONED_AFTER_S
        except OSError:  # removed meanwhile by its own process
            continue
        if abandoned:
            shutil.rmtree(staging, ignore_errors=True)


def _publish(staged: Path, final: Path, fingerprint: str, scratch: Path) -> None:
    try:
        os.replace(staged, final)  # atomic; fails when `final` exists and is not empty
        return
    except OSError:
        if is_current(final, fingerprint):
            return  # another process finished the same conversion first; keep its directory
    # A stale conversion of an older source: move it aside (into scratch, removed with it), then publish.
    os.replace(final, scratch / "stale")
    os.replace(staged, final)


@contextmanager
def _conversion_progress(label: str) -> Iterator[Callable[[], None]]:
    """A rich progress line over the conversion steps; yields `next_step()` to move to the next one.

    transformers' own bars are switched off meanwhile: their carriage-return updates would break
    the live display into many lines.
    """
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True,
    )
    task = progress.add_task(f"Converting {label} once", total=len(CONVERSION_STEPS))
    steps_started = 0

    def next_step() -> None:
        nonlocal steps_started
        progress.update(task, completed=steps_started, description=f"Converting {label} once: {CONVERSION_STEPS[steps_started]}")
        steps_started += 1

    bars_were_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        with progress:
            yield next_step
            progress.update(task, completed=len(CONVERSION_STEPS))
    finally:
        if bars_were_enabled:
            transformers.utils.logging.enable_progress_bar()
