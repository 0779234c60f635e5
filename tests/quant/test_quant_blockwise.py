"""The 4-bit blockwise format, double quantization and int8, checked without bitsandbytes."""

from __future__ import annotations

import pytest
import torch

from tuneforge.quant import (
    codebook,
    dequantize_4bit,
    dequantize_int8,
    dequantize_rows,
    dynamic_map,
    quantize_4bit,
    quantize_int8,
)
from tuneforge.quant.blockwise import dequantize_dynamic_8bit, quantize_dynamic_8bit
from tuneforge.quant.codebooks import normal_float_quantiles


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def relative_error(approx, exact):
    return ((approx.float() - exact.float()).norm() / exact.float().norm()).item()


def test_nf4_table_is_normal_quantiles_normalised():
    table = codebook("nf4")
    torch.testing.assert_close(table, normal_float_quantiles().float(), rtol=0, atol=2e-7)
    assert table[0] == -1 and table[7] == 0 and table[15] == 1 and bool((table.diff() > 0).all())


def test_fp4_table_is_sign_exponent_mantissa_over_12():
    magnitudes = sorted({abs(v) for v in codebook("fp4").tolist()})
    expected = sorted({0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0})
    assert magnitudes == pytest.approx([v / 12 for v in expected], abs=1e-7)
    assert bool((codebook("fp4")[8:] <= 0).all())  # bit 3 is the sign


def test_dynamic_map_has_256_sorted_values_with_zero_and_one():
    table = dynamic_map()
    assert table.numel() == 256 and bool((table.diff() > 0).all())
    assert table[127] == 0 and table[255] == 1 and table[0] > -1


def test_first_code_goes_to_the_high_nibble():
    state = quantize_4bit(torch.tensor([1.0, -1.0, 0.0, 1.0]), "nf4", 64)
    assert state.packed.tolist() == [0xF0, 0x7F]  # codes 15, 0 | 7, 15


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_value_halfway_between_two_codes_takes_the_lower_one(quant_type):
    values, _ = codebook(quant_type).sort()
    lower, upper = values[9], values[10]
    midpoint = (lower + upper) / 2
    nudged_up = torch.nextafter(midpoint, torch.tensor(2.0))
    block = torch.stack([torch.tensor(1.0), midpoint, nudged_up])  # absmax is 1: values are their own scale
    restored = dequantize_4bit(quantize_4bit(block, quant_type, 64))
    assert restored[1] == lower and restored[2] == upper


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_round_trip_error_on_gaussian_weights(double_quant):
    weight = gaussian(256, 512)
    restored = dequantize_4bit(quantize_4bit(weight, "nf4", 64, double_quant))
    assert restored.shape == weight.shape and restored.dtype == weight.dtype
    assert relative_error(restored, weight) < 0.1  # measured 0.092 at blocksize 64
    per_element_bound = weight.abs().max() * (1 - 0.7229568) / 2 * 1.01  # widest NF4 gap, half of it
    assert (restored - weight).abs().max() <= per_element_bound


def test_larger_blocks_cost_accuracy():
    weight = gaussian(64, 1024)
    errors = [relative_error(dequantize_4bit(quantize_4bit(weight, "nf4", b)), weight) for b in (32, 256, 4096)]
    assert errors == sorted(errors)


@pytest.mark.parametrize("shape, blocksize", [((7, 13), 64), ((3, 5, 11), 32), ((1, 1), 4096), ((65,), 64)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_sizes_not_a_multiple_of_the_blocksize_are_padded(shape, blocksize, double_quant):
    weight = gaussian(*shape)
    state = quantize_4bit(weight, "nf4", blocksize, double_quant=double_quant)
    numel = weight.numel()
    assert state.packed.numel() == -(-numel // 2) and state.absmax.numel() == -(-numel // blocksize)
    restored = dequantize_4bit(state)
    assert restored.shape == weight.shape
    assert relative_error(restored, weight) < 0.15
    if not double_quant:  # the partial last block is scaled by its own values, not by the zero padding
        last_block = weight.reshape(-1)[(state.blocks - 1) * blocksize:]
        assert restored.reshape(-1)[-last_block.numel():].abs().max() == last_block.abs().max()


def test_all_zero_blocks_stay_zero():
    weight = torch.zeros(4, 64)
    weight[1] = gaussian(64)
    for quant_type in ("nf4", "fp4"):
        restored = dequantize_4bit(quantize_4bit(weight, quant_type, 64, double_quant=True))
        assert bool((restored[0] == 0).all()) and bool(torch.isfinite(restored).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_in_and_out(dtype):
    weight = gaussian(32, 64).to(dtype)
    restored = dequantize_4bit(quantize_4bit(weight, "nf4", 64))
    assert restored.dtype == dtype
    assert relative_error(restored, weight) < 0.1
    assert dequantize_4bit(quantize_4bit(weight, "nf4", 64), torch.float32).dtype == torch.float32


def test_rows_dequantize_exactly_like_the_whole_tensor():
    weight = gaussian(33, 95)  # rows straddle block boundaries
    state = quantize_4bit(weight, "fp4", 64, double_quant=True)
    full = dequantize_4bit(state)
    for start, stop in [(0, 1), (1, 5), (7, 33), (32, 33), (0, 33)]:
        assert torch.equal(dequantize_rows(state, start, stop), full[start:stop])


def test_double_quant_storage_and_accuracy():
    weight = gaussian(256, 4096)
    plain = quantize_4bit(weight, "nf4", 64)
    double = quantize_4bit(weight, "nf4", 64, double_quant=True)
    blocks = weight.numel() // 64
    assert plain.nbytes() == weight.numel() // 2 + 4 * blocks
    assert double.nbytes() == weight.numel() // 2 + blocks + 4 * (blocks // 256) + 4
    assert 8 * double.nbytes() / weight.numel() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
    # the absmax error from 8 bits adds little to the 4-bit error
    assert relative_error(dequantize_4bit(double), weight) < relative_error(dequantize_4bit(plain), weight) * 1.01


def test_dynamic_8bit_picks_the_nearest_map_value():
    values = gaussian(1000) * 3
    codes, absmax = quantize_dynamic_8bit(values, 256)
    table = dynamic_map()
    for block in range(4):
        part = values[block * 256:(block + 1) * 256]
        normed = part / absmax[block]
        distance = (normed - table[codes[block * 256:(block + 1) * 256].long()]).abs()
        assert bool((distance <= (normed.unsqueeze(1) - table).abs().amin(dim=1)).all())
    assert relative_error(dequantize_dynamic_8bit(codes, absmax, 256), values) < 0.02  # measured 0.012


def test_int8_matches_its_formula_and_bounds():
    weight = gaussian(16, 40)
    weight[3] = 0
    state = quantize_int8(weight)
    absmax = weight.abs().amax(dim=1)
    expected = torch.round(weight / absmax.clamp(min=1e-38).unsqueeze(1) * 127).to(torch.int8)
    assert torch.equal(state.qweight, expected)
    restored = dequantize_int8(state)
    assert bool((restored[3] == 0).all())
    assert bool(((restored - weight).abs() <= absmax.unsqueeze(1) / 254 + 1e-7).all())
    assert state.nbytes() == weight.numel() + 4 * weight.shape[0]


@pytest.mark.parametrize("call, message", [
    (lambda: quantize_4bit(torch.ones(64), "int4"), "choose one of nf4, fp4"),
    (lambda: quantize_4bit(torch.ones(64), "nf4", 100), "choose one of 32, 64"),
    (lambda: quantize_4bit(torch.ones(64, dtype=torch.int32)), "floating-point"),
    (lambda: quantize_int8(torch.ones(4)), "2-D"),
])
def test_bad_arguments_name_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantizing_in_chunks_gives_the_same_state(monkeypatch, quant_type, double_quant):
    """Large tensors are quantized a chunk of blocks at a time (to keep loading's peak memory low);
    blocks are independent, so a tiny chunk must give exactly the one-piece result."""
    import tuneforge.quant.blockwise as blockwise

    weight = gaussian(37, 101)  # 3737 values: odd, and the last block runs short
    whole = quantize_4bit(weight, quant_type, blocksize=64, double_quant=double_quant)
    monkeypatch.setattr(blockwise, "QUANTIZE_CHUNK", 256)  # 15 chunks of 4 blocks
    chunked = quantize_4bit(weight, quant_type, blocksize=64, double_quant=double_quant)
    assert torch.equal(chunked.packed, whole.packed)
    assert torch.equal(chunked.absmax, whole.absmax)
    if double_quant:
        assert torch.equal(chunked.double_quant.absmax, whole.double_quant.absmax)
        assert torch.equal(chunked.double_quant.offset, whole.double_quant.offset)
