"""Hugging Face hub ids: the local hub cache first, a download only when the hub can be reached.

Offline, huggingface_hub can spend a long time in connection retries before it gives up; a short
reachability probe lets tuneforge fail within seconds and say what works offline instead.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from tuneforge.errors import ModelLoadError

# owner/name, as the hub allows them: word characters, '.', '-', no '--' or '..', at most 96 each.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_TRUE_WORDS = ("1", "true", "yes", "on")
PROBE_TIMEOUT_S = 3.0

_CONFIG_AND_TOKENIZER_FILES = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "*.jinja", "*.model", "vocab*", "merges.txt"]
_SAFETENSORS_FILES = ["*.safetensors", "*.safetensors.index.json"]
_PYTORCH_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and "--" not in text and ".." not in text


def offline_reason() -> str | None:
    """Why the hub cannot be used now, or None when it answers."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in _TRUE_WORDS:
            return f"{variable}={os.environ[variable]} is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if not hub_reachable(endpoint):
        return f"the hub at {endpoint} cannot be reached (no network connection within {PROBE_TIMEOUT_S:g} s)"
    return None


def hub_reachable(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub opens within `timeout_s`, name lookup included.

    The probe runs in a daemon thread because a name lookup has no timeout of its own.
    """
    url = urlparse(endpoint)
    if url.hostname is None:
        return False
    address = (url.hostname, url.port or (80 if url.scheme == "http" else 443))
    answer: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=timeout_s).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=probe, name="tuneforge-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(answer and answer[0])


def hub_model_dir(repo_id: str, *, need_weights: bool, offline_hint: str) -> Path:
    """The local snapshot of `repo_id`, downloading it (weights only when needed) if it is not cached."""
    candidates = _file_patterns(need_weights)
    for patterns in candidates:
        cached = cached_snapshot(repo_id, patterns)
        if cached is not None and (not need_weights or _has_weights(cached)):
            return cached
    reason = offline_reason()
    if reason is not None:
        raise ModelLoadError(f"Cannot fetch {repo_id!r} from the Hugging Face hub: offline ({reason}), and it is not in the local hub cache. {offline_hint}")
    return _download(repo_id, candidates, need_weights)


def cached_snapshot(repo_id: str, patterns: list[str] | None = None) -> Path | None:
    """The snapshot folder of `repo_id` in the local hub cache, if it holds a config.json.

    `patterns` must be those of the download: with a cached file listing, huggingface_hub calls a
    snapshot incomplete when files outside the patterns are missing.
    """
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):  # not cached, incomplete, or an invalid id
        return None
    return folder if (folder / "config.json").is_file() else None


def _file_patterns(need_weights: bool) -> list[list[str]]:
    """Files to fetch, in order of preference: safetensors, else (older repositories) PyTorch pickles."""
    if not need_weights:
        return [_CONFIG_AND_TOKENIZER_FILES]
    return [_CONFIG_AND_TOKENIZER_FILES + _SAFETENSORS_FILES, _CONFIG_AND_TOKENIZER_FILES + _PYTORCH_FILES]


def _download(repo_id: str, candidates: list[list[str]], need_weights: bool) -> Path:
    try:
        for patterns in candidates:
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
            if not need_weights or _has_weights(folder):
                break
    except (HfHubHTTPError, OSError) as error:  # HTTP status, connection and disk errors
        raise ModelLoadError(f"Downloading {repo_id!r} from the Hugging Face hub failed: {error}") from error
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"The hub repository {repo_id!r} has no config.json, so it is not a transformers model.")
    if need_weights and not _has_weights(folder):
        raise ModelLoadError(f"The hub repository {repo_id!r} has neither *.safetensors nor pytorch_model*.bin weights.")
    return folder


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
