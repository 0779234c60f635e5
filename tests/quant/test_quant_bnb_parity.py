"""The 4-bit format against its definition, and against bitsandbytes where bitsandbytes is the same everywhere.

The ground truth of a decode is its definition, computed here without tuneforge's decoder::

    value  = codebook[code] * absmax[block]       float32, then rounded once to the output dtype
    absmax = dynamic_map[absmax_code] * second_absmax[block // 256] + offset    (double quantization)

bitsandbytes (a test oracle only, never a runtime dependency) is trusted only for what it computes
the same way on every instruction set: the packed codes and absmax of ``quantize_4bit`` (pure
PyTorch in its CPU backend), double quantization's offset and second-level absmax, and the
codebooks. Its dequantize kernels are not an oracle: on an AVX-512 CPU, bitsandbytes 0.50.2 decodes
wrong values in a partial last block and +0.0 for FP4's -0.0 (issue 15), while on AVX2 and CUDA it
decodes as defined. No check here calls them.

Double quantization's 8-bit absmax codes are the nearest code (ties to the lower), checked against
that rule. bitsandbytes' CPU 8-bit kernel searches the table approximately and can take a code a
little farther away when the value lies within ~2e-5 of a rounding midpoint: up to 1% of blocks.
"""

from __future__ import annotations

import pytest
import torch

from tuneforge.quant import DoubleQuant, QuantState, codebook, dequantize_4bit, dynamic_map, quantize_4bit
from tuneforge.quant.blockwise import quantize_dynamic_8bit

bnb_functional = pytest.importorskip(
    "bitsandbytes.functional",
    reason="bitsandbytes is the oracle for 4-bit codes, absmax and codebooks: pip install bitsandbytes",
)

SHAPES = [(64, 128), (33, 96), (7, 13), (3, 5, 64)]  # (7, 13): 91 values, not a multiple of any blocksize
BLOCKSIZES = [32, 64, 256, 4096]
APPROXIMATE_SEARCH_WINDOW = 2e-5  # how far from a midpoint bitsandbytes' CPU 8-bit search may misstep
MAX_SHARE_OF_APPROXIMATE_CODES = 0.01  # of double-quantized blocks whose absmax code differs from bitsandbytes'


def weights(shape, dtype, seed=0):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    weight.view(-1)[:3] = 0  # zeros exercise the zero codes (FP4 has two)
    return weight


def bits(tensor):
    """The raw bits, so that -0.0 and 0.0 or NaN payloads count as different."""
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[tensor.element_size()])


def assert_same_values(actual, expected):
    """Equal as numbers, and bit for bit wherever the value is not zero.

    Only the sign of a zero may differ: FP4's code 0b1000 is -0.0 in our table (sign bit set, zero
    magnitude: what bitsandbytes' CUDA and AVX2 kernels decode), +0.0 in bitsandbytes' Python table
    (the codebook oracle here). -0.0 == +0.0, and no sum with a non-zero term can tell them apart.
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected)  # IEEE equality: -0.0 == +0.0, and every other value bit for bit


def unpack_codes(packed, numel):
    """The 4-bit codes in element order: element 2k in the high nibble of byte k, 2k+1 in the low."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:numel].long()


def decode_by_definition(packed, absmax, quant_type, blocksize, shape, dtype):
    """codebook[code] * absmax[block] in float32 with bitsandbytes' codebook, rounded once to ``dtype``."""
    numel = torch.Size(shape).numel()
    table = bnb_functional.get_4bit_type(quant_type, device="cpu")
    block = torch.arange(numel) // blocksize
    return (table[unpack_codes(packed.reshape(-1), numel)] * absmax[block]).to(dtype).reshape(shape)


def double_quant_absmax_by_definition(codes, second_absmax, offset):
    group = torch.arange(codes.numel()) // 256
    return bnb_functional.create_dynamic_map()[codes.long()] * second_absmax[group] + offset


def nearest_dynamic_codes(normed):
    """Index of the nearest dynamic-map value; argmin takes the first (lower) one on a tie."""
    return (normed.unsqueeze(1) - bnb_functional.create_dynamic_map().unsqueeze(0)).abs().argmin(dim=1)


def as_our_state(packed, bnb_state):
    second = None
    if bnb_state.nested:
        second = DoubleQuant(absmax=bnb_state.state2.absmax, offset=bnb_state.offset)
    return QuantState(packed=packed.reshape(-1), absmax=bnb_state.absmax, shape=bnb_state.shape,
                      dtype=bnb_state.dtype, blocksize=bnb_state.blocksize, quant_type=bnb_state.quant_type,
                      double_quant=second)


def test_codebooks_equal_bitsandbytes():
    assert torch.equal(bits(codebook("nf4")), bits(bnb_functional.get_4bit_type("nf4", device="cpu")))
    # FP4 pattern 0b1000: our -0.0 (see assert_same_values); bitsandbytes' Python table says +0.0
    assert torch.equal(codebook("fp4"), bnb_functional.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(bits(dynamic_map()), bits(bnb_functional.create_dynamic_map()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fp4_sign_bit_with_zero_magnitude_decodes_to_negative_zero(dtype):
    # FP4 is sign | 2-bit exponent | 1-bit mantissa; 0b1000 is the sign bit on a zero magnitude
    state = QuantState(packed=torch.tensor([0x80, 0x08], dtype=torch.uint8), absmax=torch.tensor([2.5]),
                       shape=torch.Size([4]), dtype=dtype, blocksize=64, quant_type="fp4")
    decoded = dequantize_4bit(state)
    assert torch.equal(bits(decoded), bits(torch.tensor([-0.0, 0.0, 0.0, -0.0], dtype=dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_codes_and_absmax_equal_bitsandbytes_and_decode_as_defined(quant_type, blocksize, shape, dtype):
    weight = weights(shape, dtype)
    packed, bnb_state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type)
    ours = quantize_4bit(weight, quant_type, blocksize)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(bits(ours.absmax), bits(bnb_state.absmax))
    expected = decode_by_definition(ours.packed, ours.absmax, quant_type, blocksize, shape, dtype)
    assert_same_values(dequantize_4bit(ours), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(64, 128), (33, 96), (256, 1024)], ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant_matches_its_definition_and_bitsandbytes(quant_type, blocksize, shape, dtype):
    weight = weights(shape, dtype, seed=1)
    packed, bnb_state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type,
                                                     compress_statistics=True)
    _, plain_state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type)
    ours = quantize_4bit(weight, quant_type, blocksize, double_quant=True)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(bits(ours.double_quant.offset), bits(bnb_state.offset))
    assert torch.equal(bits(ours.double_quant.absmax), bits(bnb_state.state2.absmax))

    # our absmax codes are the nearest codes to (absmax - offset) / second-level absmax
    groups = torch.arange(ours.blocks) // 256
    normed = (plain_state.absmax - bnb_state.offset) / bnb_state.state2.absmax[groups]
    assert torch.equal(ours.absmax.long(), nearest_dynamic_codes(normed))
    # bitsandbytes' approximate search: a few codes differ, each almost as near as ours
    differ = ours.absmax != bnb_state.absmax
    assert differ.float().mean() <= MAX_SHARE_OF_APPROXIMATE_CODES
    table = dynamic_map()
    ours_distance = (normed - table[ours.absmax.long()]).abs()
    theirs_distance = (normed - table[bnb_state.absmax.long()]).abs()
    assert bool((theirs_distance - ours_distance <= 2 * APPROXIMATE_SEARCH_WINDOW).all())

    # the decode, ours and read from bitsandbytes' own state, follows the definition
    for state in (ours, as_our_state(packed, bnb_state)):
        absmax = double_quant_absmax_by_definition(state.absmax, state.double_quant.absmax, state.double_quant.offset)
        expected = decode_by_definition(state.packed, absmax, quant_type, blocksize, shape, dtype)
        assert_same_values(dequantize_4bit(state), expected)


def test_dynamic_8bit_codes_are_nearest_and_bitsandbytes_within_its_search_window():
    values = torch.randn(256 * 64, generator=torch.Generator().manual_seed(3))
    values = values * 10.0 ** -torch.randint(0, 3, values.shape, generator=torch.Generator().manual_seed(4))
    theirs, their_state = bnb_functional.quantize_blockwise(values, blocksize=256)
    ours, absmax = quantize_dynamic_8bit(values, 256)
    assert torch.equal(bits(absmax), bits(their_state.absmax))
    normed = values / absmax.repeat_interleave(256)
    assert torch.equal(ours.long(), nearest_dynamic_codes(normed))
    table = dynamic_map()
    ours_distance = (normed - table[ours.long()]).abs()
    theirs_distance = (normed - table[theirs.long()]).abs()
    assert bool((theirs_distance - ours_distance <= 2 * APPROXIMATE_SEARCH_WINDOW).all())
