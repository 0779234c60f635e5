"""``precision: auto`` / ``dtype: auto`` follow the hardware; the capability queries are faked here."""

from __future__ import annotations

import pytest
import torch
import yaml
from tiny_models import tiny_chat_model_and_tokenizer, tiny_llama

from tuneforge.adapters import LoraConfig, add_adapter
from tuneforge.config import parse_train_config
from tuneforge.models import precision
from tuneforge.models.precision import PrecisionChoice, choose_precision, parse_cpu_flags, without_loss_scaler
from tuneforge.train import train

# The real query, taken before conftest's autouse fixture replaces it with "no bf16 units".
REAL_BF16_QUERY = precision.cpu_multiplies_bf16_natively

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def fake_cpu(monkeypatch, native_bf16: bool):
    monkeypatch.setattr(precision, "cpu_multiplies_bf16_natively", lambda: native_bf16)


def fake_gpu(monkeypatch, bf16: bool):
    monkeypatch.setattr(precision, "cuda_supports_bf16", lambda device: bf16)


@pytest.mark.parametrize("native, expected", [(True, ("bf16", "bfloat16")), (False, ("fp32", "float32"))])
def test_auto_on_a_cpu_follows_its_bf16_units(monkeypatch, native, expected):
    fake_cpu(monkeypatch, native)
    choice = choose_precision("auto", "auto", CPU)
    assert (choice.precision, choice.weights_dtype) == expected


@pytest.mark.parametrize("bf16, expected", [(True, ("bf16", "bfloat16")), (False, ("fp16", "float32"))])
def test_auto_on_a_gpu_takes_bf16_or_scaled_fp16(monkeypatch, bf16, expected):
    fake_gpu(monkeypatch, bf16)
    fake_cpu(monkeypatch, False)  # the GPU decides, not the host CPU
    choice = choose_precision("auto", "auto", CUDA)
    assert (choice.precision, choice.weights_dtype) == expected


@pytest.mark.parametrize("asked_precision, asked_dtype, expected", [
    ("fp32", "auto", ("fp32", "float32")),  # explicit fp32 on a bf16 CPU: weights stay float32 too
    ("fp16", "auto", ("fp16", "float32")),
    ("auto", "float32", ("bf16", "float32")),
    ("bf16", "float16", ("bf16", "float16")),
])
def test_an_explicit_setting_wins(monkeypatch, asked_precision, asked_dtype, expected):
    fake_cpu(monkeypatch, True)
    choice = choose_precision(asked_precision, asked_dtype, CPU)
    assert (choice.precision, choice.weights_dtype) == expected


def test_weights_that_train_stay_float32_under_auto(monkeypatch):
    fake_cpu(monkeypatch, True)
    full = choose_precision("auto", "auto", CPU, trains_base_weights=True)
    assert (full.precision, full.weights_dtype) == ("bf16", "float32")
    assert choose_precision("auto", "bfloat16", CPU, trains_base_weights=True).weights_dtype == "bfloat16"


def test_explicit_bf16_on_a_cpu_without_bf16_units_is_kept(monkeypatch):
    fake_cpu(monkeypatch, False)
    assert choose_precision("bf16", "auto", CPU) == PrecisionChoice("bf16", "bfloat16", "as configured")


def test_rules_without_a_loss_scaler_get_fp32_instead_of_an_auto_fp16(monkeypatch):
    fake_gpu(monkeypatch, False)
    picked = choose_precision("auto", "auto", CUDA)
    assert without_loss_scaler(picked, "auto").precision == "fp32"
    explicit = choose_precision("fp16", "auto", CUDA)
    assert without_loss_scaler(explicit, "fp16").precision == "fp16"  # refused earlier by the config check


X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n"
X86_AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
X86_AMX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd sve\n"


@pytest.mark.parametrize("cpuinfo, native", [(X86_AVX2, False), (X86_AVX512_BF16, True), (X86_AMX, True),
                                             (ARM, False), ("", False)])
def test_bf16_units_are_read_from_the_cpu_flags(monkeypatch, cpuinfo, native):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # torch 2.13 has no such query
        monkeypatch.delattr(torch._C._cpu, name, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: parse_cpu_flags(cpuinfo))
    assert REAL_BF16_QUERY() is native


def test_torchs_own_query_is_preferred_where_it_exists(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: parse_cpu_flags(X86_AVX2))
    monkeypatch.setattr(torch._C._cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch._C._cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert REAL_BF16_QUERY() is True


def test_autocast_auto_engages_bf16_only_on_a_bf16_cpu(monkeypatch):
    fake_cpu(monkeypatch, True)
    with precision.autocast("auto", CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    fake_cpu(monkeypatch, False)
    with precision.autocast("auto", CPU):
        assert not torch.is_autocast_enabled("cpu")


def test_bf16_base_keeps_float32_adapter_masters_and_trains():
    model = tiny_llama().to(torch.bfloat16)
    add_adapter(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    adapter_params = [p for p in model.parameters() if p.requires_grad]
    assert adapter_params and all(p.dtype == torch.float32 for p in adapter_params)
    ids = torch.arange(12).reshape(2, 6)
    with precision.autocast("bf16", CPU):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter_params)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def _config(tmp_path, **top):
    return parse_train_config({
        "output_dir": str(tmp_path / "run"), "adapter": {"r": 4}, **top,  # top may replace the adapter
        "data": {"train": "arithmetic", "options": {"size": 16}, "max_seq_len": 192, "eval_size": 0},
        "training": {"max_steps": 1, "batch_size": 4, "save_every": None},
    })


def test_the_run_records_and_logs_the_resolved_choice(monkeypatch, tmp_path, capsys):
    fake_cpu(monkeypatch, True)
    config = _config(tmp_path)
    assert (config.training.precision, config.dtype) == ("auto", "auto")  # the defaults
    summary = train(config, model_and_tokenizer=tiny_chat_model_and_tokenizer())
    saved = yaml.safe_load((summary.run_dir / "config.yaml").read_text())
    assert (saved["training"]["precision"], saved["dtype"]) == ("bf16", "bfloat16")
    logged = capsys.readouterr()
    assert (logged.out + logged.err).count("precision bf16, base weights bfloat16") == 1
    assert config.training.precision == "auto", "the caller's config must stay as it was passed"


def test_a_full_finetune_records_float32_masters(monkeypatch, tmp_path):
    fake_cpu(monkeypatch, True)
    config = _config(tmp_path, adapter={"method": "full"})
    summary = train(config, model_and_tokenizer=tiny_chat_model_and_tokenizer())
    saved = yaml.safe_load((summary.run_dir / "config.yaml").read_text())
    assert (saved["training"]["precision"], saved["dtype"]) == ("bf16", "float32")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_a_real_gpu_agrees_with_torchs_bf16_support():
    choice = choose_precision("auto", "auto", CUDA)
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert (choice.precision, choice.weights_dtype) == (("bf16", "bfloat16") if native else ("fp16", "float32"))
