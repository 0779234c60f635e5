"""quantize_model on a tiny Llama: replacement, logits, storage, errors, a LoRA training step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import sample_ids, tiny_llama
from torch import nn

from tuneforge.adapters import LoraConfig, add_adapter
from tuneforge.errors import ConfigError
from tuneforge.quant import QuantLinear, bits_per_parameter, quantize_4bit, quantize_model, quantized_layers


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def relative_error(approx, exact):
    return ((approx - exact).norm() / exact.norm()).item()


def dequantized_float_model(model, quantized):
    """The float model with every quantized Linear's weight replaced by its dequantized weight."""
    reference = copy.deepcopy(model)
    for name, layer in quantized_layers(quantized):
        with torch.no_grad():
            reference.get_submodule(name).weight.copy_(layer.dequantized_weight(torch.float32))
    return reference


def test_every_linear_but_the_head_is_replaced_and_logits_stay_close():
    model, ids = tiny_llama(), sample_ids()
    quantized = quantize_model(copy.deepcopy(model), compute_dtype=torch.float32)
    linear_names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {name for name, _ in quantized_layers(quantized)} == linear_names - {"lm_head"}
    assert type(quantized.lm_head) is nn.Linear
    assert not any(type(m) is nn.Linear for name, m in quantized.named_modules() if name != "lm_head")
    # exactly the float computation with dequantized weights ...
    torch.testing.assert_close(logits(quantized, ids), logits(dequantized_float_model(model, quantized), ids))
    # ... and near the original float model: NF4 costs ~9% per weight, ~6% on these logits
    assert relative_error(logits(quantized, ids), logits(model, ids)) < 0.1


def test_int8_and_bfloat16_compute_stay_close():
    model, ids = tiny_llama(), sample_ids()
    expected = logits(model, ids)
    int8 = quantize_model(copy.deepcopy(model), bits=8, compute_dtype=torch.float32)
    assert relative_error(logits(int8, ids), expected) < 0.01  # measured 0.004
    nf4_bf16 = quantize_model(copy.deepcopy(model), compute_dtype=torch.bfloat16)
    out = logits(nf4_bf16, ids)
    assert out.dtype == torch.float32 and relative_error(out, expected) < 0.1


def stored_bits_exact(shapes, blocksize=64):
    """4-bit codes (ceil(n/2) bytes) + uint8 absmax per block + fp32 absmax per 256 blocks + fp32 offset."""
    total_bytes = 0
    for rows, cols in shapes:
        numel = rows * cols
        blocks = math.ceil(numel / blocksize)
        total_bytes += math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4
    return 8 * total_bytes / sum(r * c for r, c in shapes)


def test_stored_bits_per_parameter_with_double_quant():
    quantized = quantize_model(tiny_llama())
    shapes = [(layer.out_features, layer.in_features) for _, layer in quantized_layers(quantized)]
    assert bits_per_parameter(quantized) == pytest.approx(stored_bits_exact(shapes), rel=1e-12)
    # tiny layers (1024-4096 values) pay a whole second-level block: 4.17 bits/parameter here
    assert 4.12 < bits_per_parameter(quantized) < 4.2
    # at realistic sizes: 4 + 8/64 + 32/(64*256) = 4.1270 bits, plus one offset per tensor
    big = quantize_4bit(torch.randn(512, 4096), "nf4", 64, double_quant=True)
    assert 8 * big.nbytes() / big.numel == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / big.numel, rel=1e-12)
    assert 8 * big.nbytes() / big.numel == pytest.approx(4.127, abs=1e-3)


def test_skip_modules_match_whole_name_parts():
    quantized = quantize_model(tiny_llama(), skip_modules=["lm_head", "mlp", "layers.1.self_attn.q_proj"])
    names = {name for name, _ in quantized_layers(quantized)}
    assert names and not any(".mlp." in name for name in names)
    assert "model.layers.1.self_attn.q_proj" not in names and "model.layers.0.self_attn.q_proj" in names
    everything = quantize_model(tiny_llama(), skip_modules=None)
    assert isinstance(everything.lm_head, QuantLinear)


@pytest.mark.parametrize("kwargs, allowed", [
    (dict(bits=2), "choose 4"),
    (dict(quant_type="nf8"), "choose one of 'nf4', 'fp4'"),
    (dict(blocksize=48), "choose one of 32, 64, 128, 256, 512, 1024, 2048, 4096"),
    (dict(compute_dtype=torch.float64), "choose one of torch.bfloat16, torch.float16, torch.float32"),
])
def test_unsupported_settings_raise_config_error_naming_value_and_choices(kwargs, allowed):
    model = tiny_llama()
    with pytest.raises(ConfigError) as caught:
        quantize_model(model, **kwargs)
    message = str(caught.value)
    assert f"{next(iter(kwargs))}={next(iter(kwargs.values()))!r}" in message and allowed in message
    assert not quantized_layers(model)  # checked before any layer is touched


def test_qlora_training_step_on_a_quantized_tiny_llama():
    model, ids = quantize_model(tiny_llama(), compute_dtype=torch.float32), sample_ids()
    targets = add_adapter(model, LoraConfig(target_modules="all-linear", r=4))
    assert len(targets) == 14 and all(isinstance(model.get_submodule(t).base_layer, QuantLinear) for t in targets)
    frozen = {name: buffer.clone() for name, buffer in model.named_buffers()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(buffer, frozen[name]) for name, buffer in model.named_buffers())
