"""A real QLoRA run: `tuneforge train` on smollm2-135m quantized to NF4 as it loads lowers the eval loss."""

from __future__ import annotations

import json

from tuneforge.config import parse_train_config
from tuneforge.quant import QuantLinear, loading
from tuneforge.train import train


def test_qlora_on_smollm2_lowers_eval_loss(tmp_path, monkeypatch):
    loaded = []
    real_load = loading.load_quantized
    monkeypatch.setattr(loading, "load_quantized", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    config = parse_train_config({
        "model": "smollm2-135m",
        "output_dir": str(tmp_path / "qlora"),
        "adapter": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": "arithmetic", "options": {"size": 32}, "max_seq_len": 128, "eval_size": 8},
        "quantization": {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "float32"},
        "training": {"max_steps": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 0, "optimizer": "adamw8bit"},
    })
    summary = train(config)
    [model] = loaded
    quantized = [name for name, module in model.named_modules() if isinstance(module, QuantLinear)]
    assert len(quantized) == 30 * 7, "every decoder Linear of SmolLM2 (30 layers x 7) is NF4; lm_head is skipped"
    records = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[-1] < 0.8 * evals[0], f"eval loss went {evals[0]:.3f} -> {evals[-1]:.3f}"
    assert json.loads((summary.adapter_dir / "adapter_config.json").read_text())["r"] == 8
