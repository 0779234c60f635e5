"""`tuneforge train` with `quantization:` records the section beside the adapter it saves."""

from __future__ import annotations

import json

import pytest
from tiny_models import tiny_chat_model_and_tokenizer

from tuneforge.adapters import load_adapter
from tuneforge.adapters.peft_format import TRAINING_FILE, QuantizedTrainingWarning
from tuneforge.config import parse_train_config
from tuneforge.train import train


def test_a_qlora_run_records_its_quantization_section_with_the_adapter(tmp_path):
    config = parse_train_config({
        "output_dir": str(tmp_path / "qlora"),
        "adapter": {"r": 4},
        "data": {"train": "arithmetic", "options": {"size": 16}, "max_seq_len": 128, "eval_size": 4},
        "training": {"max_steps": 1, "batch_size": 4, "save_every": None},
        "quantization": {"bits": 4, "type": "nf4", "blocksize": 128},
    })
    summary = train(config, model_and_tokenizer=tiny_chat_model_and_tokenizer())
    record = json.loads((summary.adapter_dir / TRAINING_FILE).read_text())
    assert record == {"base_quantization": config.quantization.model_dump(mode="json")}
    assert record["base_quantization"]["blocksize"] == 128 and record["base_quantization"]["compute_dtype"] == "auto"
    float_base, _ = tiny_chat_model_and_tokenizer()
    with pytest.warns(QuantizedTrainingWarning, match=r"an nf4-quantized base .*blocksize=128"):
        load_adapter(float_base, summary.adapter_dir)
