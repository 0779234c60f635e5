"""AdamW8bit: the maps are bitsandbytes', the states are ~2 bytes/param, and training tracks AdamW."""

from __future__ import annotations

import copy

import pytest
import torch

from tuneforge.quant.codebooks import dynamic_map, unsigned_dynamic_map
from tuneforge.quant.optim8bit import AdamW8bit, dequantize_state, quantize_state


def test_unsigned_map_shape_and_values():
    table = unsigned_dynamic_map()
    assert table.numel() == 256 and table[0] == 0 and table[-1] == 1
    assert torch.all(table[1:] > table[:-1])
    # Decade 0 (10^-6) has 2 values: the midpoints of linspace(0.1, 1, 3).
    torch.testing.assert_close(table[1:3], torch.tensor([0.325e-6, 0.775e-6]))


def test_maps_equal_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the oracle for the optimizer maps")
    param = torch.nn.Parameter(torch.randn(128, 64))
    optimizer = bnb.optim.AdamW8bit([param], lr=1e-3)
    param.grad = torch.randn_like(param)
    optimizer.step()
    assert torch.equal(optimizer.state[param]["qmap1"], dynamic_map())
    assert torch.equal(optimizer.state[param]["qmap2"], unsigned_dynamic_map())


def test_state_round_trip_error_is_small_relative_to_block_absmax():
    values = torch.randn(10_000) * torch.logspace(-4, 0, 10_000)
    codes, absmax = quantize_state(values, dynamic_map())
    back = dequantize_state(codes, absmax, dynamic_map())
    scale = absmax.repeat_interleave(256)[: values.numel()]
    assert ((back - values).abs() / scale).max() < 0.02  # the map's largest gap near ±1 is ~0.014
    assert codes.dtype == torch.uint8


def _regression_run(optimizer_class, steps=60, **kwargs):
    torch.manual_seed(0)
    inputs, true_w = torch.randn(256, 96), torch.randn(96, 64)
    targets = inputs @ true_w
    weight = torch.nn.Parameter(torch.zeros(96, 64))
    bias = torch.nn.Parameter(torch.zeros(64))  # small: stays float32
    optimizer = optimizer_class([weight, bias], lr=0.05, weight_decay=0.01, **kwargs)
    losses = []
    for _ in range(steps):
        loss = ((inputs @ weight + bias - targets) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return weight.detach(), losses, optimizer


def test_training_tracks_float_adamw():
    ours, our_losses, optimizer = _regression_run(AdamW8bit)
    ref, ref_losses, _ = _regression_run(torch.optim.AdamW)
    assert our_losses[-1] < 0.05 * our_losses[0]
    assert abs(our_losses[-1] - ref_losses[-1]) / ref_losses[-1] < 0.1
    assert (ours - ref).norm() / ref.norm() < 0.02
    state = optimizer.state[next(iter(optimizer.state))]
    assert state["m_codes"].dtype == torch.uint8 and "m" in optimizer.state[optimizer.param_groups[0]["params"][1]]


def test_state_memory_is_about_a_quarter_of_adamw():
    _, _, ours = _regression_run(AdamW8bit, steps=1)
    values = 96 * 64 + 64
    float_state = 2 * 4 * values
    assert ours.state_nbytes() < 0.3 * float_state


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(80, 80))
    optimizer = AdamW8bit([weight], lr=1e-2)
    grads = [torch.randn(80, 80) for _ in range(4)]
    for grad in grads[:2]:
        weight.grad = grad.clone()
        optimizer.step()
    saved_weight, saved_state = weight.detach().clone(), copy.deepcopy(optimizer.state_dict())
    for grad in grads[2:]:
        weight.grad = grad.clone()
        optimizer.step()
    expected = weight.detach().clone()
    resumed_weight = torch.nn.Parameter(saved_weight)
    resumed = AdamW8bit([resumed_weight], lr=1e-2)
    resumed.load_state_dict(saved_state)
    for grad in grads[2:]:
        resumed_weight.grad = grad.clone()
        resumed.step()
    assert torch.equal(resumed_weight.detach(), expected)


def test_invalid_settings_are_named():
    with pytest.raises(ValueError, match="lr=-1"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(2))], lr=-1)
