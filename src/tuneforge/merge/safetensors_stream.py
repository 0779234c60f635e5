"""Read and write model weights one tensor at a time, so merging never holds whole models.

Reading: a model directory holds ``model.safetensors`` or shards listed in
``model.safetensors.index.json`` (``weight_map``: tensor name -> shard file); ``safe_open`` maps
the files, and ``get`` materialises only the tensor asked for.

Writing: the safetensors layout is an 8-byte little-endian header length, a JSON header giving
each tensor's dtype, shape and ``data_offsets`` (begin, end) inside the data section, then the raw
bytes (format spec: huggingface/safetensors, "Format"). Output shapes and dtypes are known before
any tensor is computed, so the header of each shard is written first and every tensor's bytes are
appended as soon as it exists; the shard file is renamed into place once complete.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from tuneforge.errors import ModelLoadError
from tuneforge.fileio import atomic_write

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HEADER_ALIGNMENT = 8

# safetensors dtype codes (format spec) for the dtypes a model checkpoint holds.
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.tensor([], dtype=self.dtype).element_size()


class SafetensorsModel:
    """The tensors of one model directory (single file or sharded), read one at a time.

    Use as a context manager; ``get(name)`` returns a fresh CPU tensor the caller owns.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.weight_map = _weight_map(self.directory)
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}

    def __enter__(self) -> "SafetensorsModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def names(self) -> list[str]:
        return list(self.weight_map)

    def info(self, name: str) -> TensorInfo:
        handle = self._handle(name)
        piece = handle.get_slice(name)
        code = piece.get_dtype()
        if code not in CODE_DTYPES:
            raise ModelLoadError(f"{self.directory}: tensor '{name}' has dtype {code}, which tuneforge cannot merge")
        return TensorInfo(name, tuple(piece.get_shape()), CODE_DTYPES[code])

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise ModelLoadError(f"{self.directory} has no tensor '{name}'; the models do not share one architecture")
        shard = self.weight_map[name]
        if shard not in self._handles:
            path = self.directory / shard
            if not path.is_file():
                raise ModelLoadError(f"{self.directory}: the index names the shard {shard}, which is missing")
            self._handles[shard] = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
        return self._handles[shard]


def _weight_map(directory: Path) -> dict[str, str]:
    if not directory.is_dir():
        raise ModelLoadError(f"model directory {directory} does not exist; give a directory saved with save_pretrained")
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index} is not a safetensors index (no readable 'weight_map'): {exc}") from None
        return dict(weight_map)
    single = directory / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt", device="cpu") as handle:
            return {name: SINGLE_FILE for name in handle.keys()}
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".gguf"))
    hint = (f" It holds {', '.join(others)}; load and re-save it with save_pretrained(..., safe_serialization=True)."
            if others else "")
    raise ModelLoadError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}: no safetensors weights to merge.{hint}")


def plan_shards(infos: list[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    """Consecutive groups of at most ``max_shard_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return [shard for shard in shards if shard]


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_streamed(directory: Path, infos: list[TensorInfo], produce: Callable[[TensorInfo], torch.Tensor],
                   max_shard_bytes: int, metadata: dict[str, str] | None = None) -> list[Path]:
    """Write the tensors ``infos`` describe, computing each with ``produce`` just before it is written.

    One shard file when everything fits in ``max_shard_bytes``, else numbered shards plus an index.
    Returns the files written.
    """
    shards = plan_shards(infos, max_shard_bytes)
    names = shard_names(len(shards))
    written = []
    for name, shard in zip(names, shards):
        written.append(atomic_write(directory / name, lambda tmp, shard=shard: _write_shard(tmp, shard, produce, metadata)))
    if len(shards) > 1:
        weight_map = {info.name: name for name, shard in zip(names, shards) for info in shard}
        index = {"metadata": {"total_size": sum(info.nbytes for info in infos)}, "weight_map": weight_map}
        written.append(atomic_write(directory / INDEX_FILE, lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n")))
    return written


def _write_shard(path: Path, shard: list[TensorInfo], produce: Callable[[TensorInfo], torch.Tensor],
                 metadata: dict[str, str] | None) -> None:
    header = _header(shard, metadata)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        for info in shard:
            tensor = produce(info)
            if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
                raise ValueError(f"'{info.name}' came out {tuple(tensor.shape)} {tensor.dtype}, "
                                 f"planned {info.shape} {info.dtype}")
            out.write(tensor_bytes(tensor))
            del tensor


def _header(shard: list[TensorInfo], metadata: dict[str, str] | None) -> bytes:
    entries: dict[str, object] = {}
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for info in shard:
        entries[info.name] = {"dtype": DTYPE_CODES[info.dtype], "shape": list(info.shape),
                              "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    return raw + b" " * (-len(raw) % HEADER_ALIGNMENT)  # the data section starts 8-byte aligned


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Row-major little-endian bytes of ``tensor`` (safetensors' layout)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy().tobytes()


def iter_infos(model: SafetensorsModel) -> Iterator[TensorInfo]:
    for name in model.names():
        yield model.info(name)
