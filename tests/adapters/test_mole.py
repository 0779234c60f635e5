"""`method: mole` is only the router over already-trained LoRAs (built by merge.lora_router, tested in
tests/merge/test_lora_router.py); the old trainable-experts form is refused with a pointer to mixlora."""

from __future__ import annotations

import pytest

from tuneforge.adapters.config import validate_config
from tuneforge.adapters.mixtures.mole import MoleConfig
from tuneforge.errors import ConfigError


def test_trainable_experts_are_refused_with_a_pointer_to_mixlora():
    with pytest.raises(ConfigError, match=r"method: mixlora.*add_lora_router"):
        validate_config(MoleConfig, {"method": "mole", "num_experts": 4, "top_k": 2}, "adapter.yaml")


def test_routers_over_fixed_loras_still_configure():
    config = MoleConfig(num_experts=3, top_k=1, r=4, train_experts=False, target_modules=["q_proj"])
    assert config.method == "mole"
    with pytest.raises(ValueError, match="top_k=4 exceeds num_experts=3"):
        MoleConfig(num_experts=3, top_k=4, train_experts=False)
