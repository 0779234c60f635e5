"""QuantLinear: chunked forward/backward, adapters on top, frozen quantized weight."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tuneforge.adapters import LoraConfig, add_adapter, merge_adapters, merge_and_unload
from tuneforge.errors import AdapterError, ConfigError
from tuneforge.quant import QuantLinear


def generator(seed):
    return torch.Generator().manual_seed(seed)


def float_linear(in_features=40, out_features=24, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def dequantized_copy(layer: QuantLinear) -> nn.Linear:
    """The float reference: a plain Linear holding exactly the dequantized weight."""
    reference = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        reference.weight.copy_(layer.dequantized_weight(torch.float32))
        if layer.bias is not None:
            reference.bias.copy_(layer.bias)
    return reference


class Block(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("bits, quant_type", [(4, "nf4"), (4, "fp4"), (8, "int8")])
@pytest.mark.parametrize("chunk_rows", [None, 5, 1])
def test_forward_equals_a_linear_with_the_dequantized_weight(bits, quant_type, chunk_rows):
    layer = QuantLinear.from_linear(float_linear(), bits=bits, quant_type=quant_type, blocksize=32,
                                    compute_dtype=torch.float32, chunk_rows=chunk_rows)
    x = torch.randn(3, 7, 40, generator=generator(1))
    torch.testing.assert_close(layer(x), dequantized_copy(layer)(x))


def test_bfloat16_compute_returns_the_input_dtype():
    layer = QuantLinear.from_linear(float_linear(), compute_dtype=torch.bfloat16)
    x = torch.randn(2, 40, generator=generator(1))
    out = layer(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, dequantized_copy(layer)(x), rtol=0.02, atol=0.02)


def test_linear_surface_for_adapters():
    linear = float_linear()
    layer = QuantLinear.from_linear(linear, double_quant=True)
    assert (layer.in_features, layer.out_features) == (40, 24)
    assert layer.weight.shape == (24, 40) and layer.weight.dtype == torch.float32
    assert torch.equal(layer.weight, layer.dequantized_weight())
    assert torch.equal(layer.bias, linear.bias)
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    assert not layer.bias.requires_grad
    assert {name for name, _ in layer.named_buffers()} == {"qweight", "absmax", "absmax2", "absmax_offset"}
    assert "nf4" in repr(layer)


def test_forward_and_backward_dequantize_one_chunk_of_rows_at_a_time(monkeypatch):
    layer = QuantLinear.from_linear(float_linear(64, 48), compute_dtype=torch.float32, chunk_rows=8)
    requested = []
    dequantize_rows = layer.dequantize_rows

    def recording(start, stop, dtype=None):
        requested.append(stop - start)
        return dequantize_rows(start, stop, dtype)

    monkeypatch.setattr(layer, "dequantize_rows", recording)
    layer(torch.randn(4, 64, generator=generator(1), requires_grad=True)).sum().backward()
    assert requested == [8] * 12  # 6 chunks in forward, 6 again in backward, never all 48 rows


def test_backward_keeps_no_full_precision_weight():
    layer = QuantLinear.from_linear(float_linear(64, 48), compute_dtype=torch.float32, chunk_rows=8)
    x = torch.randn(4, 64, generator=generator(1), requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = layer(x)
    assert all(shape.numel() < 48 * 64 for shape in saved)
    out.square().sum().backward()
    reference = dequantized_copy(layer)
    x_ref = x.detach().clone().requires_grad_(True)
    reference(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_gradients_on_a_quantized_base_equal_the_float_reference(use_dora):
    quantized = Block(QuantLinear.from_linear(float_linear(), compute_dtype=torch.float32, chunk_rows=7))
    reference = Block(dequantized_copy(quantized.proj))
    config = LoraConfig(target_modules=["proj"], r=4, alpha=8, use_dora=use_dora)
    add_adapter(quantized, config)
    add_adapter(reference, config)
    reference_parameters = dict(reference.named_parameters())
    with torch.no_grad():  # move the adapter off its identity init, identically in both
        for name, param in quantized.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator(param.numel())) * 0.1)
                reference_parameters[name].copy_(param)
    x = torch.randn(3, 5, 40, generator=generator(1))
    x_ours, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_ours, out_ref = quantized(x_ours), reference(x_ref)
    torch.testing.assert_close(out_ours, out_ref)
    out_ours.square().mean().backward()
    out_ref.square().mean().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    ours = {n: p for n, p in quantized.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs) and ours
    for name in ours:
        torch.testing.assert_close(ours[name].grad, theirs[name].grad, msg=name)


def test_an_optimizer_step_leaves_the_quantized_weight_untouched():
    model = Block(QuantLinear.from_linear(float_linear(), compute_dtype=torch.float32))
    add_adapter(model, LoraConfig(target_modules=["proj"], r=4))
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    bias_before = model.proj.base_layer.bias.clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.1)
    model(torch.randn(4, 40, generator=generator(1))).square().sum().backward()
    optimizer.step()
    assert model.proj.base_layer.bias.grad is None and torch.equal(model.proj.base_layer.bias, bias_before)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert all(not buffer.requires_grad for buffer in model.buffers())
    assert model.proj.adapters["default"].lora_B.abs().sum() > 0  # the adapter did move


@pytest.mark.parametrize("use_dora", [False, True])
def test_merging_into_a_quantized_base_is_refused(use_dora):
    model = Block(QuantLinear.from_linear(float_linear(), compute_dtype=torch.float32))
    add_adapter(model, LoraConfig(target_modules=["proj"], r=4, use_dora=use_dora))
    untouched = copy.deepcopy(model.state_dict())
    for merge in (merge_adapters, merge_and_unload):
        with pytest.raises(AdapterError, match="dequantize-merge"):
            merge(model)
    assert all(torch.equal(value, untouched[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=3), r"bits=3 is not supported; choose 4 .* or 8"),
    (dict(quant_type="int4"), r"quant_type='int4' is not supported for bits=4; choose one of 'nf4', 'fp4'"),
    (dict(blocksize=100), r"blocksize=100 is not supported; choose one of 32, 64, 128, 256, 512, 1024, 2048, 4096"),
    (dict(compute_dtype=torch.int8), r"compute_dtype=torch.int8 is not supported; choose one of torch.bfloat16"),
])
def test_bad_settings_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantLinear.from_linear(float_linear(), **kwargs)
