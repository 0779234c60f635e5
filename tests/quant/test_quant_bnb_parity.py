"""Bit-exactness against bitsandbytes (a test oracle only, never a runtime dependency).

Checked on bitsandbytes' CPU backend: packed 4-bit codes, absmax, double quantization's offset and
second-level absmax, and dequantized values. One known difference: bitsandbytes' CPU 8-bit kernel
(used for double quantization's absmax codes) finds its code with an approximate table search and
can take a neighbour of the nearest code when the value lies within ~2e-5 of a rounding midpoint;
we always take the nearest (ties to the lower). Those codes are checked against that rule, and the
dequantizer is checked bit for bit on bitsandbytes' own codes.
"""

from __future__ import annotations

import pytest
import torch

from tuneforge.quant import DoubleQuant, QuantState, codebook, dequantize_4bit, dynamic_map, quantize_4bit
from tuneforge.quant.blockwise import quantize_dynamic_8bit

bnb_functional = pytest.importorskip(
    "bitsandbytes.functional",
    reason="bitsandbytes is the bit-exactness oracle for 4-bit quantization: pip install bitsandbytes",
)

SHAPES = [(64, 128), (33, 96), (7, 13), (3, 5, 64)]  # (7, 13): 91 values, not a multiple of any blocksize
BLOCKSIZES = [32, 64, 256, 4096]
APPROXIMATE_SEARCH_WINDOW = 2e-5  # how far from a midpoint bitsandbytes' CPU 8-bit search may misstep


def weights(shape, dtype, seed=0):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    weight.view(-1)[:3] = 0  # zeros exercise the zero codes (FP4 has two)
    return weight


def bits(tensor):
    """The raw bits, so that -0.0 and 0.0 or NaN payloads would count as different."""
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[tensor.element_size()])


def as_our_state(packed, bnb_state):
    second = None
    if bnb_state.nested:
        second = DoubleQuant(absmax=bnb_state.state2.absmax, offset=bnb_state.offset)
    return QuantState(packed=packed.reshape(-1), absmax=bnb_state.absmax, shape=bnb_state.shape,
                      dtype=bnb_state.dtype, blocksize=bnb_state.blocksize, quant_type=bnb_state.quant_type,
                      double_quant=second)


def test_codebooks_equal_bitsandbytes():
    assert torch.equal(bits(codebook("nf4")), bits(bnb_functional.get_4bit_type("nf4", device="cpu")))
    # FP4 pattern 0b1000: our -0.0 is what bitsandbytes' kernels decode; its Python table says +0.0
    assert torch.equal(codebook("fp4"), bnb_functional.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(bits(dynamic_map()), bits(bnb_functional.create_dynamic_map()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_codes_absmax_and_dequantization_are_bit_exact(quant_type, blocksize, shape, dtype):
    weight = weights(shape, dtype)
    packed, bnb_state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type)
    ours = quantize_4bit(weight, quant_type, blocksize)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(bits(ours.absmax), bits(bnb_state.absmax))
    reference = bnb_functional.dequantize_4bit(packed, bnb_state)
    if shape[-1] % 2 == 0:  # bitsandbytes' C++ kernel: decodes FP4 0b1000 as -0.0, like us
        assert torch.equal(bits(dequantize_4bit(ours)), bits(reference))
    else:  # its PyTorch fallback reads the Python table (+0.0 there): equal as numbers
        assert torch.equal(dequantize_4bit(ours), reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 128), (33, 96), (256, 1024)], ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant_matches_bitsandbytes(quant_type, blocksize, shape, dtype):
    weight = weights(shape, dtype, seed=1)
    packed, bnb_state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type,
                                                     compress_statistics=True)
    ours = quantize_4bit(weight, quant_type, blocksize, double_quant=True)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(bits(ours.double_quant.offset), bits(bnb_state.offset))
    assert torch.equal(bits(ours.double_quant.absmax), bits(bnb_state.state2.absmax))
    # the 8-bit absmax codes: equal, or bitsandbytes' approximate search stepped off the nearest code
    differ = ours.absmax != bnb_state.absmax
    if differ.any():
        _, plain_state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type)
        groups = torch.arange(ours.blocks) // 256
        normed = ((plain_state.absmax - bnb_state.offset) / bnb_state.state2.absmax[groups])[differ]
        table = dynamic_map()
        ours_distance = (normed - table[ours.absmax[differ].long()]).abs()
        theirs_distance = (normed - table[bnb_state.absmax[differ].long()]).abs()
        assert bool((ours_distance <= theirs_distance).all())
        assert bool((theirs_distance - ours_distance <= 2 * APPROXIMATE_SEARCH_WINDOW).all())
        assert differ.float().mean() < 0.01
    # our dequantizer on bitsandbytes' own state gives bitsandbytes' values bit for bit
    reference = bnb_functional.dequantize_4bit(packed, bnb_state)
    assert torch.equal(bits(dequantize_4bit(as_our_state(packed, bnb_state))), bits(reference))
    if not differ.any():
        assert torch.equal(bits(dequantize_4bit(ours)), bits(reference))


def test_dynamic_8bit_agrees_with_bitsandbytes_up_to_its_search_window():
    values = torch.randn(256 * 64, generator=torch.Generator().manual_seed(3))
    values = values * 10.0 ** -torch.randint(0, 3, values.shape, generator=torch.Generator().manual_seed(4))
    theirs, their_state = bnb_functional.quantize_blockwise(values, blocksize=256)
    ours, absmax = quantize_dynamic_8bit(values, 256)
    assert torch.equal(bits(absmax), bits(their_state.absmax))
    table = dynamic_map()
    normed = values / absmax.repeat_interleave(256)
    ours_distance = (normed - table[ours.long()]).abs()
    theirs_distance = (normed - table[theirs.long()]).abs()
    assert bool((ours_distance <= theirs_distance).all())  # ours is always the nearest
    assert bool((theirs_distance - ours_distance <= 2 * APPROXIMATE_SEARCH_WINDOW).all())
