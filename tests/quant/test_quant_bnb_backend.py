"""The bitsandbytes decode backend: the definition's values on every machine, or the torch path.

The truth is the format's definition, ``codebook[code] * absmax[block]``, decoded here by hand; never
bitsandbytes' output, which differs by instruction set (issue 15: on AVX-512, wrong values in a
partial last block and +0.0 for FP4's -0.0). ``auto`` promises the definition's bits: it uses
bitsandbytes only where a probe decodes bit for bit, so its results are checked bit for bit. A forced
``bitsandbytes`` promises the definition's numbers or a clear error. Stand-in kernels that decode
wrong, the way AVX-512 does, check the fallback on any machine, with or without bitsandbytes.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.quant import QuantLinear, bnb_backend, codebook, dynamic_map, quantize_4bit

VARIABLE = bnb_backend.BACKEND_VARIABLE
CPU = torch.device("cpu")

needs_cpu_kernel = pytest.mark.skipif(
    not bnb_backend.has_native_kernel(CPU),
    reason="bitsandbytes cannot be imported here or has no native CPU kernel for dequantize_4bit "
           "(pip install bitsandbytes); the pure-torch path is tested on its own elsewhere",
)


@pytest.fixture(autouse=True)
def fresh_kernel_checks():
    """Each test probes afresh, and leaves no verdict on a stand-in kernel behind."""
    bnb_backend.forget_kernel_checks()
    yield
    bnb_backend.forget_kernel_checks()


def bits(tensor):
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[tensor.element_size()])


def quant_layer(out_features, in_features, quant_type, blocksize, double_quant, chunk_rows=None,
                compute_dtype=torch.float32):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        # tiny values get FP4's two zero codes, +0.0 and -0.0 (bit pattern 8), which must stay apart
        linear.weight.view(-1)[:8] = torch.tensor([0.0, 1e-6, -1e-6, 1e-6, 0.0, -1e-6, 1e-6, 1e-6])
    return QuantLinear.from_linear(linear, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                                   compute_dtype=compute_dtype, chunk_rows=chunk_rows)


def rows_by_definition(state, start, stop, dtype):
    """Rows [start, stop) decoded by hand: codebook[code] * absmax[block] in float32, then ``dtype``."""
    columns = state.shape[-1]
    packed = state.packed
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1).long()  # high nibble first
    element = torch.arange(start * columns, stop * columns)
    block = element // state.blocksize
    absmax = state.absmax
    if state.double_quant is not None:  # dynamic_map[code] * second-level absmax of its 256-group + offset
        second = state.double_quant
        absmax = dynamic_map()[absmax.long()] * second.absmax[torch.arange(absmax.numel()) // 256] + second.offset
    values = codebook(state.quant_type)[codes[element]] * absmax[block]
    return values.to(dtype).view(stop - start, columns)


def rows_with(backend, monkeypatch, layer, start, stop, dtype):
    monkeypatch.setenv(VARIABLE, backend)
    return layer.dequantize_rows(start, stop, dtype)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(7, 13), (33, 96), (300, 128)], ids=str)  # (7, 13): 91 values, no whole block
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_row_ranges_decode_as_defined(quant_type, double_quant, blocksize, shape, dtype, monkeypatch):
    layer = quant_layer(*shape, quant_type, blocksize, double_quant)
    state = layer.quant_state()
    check = bnb_backend.kernel_check(CPU, quant_type, blocksize)
    rows = shape[0]
    # whole weight, ranges starting and ending inside a block, and (300 x 128 at blocksize 32: 1200
    # blocks) ranges starting inside a 256-block group of the double-quantized absmax
    for start, stop in [(0, rows), (1, rows), (0, rows - 1), (rows // 3, rows // 2 + 1), (rows - 1, rows)]:
        expected = rows_by_definition(state, start, stop, dtype)
        auto = rows_with("auto", monkeypatch, layer, start, stop, dtype)
        assert torch.equal(bits(auto), bits(expected)), (start, stop)  # auto: bitsandbytes only where bit-exact
        if not check.equal_as_numbers:  # forced on a machine where bitsandbytes decodes wrong: refused
            with pytest.raises(ConfigError, match=f"{VARIABLE}=bitsandbytes"):
                rows_with("bitsandbytes", monkeypatch, layer, start, stop, dtype)
            continue
        forced = rows_with("bitsandbytes", monkeypatch, layer, start, stop, dtype)
        assert forced.shape == expected.shape and forced.dtype == dtype
        assert torch.equal(forced, expected), (start, stop)  # as numbers: a zero's sign may differ (see check)


@needs_cpu_kernel
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_forward_and_backward_equal_the_torch_path(quant_type, double_quant, compute_dtype, monkeypatch):
    # 70 x 90 at blocksize 64 with chunks of 3 rows: most chunks start and end inside a block
    layer = quant_layer(70, 90, quant_type, 64, double_quant, chunk_rows=3, compute_dtype=compute_dtype)
    x = torch.randn(2, 5, 90, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(2, 5, 70, generator=torch.Generator().manual_seed(2))
    results = {}
    for backend in ("torch", "auto"):
        monkeypatch.setenv(VARIABLE, backend)
        x_leaf = x.clone().requires_grad_()
        out = layer(x_leaf)
        out.backward(grad_out)
        results[backend] = out, x_leaf.grad
    (out_torch, grad_torch), (out_auto, grad_auto) = results["torch"], results["auto"]
    assert torch.equal(bits(out_auto), bits(out_torch))
    assert torch.equal(bits(grad_auto), bits(grad_torch))


@needs_cpu_kernel
def test_auto_takes_bitsandbytes_exactly_where_its_kernel_decodes_the_probe_bit_for_bit(monkeypatch):
    state = quantize_4bit(torch.randn(8, 64), "fp4", 64)
    monkeypatch.delenv(VARIABLE, raising=False)
    assert bnb_backend.use_bitsandbytes(state, torch.bfloat16) == bnb_backend.kernel_check(CPU, "fp4", 64).exact
    assert not bnb_backend.use_bitsandbytes(state, torch.float64)  # no bitsandbytes kernel writes float64
    monkeypatch.setenv(VARIABLE, " Torch ")
    assert not bnb_backend.use_bitsandbytes(state, torch.bfloat16)


def stand_in_bitsandbytes(flaw):
    """A bitsandbytes.functional whose dequantize_4bit decodes as defined, or with one of AVX-512's flaws.

    "positive_zero": FP4's code 0b1000 becomes +0.0; "partial_block": a partial last block comes out
    wrong (both seen with bitsandbytes 0.50.2 on an AVX-512 CPU, issue 15).
    """

    def dequantize_4bit(packed, quant_state):
        codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1).long()[: quant_state.shape.numel()]
        table = codebook(quant_state.quant_type)
        if flaw == "positive_zero":
            table = table + 0.0  # -0.0 + 0.0 is +0.0
        block = torch.arange(codes.numel()) // quant_state.blocksize
        values = (table[codes] * quant_state.absmax[block]).to(quant_state.dtype)
        partial = codes.numel() % quant_state.blocksize
        if flaw == "partial_block" and partial:
            values[-partial:] = values[-partial:] * 1.5 + 0.25
        return values.view(quant_state.shape)

    def dequantize_blockwise(codes, absmax, blocksize):
        return dynamic_map()[codes.long()] * absmax.repeat_interleave(blocksize)[: codes.numel()]

    return SimpleNamespace(QuantState=SimpleNamespace, dequantize_4bit=dequantize_4bit,
                           dequantize_blockwise=dequantize_blockwise)


def use_stand_in(monkeypatch, flaw):
    monkeypatch.setattr(bnb_backend, "_load", lambda: (stand_in_bitsandbytes(flaw), None))
    monkeypatch.setattr(bnb_backend, "has_native_kernel", lambda device, blocksize=64: True)


@pytest.mark.parametrize("flaw", ["partial_block", "positive_zero"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
def test_auto_falls_back_to_torch_with_one_log_line_when_bitsandbytes_disagrees(flaw, double_quant, monkeypatch,
                                                                              caplog):
    use_stand_in(monkeypatch, flaw)
    monkeypatch.setenv(VARIABLE, "auto")
    layer = quant_layer(7, 13, "fp4", 64, double_quant)  # 91 values: one partial block
    with caplog.at_level(logging.WARNING, logger=bnb_backend.__name__):
        assert not bnb_backend.use_bitsandbytes(layer.quant_state(), torch.float32)
        rows = layer.dequantize_rows(0, 7, torch.float32)
        layer(torch.randn(3, 13))
    assert torch.equal(bits(rows), bits(rows_by_definition(layer.quant_state(), 0, 7, torch.float32)))
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1, lines  # once per process, not once per decode
    assert all(word in lines[0] for word in ("bitsandbytes", "fp4", "blocksize 64", "pure-torch", VARIABLE))
    assert ("sign of zero" in lines[0]) == (flaw == "positive_zero")


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
def test_auto_uses_a_bitsandbytes_that_decodes_as_defined_without_a_word(double_quant, monkeypatch, caplog):
    use_stand_in(monkeypatch, flaw=None)
    monkeypatch.setenv(VARIABLE, "auto")
    layer = quant_layer(7, 13, "fp4", 64, double_quant)
    with caplog.at_level(logging.WARNING, logger=bnb_backend.__name__):
        assert bnb_backend.use_bitsandbytes(layer.quant_state(), torch.bfloat16)
        rows = layer.dequantize_rows(2, 6, torch.bfloat16)
    assert torch.equal(bits(rows), bits(rows_by_definition(layer.quant_state(), 2, 6, torch.bfloat16)))
    assert caplog.records == []


def test_forcing_a_bitsandbytes_that_decodes_wrong_values_is_an_error(monkeypatch):
    use_stand_in(monkeypatch, "partial_block")
    monkeypatch.setenv(VARIABLE, "bitsandbytes")
    layer = quant_layer(7, 13, "nf4", 64, True)
    with pytest.raises(ConfigError) as error:
        layer(torch.randn(2, 13))
    message = str(error.value)
    assert all(word in message for word in (f"{VARIABLE}=bitsandbytes", "nf4", "blocksize 64", "differ",
                                            f"{VARIABLE}=auto", "torch"))


def test_forcing_a_bitsandbytes_that_only_flips_the_sign_of_zero_is_allowed(monkeypatch):
    use_stand_in(monkeypatch, "positive_zero")
    monkeypatch.setenv(VARIABLE, "bitsandbytes")
    layer = quant_layer(7, 13, "fp4", 64, False)
    assert bnb_backend.use_bitsandbytes(layer.quant_state(), torch.float32)
    rows = layer.dequantize_rows(0, 7, torch.float32)
    expected = rows_by_definition(layer.quant_state(), 0, 7, torch.float32)
    assert torch.equal(rows, expected)  # equal as numbers
    assert not torch.equal(bits(rows), bits(expected))  # the stand-in did decode some -0.0 as +0.0


def test_a_bad_backend_value_names_the_variable_the_value_and_the_choices(monkeypatch):
    layer = quant_layer(8, 64, "nf4", 64, True)
    monkeypatch.setenv(VARIABLE, "cuda")
    with pytest.raises(ConfigError) as error:
        layer(torch.randn(2, 64))
    message = str(error.value)
    assert all(word in message for word in (VARIABLE, "'cuda'", "auto", "torch", "bitsandbytes"))


def test_forcing_bitsandbytes_where_it_cannot_import_says_so(monkeypatch):
    layer = quant_layer(8, 64, "nf4", 64, True)
    monkeypatch.setattr(bnb_backend, "_load", lambda: (None, "ImportError: no module named 'bitsandbytes'"))
    monkeypatch.setenv(VARIABLE, "bitsandbytes")
    with pytest.raises(ConfigError, match=f"{VARIABLE}=bitsandbytes.*cannot be imported.*ImportError"):
        layer(torch.randn(2, 64))
    monkeypatch.setenv(VARIABLE, "auto")  # auto quietly takes the torch path
    assert layer(torch.randn(2, 64)).shape == (2, 8)


def test_a_failing_bitsandbytes_import_is_silent_and_means_not_available(tmp_path, monkeypatch, capsys):
    # a stand-in for bitsandbytes on a machine without its CUDA libraries: it prints, logs, then raises
    fake = tmp_path / "bitsandbytes"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import logging, sys, warnings\n"
        "print('CUDA Setup failed')\n"
        "sys.stderr.write('libcudart.so not found\\n')\n"
        "warnings.warn('no GPU')\n"
        "logging.getLogger('bitsandbytes.cextension').error('bitsandbytes library load error')\n"
        "raise RuntimeError('no CUDA libraries')\n"
    )
    for name in [name for name in sys.modules if name.split(".")[0] == "bitsandbytes"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    functional, why_not = bnb_backend._load.__wrapped__()  # uncached, so the real result stays cached
    assert functional is None and "no CUDA libraries" in why_not
    assert capsys.readouterr() == ("", "")


def test_importing_tuneforge_does_not_import_bitsandbytes():
    code = "import sys, tuneforge.quant, tuneforge.adapters; print('bitsandbytes' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
