"""Turn the user's `dtype` and `device` strings into torch values, or say which choices exist."""

from __future__ import annotations

import re

import torch

from tuneforge.errors import ConfigError

# "auto" stays a string: transformers reads it as "the dtype the checkpoint was saved in".
DTYPE_CHOICES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}
# Spellings other tools use, answered with a "did you mean" rather than accepted: one name per dtype
# keeps configs comparable.
_DTYPE_SPELLINGS = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
DEVICE_CHOICES = ("cpu", "cuda", "cuda:N", "auto")
_CUDA_DEVICE = re.compile(r"^cuda(?::(\d+))?$")


def parse_dtype(dtype: str) -> torch.dtype | str:
    """`"bfloat16"` -> `torch.bfloat16`; `"auto"` is kept for transformers to resolve."""
    if dtype not in DTYPE_CHOICES:
        known = _DTYPE_SPELLINGS.get(str(dtype).lower())
        suggestion = f" Did you mean {known!r}?" if known else ""
        raise ConfigError(
            f"dtype={dtype!r} is not a choice; use one of {', '.join(DTYPE_CHOICES)} "
            f"('auto' keeps the dtype the checkpoint was saved in).{suggestion}"
        )
    return DTYPE_CHOICES[dtype]


def parse_device(device: str) -> torch.device:
    """`"cpu"`, `"cuda"`, `"cuda:N"` or `"auto"` (the first GPU when there is one, else the CPU)."""
    if device == "cpu":
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = _CUDA_DEVICE.match(device)
    if match is None:
        raise ConfigError(f"device={device!r} is not a choice; use one of {', '.join(DEVICE_CHOICES)}.")
    _check_cuda_device(device, index=int(match.group(1) or 0))
    return torch.device(device)


def _check_cuda_device(device: str, index: int) -> None:
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
        raise ConfigError(f"device={device!r} asks for a GPU, but torch sees none ({build}); use device='cpu' or 'auto'.")
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device={device!r} names GPU {index}, but only {count} GPU(s) are visible (cuda:0 to cuda:{count - 1}).")
