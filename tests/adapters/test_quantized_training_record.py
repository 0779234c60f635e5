"""An adapter trained on a quantized base records it beside the PEFT files (tuneforge_training.json),
and loading it onto a full-precision base says so once: it works, outputs differ slightly, how to match."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_llama

from tuneforge.adapters import LoraConfig, add_adapter, adapter_names, load_adapter, save_adapter
from tuneforge.adapters.peft_format import (
    CONFIG_FILE,
    TRAINING_FILE,
    QuantizedTrainingWarning,
    read_base_quantization,
)
from tuneforge.errors import ConfigError
from tuneforge.quant import quantize_model

LORA = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


def quantized_llama():
    return quantize_model(tiny_llama(), bits=4, quant_type="nf4", compute_dtype=torch.float32)


def save_trained(directory, base, **save_options):
    """A LoRA on ``base`` moved off its init (B = 0 would hide a wrongly loaded adapter), saved."""
    add_adapter(base, LORA)
    perturb_trainable(base, scale=0.2)
    save_adapter(base, directory, **save_options)
    return directory


def notes_from_loading(model, directory) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_adapter(model, directory)
    return [str(w.message) for w in caught if issubclass(w.category, QuantizedTrainingWarning)]


def test_a_qlora_adapter_records_its_base_quantization_outside_adapter_config(tmp_path):
    qlora = save_trained(tmp_path / "qlora", quantized_llama())
    plain = save_trained(tmp_path / "plain", tiny_llama())
    assert json.loads((qlora / TRAINING_FILE).read_text()) == {"base_quantization": {
        "bits": 4, "type": "nf4", "double_quant": True, "blocksize": 64, "compute_dtype": "float32"}}
    assert not (plain / TRAINING_FILE).exists()
    ours, theirs = (json.loads((d / CONFIG_FILE).read_text()) for d in (qlora, plain))
    assert ours == theirs, "adapter_config.json must hold the same PEFT keys whatever the base was"


def test_loading_onto_a_float_base_gives_one_clear_note(tmp_path):
    directory = save_trained(tmp_path / "qlora", quantized_llama())
    notes = notes_from_loading(tiny_llama(), directory)
    assert len(notes) == 1
    note = notes[0]
    assert str(directory) in note and "an nf4-quantized base" in note
    assert "That works" in note and "differ slightly" in note and "--quantize nf4" in note


def test_no_note_on_a_quantized_base_or_for_a_float_trained_adapter(tmp_path):
    qlora = save_trained(tmp_path / "qlora", quantized_llama())
    plain = save_trained(tmp_path / "plain", tiny_llama())
    assert notes_from_loading(quantized_llama(), qlora) == []
    assert notes_from_loading(tiny_llama(), plain) == []
    assert notes_from_loading(quantized_llama(), plain) == []


def test_settings_the_flag_cannot_express_point_to_load_model(tmp_path):
    section = {"bits": 4, "type": "fp4", "double_quant": False, "blocksize": 128, "compute_dtype": "auto",
               "skip_modules": ["lm_head"]}
    directory = save_trained(tmp_path / "qlora", tiny_llama(), base_quantization=section)
    assert read_base_quantization(directory) == section
    [note] = notes_from_loading(tiny_llama(), directory)
    assert "--quantize fp4" in note and "double_quant=False, blocksize=128" in note
    assert "load_model(..., quantization=...)" in note


def test_resaving_a_float_adapter_in_place_drops_the_old_record(tmp_path):
    directory = save_trained(tmp_path / "adapter", quantized_llama())
    save_trained(directory, tiny_llama())
    assert not (directory / TRAINING_FILE).exists() and read_base_quantization(directory) is None


def test_peft_still_loads_the_directory_with_equal_logits(tmp_path):
    directory = save_trained(tmp_path / "qlora", quantized_llama())
    ours = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizedTrainingWarning)
        load_adapter(ours, directory)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), directory).eval()
    ids = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)


def test_a_corrupt_record_is_a_clear_error_before_the_model_changes(tmp_path):
    directory = save_trained(tmp_path / "qlora", quantized_llama())
    (directory / TRAINING_FILE).write_text("{not json")
    model = tiny_llama()
    with pytest.raises(ConfigError, match=rf"{TRAINING_FILE} is not valid JSON .*delete the file"):
        load_adapter(model, directory)
    assert adapter_names(model) == []
