"""``--quantize nf4|fp4|int8``: one word to load a base quantized the way QLoRA training does.

``tuneforge eval``, ``serve`` and ``chat`` share these presets, so an adapter trained with
``quantization.type=nf4`` (other keys at their defaults) meets the same base at inference as in
training. A preset leaves blocksize, double quantization and the skipped modules at the defaults of
both ``quant.loading.load_quantized`` and the training config's ``quantization:`` section.
"""

from __future__ import annotations

import torch

from tuneforge.errors import ConfigError

QUANTIZE_CHOICES = ("nf4", "fp4", "int8")
# What a preset leaves alone, in the training config's key names; a run that changed one of these
# is not reproduced by the flag alone.
PRESET_DEFAULTS = {"double_quant": True, "blocksize": 64, "skip_modules": ["lm_head"]}
FOUR_BIT_ONLY = ("double_quant", "blocksize")


def compute_dtype_for(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """A ``compute_dtype`` setting as a dtype; ``auto`` is bfloat16 on a GPU and float32 on a CPU
    (CPUs without bf16 units run bf16 matmuls many times slower)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


def quantization_settings(kind: str | None, device: torch.device | str = "cpu") -> dict | None:
    """``--quantize KIND`` as ``load_model``'s ``quantization`` keywords; None when no flag was given.

    The compute dtype follows training's ``compute_dtype: auto`` (``compute_dtype_for``).
    """
    if kind is None:
        return None
    if kind not in QUANTIZE_CHOICES:
        raise ConfigError(f"--quantize {kind!r} is not a preset; choose one of {', '.join(QUANTIZE_CHOICES)}")
    compute = compute_dtype_for("auto", device)
    if kind == "int8":
        return dict(bits=8, compute_dtype=compute)
    return dict(bits=4, quant_type=kind, compute_dtype=compute)


def preset_for(section: dict) -> str:
    """The ``--quantize`` value matching a training run's ``quantization:`` section (its bits and type)."""
    return "int8" if section.get("bits", 4) == 8 else str(section.get("type", "nf4"))


def settings_beyond_preset(section: dict) -> dict:
    """The keys of a ``quantization:`` section that ``--quantize`` does not reproduce (non-default values)."""
    relevant = PRESET_DEFAULTS if section.get("bits", 4) == 4 else {
        key: value for key, value in PRESET_DEFAULTS.items() if key not in FOUR_BIT_ONLY}
    return {key: section[key] for key, default in relevant.items() if key in section and section[key] != default}
