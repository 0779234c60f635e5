"""Quantize-as-load and save/load of quantized models: same layers, same logits, less memory."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import sample_ids, tiny_llama

from tuneforge.errors import ModelLoadError
from tuneforge.quant import QuantLinear, quantize_model
from tuneforge.quant.loading import QUANT_FILE, load_quantized, load_saved_quantized, save_quantized


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("bits,quant_type", [(4, "nf4"), (4, "fp4"), (8, "int8")])
def test_load_quantized_equals_quantizing_a_loaded_model(tmp_path, tied, bits, quant_type):
    base = tiny_llama(tie_word_embeddings=tied)
    base.save_pretrained(tmp_path)
    settings = dict(bits=bits, quant_type=quant_type, double_quant=True, blocksize=64,
                    compute_dtype=torch.float32, skip_modules=["lm_head"])
    expected = quantize_model(copy.deepcopy(base), **settings)
    loaded = load_quantized(tmp_path, **settings)
    assert {n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == \
           {n for n, m in expected.named_modules() if isinstance(m, QuantLinear)}
    ids = sample_ids()
    assert torch.equal(logits(loaded, ids), logits(expected, ids))
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_tied_head_can_be_quantized_too(tmp_path):
    tiny_llama(tie_word_embeddings=True).save_pretrained(tmp_path)
    loaded = load_quantized(tmp_path, skip_modules=[], compute_dtype=torch.float32)
    assert isinstance(loaded.lm_head, QuantLinear)
    assert not loaded.model.embed_tokens.weight.is_meta


def test_save_and_load_quantized_round_trip(tmp_path):
    model = quantize_model(tiny_llama(), compute_dtype=torch.float32)
    ids = sample_ids()
    save_quantized(model, tmp_path / "q")
    record = json.loads((tmp_path / "q" / QUANT_FILE).read_text())
    assert record["layers"]["model.layers.0.self_attn.q_proj"]["quant_type"] == "nf4"
    loaded = load_saved_quantized(tmp_path / "q")
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    stored = (tmp_path / "q" / "model.safetensors").stat().st_size
    tiny_llama().save_pretrained(tmp_path / "f")
    assert stored < (tmp_path / "f" / "model.safetensors").stat().st_size


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ModelLoadError, match="not written by save_quantized"):
        load_saved_quantized(tmp_path)
    tiny_llama().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no .safetensors files"):
        load_quantized(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="no quantized layers"):
        save_quantized(tiny_llama(), tmp_path / "x")


def test_allocator_tuning_applies_on_glibc_linux():
    import platform
    import sys

    from tuneforge.quant.allocator import return_large_buffers_to_os

    applied = return_large_buffers_to_os()
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert applied
    assert return_large_buffers_to_os() == applied  # idempotent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_embedding_stays_in_a_private_mapping_of_the_file(tmp_path, dtype):
    """Only the rows a batch reads need to be in memory; writing to the table never reaches the file."""
    from safetensors.torch import load_file

    tiny_llama().to(dtype).save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")["model.embed_tokens.weight"]
    loaded = load_quantized(tmp_path, compute_dtype=torch.float32, dtype=dtype)
    table = loaded.model.embed_tokens.weight
    assert torch.equal(table, on_disk)
    assert table.untyped_storage().nbytes() > table.numel() * table.element_size()  # a view of the whole file
    with torch.no_grad():
        table[0] += 1  # e.g. a method that trains some token rows
    assert torch.equal(load_file(tmp_path / "model.safetensors")["model.embed_tokens.weight"], on_disk)


def test_an_embedding_stored_in_another_dtype_is_read_into_memory(tmp_path):
    tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = load_quantized(tmp_path, compute_dtype=torch.float32, dtype=torch.float32)
    table = loaded.model.embed_tokens.weight
    assert table.dtype == torch.float32
    assert table.untyped_storage().nbytes() == table.numel() * table.element_size()
