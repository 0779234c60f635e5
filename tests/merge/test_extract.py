"""LoRA extraction: a known low-rank change is recovered exactly and the adapter works in peft."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from tiny_models import sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import LoraConfig, add_adapter, load_adapter
from tuneforge.errors import AdapterError, ConfigError
from tuneforge.merge import extract_lora, read_lora

# module: rank of the change made to it
CHANGES = {
    "model.layers.0.self_attn.q_proj": 2,
    "model.layers.1.self_attn.v_proj": 1,
    "model.layers.0.mlp.down_proj": 3,
}


def low_rank_finetune(base, changes, seed=0):
    """A copy of ``base`` whose named Linear weights moved by a random rank-r matrix."""
    generator = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, rank in changes.items():
            weight = tuned.get_submodule(name).weight  # (out, in) for Linear, (in, out) for Conv1D
            left = torch.randn(weight.shape[0], rank, generator=generator) * 0.1
            right = torch.randn(rank, weight.shape[1], generator=generator) * 0.1
            weight.add_(left @ right)
    return tuned


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_known_low_rank_change_is_recovered_exactly(tmp_path):
    base = tiny_llama()
    tuned = low_rank_finetune(base, CHANGES)
    report = extract_lora(base, tuned, tmp_path / "lora", energy=0.999999)
    assert {name: m.rank for name, m in report.modules.items()} == CHANGES
    assert report.max_relative_error < 1e-5
    assert "model.layers.1.self_attn.q_proj" in report.unchanged  # untouched modules get no LoRA
    config = (tmp_path / "lora" / "adapter_config.json").read_text()
    assert "rank_pattern" in config and "mlp\\\\.down_proj" in config
    ids = sample_ids()
    expected = logits(tuned, ids)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    assert (logits(theirs, ids) - expected).abs().max() < 1e-4
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "lora")
    assert (logits(ours, ids) - expected).abs().max() < 1e-4


def test_max_rank_truncates_optimally(tmp_path):
    base = tiny_llama()
    name = "model.layers.0.mlp.down_proj"
    tuned = low_rank_finetune(base, {name: 6})
    report = extract_lora(base.state_dict(), tuned.state_dict(), tmp_path / "lora", target_modules=["down_proj"],
                          max_rank=2)
    delta = tuned.get_submodule(name).weight - base.get_submodule(name).weight
    singular = torch.linalg.svdvals(delta)
    tail = (singular[2:].square().sum() / singular.square().sum()).sqrt().item()
    assert report.modules[name].rank == 2
    assert report.modules[name].relative_error == pytest.approx(tail, rel=1e-3)
    assert read_lora(tmp_path / "lora").modules[name].rank == 2


def test_energy_picks_the_smallest_sufficient_rank(tmp_path):
    base = tiny_llama()
    tuned = copy.deepcopy(base)
    name = "model.layers.0.self_attn.o_proj"
    u, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        # singular values 4, 2, 1 -> energies 16/21, 20/21, 1
        tuned.get_submodule(name).weight.add_(u[:, :3] @ torch.diag(torch.tensor([4.0, 2.0, 1.0])) @ u[:, 3:6].T)
    for energy, rank in [(0.7, 1), (0.9, 2), (0.96, 3)]:
        report = extract_lora(base, tuned, tmp_path / "lora", target_modules=["o_proj"], energy=energy, overwrite=True)
        assert report.modules[name].rank == rank, energy
        assert report.modules[name].kept_energy >= energy


def test_gpt2_conv1d_layers_extract_with_fan_in_fan_out(tmp_path):
    base = tiny_gpt2()
    tuned = low_rank_finetune(base, {"transformer.h.0.attn.c_attn": 2, "transformer.h.1.mlp.c_fc": 1})
    report = extract_lora(base, tuned, tmp_path / "lora", max_rank=4)
    assert report.max_relative_error < 1e-5
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    ids = sample_ids()
    assert (logits(theirs, ids) - logits(tuned, ids)).abs().max() < 1e-4


@pytest.mark.parametrize("options,match", [
    ({}, r"give max_rank=<int> and/or energy="),
    (dict(energy=0.0), r"energy=0.0 must be in \(0, 1\]"),
    (dict(energy=1.5, max_rank=0), r"max_rank=0 must be a positive integer"),
])
def test_bad_bounds(tmp_path, options, match):
    base = tiny_llama()
    with pytest.raises(ConfigError, match=match):
        extract_lora(base, base, tmp_path / "lora", **options)


def test_bad_pairs_and_targets(tmp_path):
    base = tiny_llama()
    with pytest.raises(AdapterError, match=r"finetuned weights equal the base weights"):
        extract_lora(base, copy.deepcopy(base), tmp_path / "lora", max_rank=2)
    with pytest.raises(AdapterError, match=r"different architectures"):
        extract_lora(base, tiny_llama(intermediate_size=48), tmp_path / "lora", max_rank=2)
    with pytest.raises(ConfigError, match=r"needs models to tell Linear layers apart"):
        extract_lora(base.state_dict(), base.state_dict(), tmp_path / "lora", max_rank=2)
    with pytest.raises(ConfigError, match=r"LoRA extraction supports Linear and Conv1D"):
        extract_lora(base, base, tmp_path / "lora", target_modules=["embed_tokens"], max_rank=2)
    wrapped = copy.deepcopy(base)
    add_adapter(wrapped, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"finetuned model still has tuneforge adapters; call .*merge_and_unload"):
        extract_lora(base, wrapped, tmp_path / "lora", max_rank=2)
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match=r"already exists"):
        extract_lora(base, base, tmp_path / "taken", max_rank=2)
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
