"""Adapter compression: exact round trip at density 1 without ternarization, size arithmetic, loader, CLI report."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from tiny_models import perturb_trainable, sample_ids, tiny_chat_model_and_tokenizer, tiny_llama

from tuneforge.adapters import LoraConfig, add_adapter, load_adapter, save_adapter
from tuneforge.cli import main
from tuneforge.errors import AdapterError, ConfigError
from tuneforge.merge import read_lora
from tuneforge.merge.compress import (
    COMPRESSED_FILE,
    METADATA_KEY,
    compress_adapter,
    decompress_adapter,
    dequantize_vectors,
    from_sparse_ternary,
    load_compressed,
    measure_output_difference,
    pack_bits,
    quantize_vectors,
    sparse_ternary,
    unpack_bits,
)

QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=8, alpha=16, target_modules=QV))
    perturb_trainable(model, scale=0.1)
    save_adapter(model, root / "adapter")
    return root / "adapter"


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_bit_packing_round_trips(bits):
    codes = torch.randint(0, 2**bits, (37,))
    packed = pack_bits(codes, bits)
    assert packed.numel() == math.ceil(37 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 37), codes)


def test_density_one_without_ternarization_round_trips_exactly(adapter_dir, tmp_path):
    compress_adapter(adapter_dir, tmp_path / "c", density=1.0, ternarize=False)
    original, rebuilt = read_lora(adapter_dir), load_compressed(tmp_path / "c")
    for name, module in original.modules.items():
        assert torch.equal(rebuilt.modules[name].A, module.A) and torch.equal(rebuilt.modules[name].B, module.B)
        assert rebuilt.modules[name].scaling == module.scaling
    decompress_adapter(tmp_path / "c", tmp_path / "plain")
    models = [tiny_llama(), tiny_llama()]
    load_adapter(models[0], adapter_dir)
    load_adapter(models[1], tmp_path / "plain")
    with torch.no_grad():
        torch.testing.assert_close(models[1](sample_ids()).logits, models[0](sample_ids()).logits, atol=1e-6, rtol=0)


def test_sparse_ternary_keeps_top_k_with_the_mean_magnitude_scale():
    tensor = torch.tensor([[0.5, -2.0, 0.1], [3.0, -0.2, 1.0]])
    stored = sparse_ternary(tensor, density=0.5)  # k = 3: 3.0, -2.0, 1.0
    scale = (3.0 + 2.0 + 1.0) / 3
    assert stored["scale"].item() == pytest.approx(scale)
    expected = torch.tensor([[0.0, -scale, 0.0], [scale, 0.0, scale]])
    torch.testing.assert_close(from_sparse_ternary(stored, (2, 3), torch.float32), expected)


def test_sizes_follow_the_storage_arithmetic(adapter_dir, tmp_path):
    density = 0.1
    result = compress_adapter(adapter_dir, tmp_path / "c", density=density)
    adapter = read_lora(adapter_dir)
    expected = 0
    for module in adapter.modules.values():
        for factor in (module.A, module.B):
            n = factor.numel()
            k = max(1, int(density * n))
            expected += math.ceil(n / 8) + math.ceil(k / 8) + 4  # mask bits, sign bits, float32 scale
    assert result.compressed_bytes == expected
    assert result.original_bytes == sum(4 * (m.A.numel() + m.B.numel()) for m in adapter.modules.values())
    assert result.ratio == pytest.approx(result.original_bytes / expected)
    with safe_open(str(tmp_path / "c" / COMPRESSED_FILE), framework="pt") as handle:
        assert METADATA_KEY in handle.metadata()
        assert sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys()) == expected


def test_mixed_precision_gives_more_bits_to_the_top_directions(adapter_dir, tmp_path):
    result = compress_adapter(adapter_dir, tmp_path / "c", mixed_precision=True, top_rank=2, low_bits=3)
    adapter, rebuilt = read_lora(adapter_dir), load_compressed(tmp_path / "c")
    expected = 0
    for name, module in adapter.modules.items():
        out_f, in_f, r = module.shape[0], module.shape[1], module.rank
        expected += sum(math.ceil(rows * cols * bits / 8) + 2 * rows
                        for rows, bits in ((2, 8), (r - 2, 3)) for cols in (in_f, out_f))
        delta, approx = module.delta(), rebuilt.modules[name].delta()
        u, s, vh = torch.linalg.svd(delta)
        top2 = (u[:, :2] * s[:2]) @ vh[:2]
        # the 8-bit top directions are reproduced closely; the 3-bit rest adds a bounded error
        assert (approx - delta).norm() < 0.5 * delta.norm()
        assert ((approx - delta).norm() / delta.norm()) < ((top2 - delta).norm() / delta.norm()) + 0.2
    assert result.compressed_bytes == expected


def test_vector_quantization_error_shrinks_with_bits():
    vectors = torch.randn(4, 64)
    errors = [(dequantize_vectors(quantize_vectors(vectors, b), 4, 64, b) - vectors).norm() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.02 * vectors.norm()


def test_compress_cli_reports_ratio_and_kl(tmp_path, capsys, monkeypatch):
    model, tokenizer = tiny_chat_model_and_tokenizer()
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    add_adapter(model, LoraConfig(r=8, target_modules="all-linear"))
    perturb_trainable(model, scale=0.1)
    save_adapter(model, tmp_path / "adapter")
    assert main(["compress", str(tmp_path / "adapter"), str(tmp_path / "c"), "--density", "0.2",
                 "--model", str(tmp_path / "base"), "--eval-limit", "4"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "sparse ternary, density 0.2" in out and "ratio" in out and "mean KL" in out
    kl = measure_output_difference(tmp_path / "adapter", tmp_path / "c", limit=4,
                                   model_and_tokenizer=tiny_chat_model_and_tokenizer())
    lossless = tmp_path / "lossless"
    compress_adapter(tmp_path / "adapter", lossless, density=1.0, ternarize=False)
    exact = measure_output_difference(tmp_path / "adapter", lossless, limit=4,
                                      model_and_tokenizer=tiny_chat_model_and_tokenizer())
    assert kl > 1e-6 and exact < 1e-9


def test_bad_compress_input(adapter_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"density=1.5 is outside \(0, 1\]"):
        compress_adapter(adapter_dir, tmp_path / "a", density=1.5)
    with pytest.raises(ConfigError, match=r"density=0.0 is outside \(0, 1\]"):
        compress_adapter(adapter_dir, tmp_path / "a", density=0.0)
    (tmp_path / "exists").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        compress_adapter(adapter_dir, tmp_path / "exists")
    with pytest.raises(AdapterError, match="not written by tuneforge compress"):
        load_compressed(adapter_dir)
    assert main(["compress", str(adapter_dir), str(tmp_path / "b"), "--density", "2", "--eval-limit", "0"]) == 2
    assert "outside (0, 1]" in " ".join(capsys.readouterr().err.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


@pytest.mark.parametrize("bits", [2, 3])
def test_scale_search_is_never_worse_than_the_absmax_grid(bits):
    vectors = torch.randn(16, 128)
    levels = 2 ** (bits - 1) - 1
    absmax_scale = (vectors.abs().amax(dim=1) / levels).half().float()[:, None]
    absmax_error = (torch.clamp(torch.round(vectors / absmax_scale), -levels, levels) * absmax_scale - vectors).norm()
    searched = (dequantize_vectors(quantize_vectors(vectors, bits), 16, 128, bits) - vectors).norm()
    assert searched < absmax_error
