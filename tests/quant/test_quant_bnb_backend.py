"""The bitsandbytes backend decodes 4-bit weights to the same bits as the pure-torch path.

Each check runs once with TUNEFORGE_QUANT_BACKEND=torch and once with =bitsandbytes and compares
raw bits, so FP4's negative zero or a different rounding to bfloat16 would show.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from tuneforge.errors import ConfigError
from tuneforge.quant import QuantLinear, bnb_backend, quantize_4bit

VARIABLE = bnb_backend.BACKEND_VARIABLE
CPU = torch.device("cpu")

needs_cpu_kernel = pytest.mark.skipif(
    not bnb_backend.has_native_kernel(CPU),
    reason="bitsandbytes cannot be imported here or has no native CPU kernel for dequantize_4bit "
           "(pip install bitsandbytes); the pure-torch path is tested on its own elsewhere",
)


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


def rows_with(backend, monkeypatch, layer, start, stop, dtype):
    monkeypatch.setenv(VARIABLE, backend)
    assert bnb_backend.use_bitsandbytes(layer.quant_state(), dtype) == (backend == "bitsandbytes")
    return layer.dequantize_rows(start, stop, dtype)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(7, 13), (33, 96), (300, 128)], ids=str)  # (7, 13): 91 values, no whole block
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_row_ranges_are_bit_exact(quant_type, double_quant, blocksize, shape, dtype, monkeypatch):
    layer = quant_layer(*shape, quant_type, blocksize, double_quant)
    rows = shape[0]
    # whole weight, ranges starting and ending inside a block, and (300 x 128 at blocksize 32: 1200
    # blocks) ranges starting inside a 256-block group of the double-quantized absmax
    for start, stop in [(0, rows), (1, rows), (0, rows - 1), (rows // 3, rows // 2 + 1), (rows - 1, rows)]:
        ours = rows_with("torch", monkeypatch, layer, start, stop, dtype)
        theirs = rows_with("bitsandbytes", monkeypatch, layer, start, stop, dtype)
        assert theirs.shape == ours.shape == (stop - start, shape[1]) and theirs.dtype == dtype
        assert torch.equal(bits(theirs), bits(ours)), (start, stop)


@needs_cpu_kernel
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_forward_and_backward_are_bit_exact(quant_type, double_quant, compute_dtype, monkeypatch):
    # 70 x 90 at blocksize 64 with chunks of 3 rows: most chunks start and end inside a block
    layer = quant_layer(70, 90, quant_type, 64, double_quant, chunk_rows=3, compute_dtype=compute_dtype)
    x = torch.randn(2, 5, 90, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(2, 5, 70, generator=torch.Generator().manual_seed(2))
    results = {}
    for backend in ("torch", "bitsandbytes"):
        monkeypatch.setenv(VARIABLE, backend)
        x_leaf = x.clone().requires_grad_()
        out = layer(x_leaf)
        out.backward(grad_out)
        results[backend] = out, x_leaf.grad
    (out_torch, grad_torch), (out_bnb, grad_bnb) = results["torch"], results["bitsandbytes"]
    assert torch.equal(bits(out_bnb), bits(out_torch))
    assert torch.equal(bits(grad_bnb), bits(grad_torch))


@needs_cpu_kernel
def test_auto_takes_bitsandbytes_where_its_kernel_runs(monkeypatch):
    state = quantize_4bit(torch.randn(8, 64), "nf4", 64)
    monkeypatch.delenv(VARIABLE, raising=False)
    assert bnb_backend.use_bitsandbytes(state, torch.bfloat16)
    assert not bnb_backend.use_bitsandbytes(state, torch.float64)  # no bitsandbytes kernel writes float64
    monkeypatch.setenv(VARIABLE, " Torch ")
    assert not bnb_backend.use_bitsandbytes(state, torch.bfloat16)


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
