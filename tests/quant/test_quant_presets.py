"""`--quantize nf4|fp4|int8` presets shared by eval, serve and chat, and their inverse for a run's settings."""

from __future__ import annotations

import pytest
import torch

from tuneforge.errors import ConfigError
from tuneforge.quant.presets import preset_for, quantization_settings, settings_beyond_preset


@pytest.mark.parametrize("kind, expected", [
    ("nf4", {"bits": 4, "quant_type": "nf4", "compute_dtype": torch.float32}),
    ("fp4", {"bits": 4, "quant_type": "fp4", "compute_dtype": torch.float32}),
    ("int8", {"bits": 8, "compute_dtype": torch.float32}),
    (None, None),
])
def test_presets_are_load_model_settings(kind, expected):
    assert quantization_settings(kind, torch.device("cpu")) == expected


def test_a_gpu_computes_in_bfloat16_like_trainings_auto():
    assert quantization_settings("nf4", torch.device("cuda", 0))["compute_dtype"] == torch.bfloat16


def test_an_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match=r"--quantize 'nf5' is not a preset; choose one of nf4, fp4, int8"):
        quantization_settings("nf5")


def test_a_runs_section_maps_back_to_its_preset_and_what_the_preset_misses():
    section = {"bits": 4, "type": "fp4", "double_quant": True, "blocksize": 128, "skip_modules": ["lm_head"]}
    assert preset_for(section) == "fp4" and settings_beyond_preset(section) == {"blocksize": 128}
    int8 = {"bits": 8, "type": "nf4", "double_quant": False, "blocksize": 32}  # 4-bit keys mean nothing at 8 bits
    assert preset_for(int8) == "int8" and settings_beyond_preset(int8) == {}
    assert settings_beyond_preset({"bits": 4, "type": "nf4"}) == {}


def test_compute_dtype_auto_is_bf16_on_a_gpu_and_float32_on_a_cpu():
    from tuneforge.quant.presets import compute_dtype_for

    assert compute_dtype_for("auto", "cpu") == torch.float32
    assert compute_dtype_for("auto", "cuda") == torch.bfloat16
    assert compute_dtype_for("float16", "cpu") == torch.float16
