"""Adapters on demand: load by name from one directory, keep the most recently used in memory.

An adapter is a subdirectory of `adapters_dir` in PEFT format (adapter_config.json +
adapter_model.safetensors); its name is the subdirectory's name, restricted to letters, digits,
'_' and '-', and resolved so that it can never point outside the directory (no '..', no absolute
paths, no separators, no symlink leading out, and no file inside it a link leading out of it).

Before an adapter touches the model, its folder is checked whole (`_check_before_loading`): it must
be a per-layer method or one whose virtual tokens the engine prepends per row (prompt tuning,
P-tuning); other model-level methods (prefix tuning, adaption prompts, ReFT) would be served as the
plain base and are refused. Its tensors may not include base-model weights (`...base_layer.*`), which
every user of the server shares. Error messages name files relative to the adapters directory, never
by absolute path.

Lifecycle of a loaded adapter:

    on disk --acquire/load--> loaded (users = running + waiting requests) --release--> idle
    idle --LRU eviction (unpinned only) or unload--> on disk
    unload while in use: draining until its last request finishes, then unloaded

Loading and unloading change the model's modules, so they run under `model_lock`, which the engine
holds during each step; bookkeeping has its own small lock, so requests for an adapter that is
already loaded never wait for a step. Lock order: model_lock, then the bookkeeping lock.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import nn

from tuneforge.adapters import delete_adapter, load_adapter
from tuneforge.adapters.model import adapter_book, saved_module_copies, wrapped_layers
from tuneforge.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, read_adapter_config
from tuneforge.adapters.model_level import model_adapters
from tuneforge.adapters.model_level.prompt_tuning import VirtualPromptAdapter
from tuneforge.adapters.registry import get_method
from tuneforge.errors import AdapterError, ConfigError, TuneforgeError

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Model-level methods the engine serves per row: their adapters are VirtualPromptAdapters, whose
# vectors go in front of one row's prompt (checked again on the loaded adapter).
VIRTUAL_TOKEN_METHODS = ("prompt-tuning", "p-tuning")


def unservable_model_level(name: str, kind: str) -> str:
    return (f"adapter '{name}' uses {kind}, a model-level method (prefixes in the attention cache or edits of hidden "
            "states) that this server cannot apply to one row of a batch; it would answer as the plain base model, "
            "so it is refused. Prompt tuning and P-tuning are served; use this one through "
            "tuneforge.adapters.load_adapter in Python")


class UnknownAdapterError(AdapterError):
    """No adapter of that name exists (in memory or in the adapters directory)."""


class InvalidAdapterNameError(AdapterError):
    """The name could reach outside the adapters directory, or is not a plain name."""


class AdapterCapacityError(TuneforgeError):
    """Every loaded adapter is pinned or in use, so no room can be made for another one now."""


@dataclass
class _Loaded:
    name: str
    method: str
    users: int = 0
    pinned: bool = False
    draining: bool = False  # unload asked while in use: unload when the last user leaves
    last_used: int = 0


class AdapterManager:
    def __init__(self, model: nn.Module, adapters_dir: str | Path | None, max_loaded_adapters: int = 8):
        if max_loaded_adapters < 1:
            raise ConfigError(f"max_loaded_adapters={max_loaded_adapters} must be >= 1")
        self.model = model
        self.directory = Path(adapters_dir) if adapters_dir is not None else None
        if self.directory is not None and not self.directory.is_dir():
            raise ConfigError(f"--adapters-dir {self.directory} is not a directory; create it or point to the folder holding your adapters")
        self.max_loaded = max_loaded_adapters
        self._more_directories: list[Path] = []  # e.g. the fine-tuned models of the server's jobs
        self.model_lock = threading.RLock()
        self._lock = threading.Lock()
        self._loaded: dict[str, _Loaded] = {}
        self._clock = itertools.count(1)
        self.version = 0  # changes whenever the model's modules change (the engine caches its layer list)

    # ---- used by the engine -----------------------------------------------------------------

    def acquire(self, name: str) -> None:
        """Count one more request on adapter `name`, loading it first if needed."""
        with self._lock:
            if self._take(name):
                return
        with self.model_lock:
            with self._lock:
                if self._take(name):
                    return
            self._load(name)
            with self._lock:
                self._take(name)

    def release(self, name: str) -> None:
        with self._lock:
            entry = self._loaded.get(name)
            if entry is None:
                return
            entry.users -= 1
            unload_now = entry.users == 0 and entry.draining
        if unload_now:
            with self.model_lock:
                self._unload_if_idle(name)

    # ---- run-time control -------------------------------------------------------------------

    def load(self, name: str, pin: bool = False) -> dict:
        with self.model_lock:
            with self._lock:
                loaded = name in self._loaded
            if not loaded:
                self._load(name)
            with self._lock:
                entry = self._loaded[name]
                entry.draining = False
                entry.pinned = entry.pinned or pin
                entry.last_used = next(self._clock)
                return self._describe(entry)

    def unload(self, name: str) -> dict:
        """Unload now if idle; otherwise unload when the requests using it finish (none is lost)."""
        self.check_name(name)
        with self.model_lock:
            with self._lock:
                entry = self._loaded.get(name)
                if entry is None:
                    raise UnknownAdapterError(f"adapter '{name}' is not loaded; loaded: {sorted(self._loaded) or 'none'}")
                entry.pinned = False
                entry.draining = True
                in_use = entry.users
            if in_use == 0:
                self._unload_if_idle(name)
        return {"name": name, "status": "unloaded" if in_use == 0 else "draining", "in_use": in_use}

    def pin(self, name: str) -> dict:
        return self.load(name, pin=True)

    def unpin(self, name: str) -> None:
        with self._lock:
            if name in self._loaded:
                self._loaded[name].pinned = False

    def add_directory(self, directory: str | Path) -> None:
        """Serve the adapters in `directory` too (after those of the adapters directory, which win a
        name both hold)."""
        self._more_directories.append(Path(directory))

    def _roots(self) -> list[Path]:
        return [d for d in (self.directory, *self._more_directories) if d is not None]

    # ---- what exists ------------------------------------------------------------------------

    def loaded(self) -> list[dict]:
        with self._lock:
            return [self._describe(entry) for entry in self._loaded.values()]

    def available(self) -> list[str]:
        """Names of the adapters in the directory plus those in memory, sorted."""
        names = set()
        for root in self._roots():
            for child in root.iterdir():
                if NAME_PATTERN.fullmatch(child.name) and (child / CONFIG_FILE).is_file() and self._inside(child):
                    names.add(child.name)
        with self._lock:
            names.update(self._loaded)
        return sorted(names)

    def knows(self, name: str) -> bool:
        with self._lock:
            if name in self._loaded:
                return True
        try:
            self.adapter_path(name)
        except AdapterError:
            return False
        return True

    def check_name(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidAdapterNameError("an adapter name must be a non-empty string")
        if os.path.isabs(name) or "/" in name or "\\" in name:
            raise InvalidAdapterNameError(f"adapter name {name!r} must be a plain name, not a path; use the name of a folder inside the adapters directory")
        if ".." in name:
            raise InvalidAdapterNameError(f"adapter name {name!r} must not contain '..'")
        if not NAME_PATTERN.fullmatch(name):
            raise InvalidAdapterNameError(f"adapter name {name!r} may use only letters, digits, '_' and '-' (at most 128)")

    def adapter_path(self, name: str) -> Path:
        """The adapter's folder, after checking the name cannot lead outside the adapters directory."""
        self.check_name(name)
        if not self._roots():
            raise UnknownAdapterError(f"unknown model '{name}': this server has no adapters directory")
        candidates = [root / name for root in self._roots()]
        path = next((c for c in candidates if c.is_dir() and (c / CONFIG_FILE).is_file()), candidates[0])
        if not path.is_dir() or not (path / CONFIG_FILE).is_file():
            raise UnknownAdapterError(f"unknown model '{name}': the adapters directory has no folder '{name}' "
                                      f"with {CONFIG_FILE}; available adapters: {self.available() or 'none'}")
        if not self._inside(path):
            raise InvalidAdapterNameError(f"adapter '{name}' is a link that leads outside the adapters directory; refusing it")
        return path

    def _inside(self, path: Path) -> bool:
        """Whether `path` resolves into the root it is listed under (no link leads elsewhere)."""
        root = next((r for r in self._roots() if path.parent.absolute() == r.absolute()), None)
        return root is not None and path.resolve().is_relative_to(root.resolve())

    # ---- internals (model_lock held) --------------------------------------------------------

    def _take(self, name: str) -> bool:
        entry = self._loaded.get(name)
        if entry is None:
            return False
        entry.users += 1
        entry.draining = False  # asked for again: serve it rather than finish unloading it
        entry.last_used = next(self._clock)
        return True

    def _load(self, name: str) -> None:
        path = self.adapter_path(name)
        with self._public_errors(path):
            self._check_before_loading(name, path)
        self._make_room()
        self.version += 1
        with self._public_errors(path):
            config = load_adapter(self.model, path, name=name, activate=False)
        try:
            self._check_servable(name)
        except AdapterError:
            delete_adapter(self.model, name)
            raise
        with self._lock:
            self._loaded[name] = _Loaded(name, config.method, last_used=next(self._clock))

    def _check_before_loading(self, name: str, path: Path) -> None:
        """Everything that can be checked without touching the model: no file links out of the folder,
        a per-layer method, no base-model weights among the tensors."""
        self._check_no_links_out(name, path)
        config = read_adapter_config(path)
        if get_method(config.method).attach is not None and config.method not in VIRTUAL_TOKEN_METHODS:
            raise AdapterError(unservable_model_level(name, config.method))
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise AdapterError(f"adapter '{name}' has no {WEIGHTS_FILE}")
        try:
            with safe_open(str(weights), framework="pt") as stored:  # reads the header only
                keys = list(stored.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterError(f"adapter '{name}': {WEIGHTS_FILE} is corrupt or truncated ({exc})") from None
        base = sorted(key for key in keys if ".base_layer." in key)
        if base:
            more = f" and {len(base) - 1} more" if len(base) > 1 else ""
            raise AdapterError(
                f"adapter '{name}' holds base-model weights ('{base[0]}'{more}); "
                "a served adapter may not replace the base weights every user shares. Remove those tensors, "
                "or merge the adapter into a new base (tuneforge merge) and serve that"
            )

    def _check_no_links_out(self, name: str, path: Path) -> None:
        root = path.resolve()
        for folder, subfolders, files in os.walk(path):
            for entry in subfolders + files:
                target = Path(folder, entry)
                if not target.resolve().is_relative_to(root):
                    inside = target.relative_to(path).as_posix()
                    raise InvalidAdapterNameError(
                        f"adapter '{name}': '{inside}' is a link that leads outside the adapter's folder; refusing it")

    @contextlib.contextmanager
    def _public_errors(self, path: Path):
        """Adapter errors as clients see them: files named inside the adapters directory, never by
        absolute path (the server's layout is nobody's business)."""
        try:
            yield
        except TuneforgeError as error:
            message = str(error)
            for absolute in {str(path.resolve()), str(path.absolute()), str(path)}:
                message = message.replace(absolute, f"<adapters-dir>/{path.name}")
            for root in self._roots():
                for absolute in {str(root.resolve()), str(root.absolute()), str(root)}:
                    message = message.replace(absolute, "<adapters-dir>")
            if message == str(error):
                raise
            kind = type(error) if isinstance(error, AdapterError) else AdapterError  # keeps its HTTP status
            raise kind(message) from None

    def _check_servable(self, name: str) -> None:
        problem = per_row_problem(self.model, name)
        if problem is not None:
            raise AdapterError(problem)

    def _make_room(self) -> None:
        while True:
            with self._lock:
                if len(self._loaded) < self.max_loaded:
                    return
                idle = [e for e in self._loaded.values() if e.users == 0 and not e.pinned]
                if not idle:
                    raise AdapterCapacityError(
                        f"all {self.max_loaded} adapter slots hold adapters that are pinned or in use; retry later, "
                        "unpin one, or raise --max-loaded-adapters"
                    )
                victim = min(idle, key=lambda e: e.last_used)
                del self._loaded[victim.name]
            self.version += 1
            delete_adapter(self.model, victim.name)

    def _unload_if_idle(self, name: str) -> None:
        with self._lock:
            entry = self._loaded.get(name)
            if entry is None or entry.users > 0 or not entry.draining:
                return
            del self._loaded[name]
        self.version += 1
        delete_adapter(self.model, name)

    @staticmethod
    def _describe(entry: _Loaded) -> dict:
        return {"name": entry.name, "method": entry.method, "pinned": entry.pinned, "in_use": entry.users,
                "draining": entry.draining}


def per_row_problem(model: nn.Module, name: str) -> str | None:
    """Why adapter ``name`` of ``model`` cannot be applied to one row of a batch (so cannot be
    served beside others), or None when it can."""
    model_level = dict(model_adapters(model)).get(name)
    if model_level is not None and not isinstance(model_level, VirtualPromptAdapter):
        return unservable_model_level(name, adapter_book(model).configs[name].method)
    if any(name in copies.modules_to_save for _, copies in saved_module_copies(model)):
        return (f"adapter '{name}' replaces whole modules (modules_to_save), which cannot differ per "
                "batch row; serve it merged (tuneforge merge) instead")
    scaling = [layer_name for layer_name, layer in wrapped_layers(model)
               if name in layer.adapters and layer.adapters[name].modifies_input]
    if scaling:
        return (f"adapter '{name}' scales layer inputs ({scaling[0]}), which per-row batching does not "
                "support; serve it merged instead")
    return None
