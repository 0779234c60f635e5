"""Slow, real model: a LoRA on smollm2-135m exported to GGUF f16 and read back through transformers."""

from __future__ import annotations

import pytest
from tiny_models import perturb_trainable

from tuneforge.adapters import LoraConfig, add_adapter, save_adapter
from tuneforge.merge.export import export_model
from tuneforge.models import load_model


@pytest.mark.slow
def test_smollm2_gguf_export_matches_the_adapter_model(tmp_path):
    model = load_model("smollm2-135m", dtype="float32").model
    add_adapter(model, LoraConfig(r=8, target_modules="all-linear"))
    perturb_trainable(model, scale=0.01)  # a visible change: the merged delta must survive the export
    save_adapter(model, tmp_path / "adapter")
    del model
    report = export_model("smollm2-135m", tmp_path / "adapter", tmp_path / "out", fmt="gguf", gguf_type="f16")
    # Stated tolerance for f16 weights (measured: max |Δlogit| 0.03, mean KL 2e-6 nats).
    assert report.difference.max_abs_logit_diff < 0.1
    assert report.difference.mean_kl < 1e-4
    assert (tmp_path / "out" / "model-f16.gguf").stat().st_size > 200e6  # 135M parameters at 2 bytes
