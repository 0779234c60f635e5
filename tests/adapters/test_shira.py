"""SHiRA: entry counts, which entries change, the three mask kinds, and peft interop both ways."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import perturb_trainable, sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import add_adapter, load_adapter, merge_and_unload, save_adapter
from tuneforge.adapters.hooks import training_hooks
from tuneforge.adapters.selective.shira import ShiraConfig
from tuneforge.errors import AdapterError


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_stored_values_match_the_density(tmp_path):
    model = tiny_llama()
    add_adapter(model, ShiraConfig(density=0.02, target_modules=["q_proj", "down_proj"]))
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    q_key = "base_model.model.model.layers.0.self_attn.q_proj"
    down_key = "base_model.model.model.layers.1.mlp.down_proj"
    assert tensors[f"{q_key}.shira_weight"].shape == (round(0.02 * 32 * 32),)
    assert tensors[f"{down_key}.shira_weight"].shape == (round(0.02 * 64 * 32),)
    assert tensors[f"{q_key}.shira_indices"].shape == (2, 20) and tensors[f"{q_key}.shira_indices"].dtype == torch.int32


def test_merge_changes_only_the_masked_entries_by_their_values():
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    add_adapter(model, ShiraConfig(density=0.05, target_modules=["c_attn"]))
    perturb_trainable(model, scale=0.5)
    adapter = model.transformer.h[0].attn.c_attn.adapters["default"]
    rows, cols = adapter.shira_indices.long()  # (out, in) layout; GPT-2's Conv1D stores W as (in, out)
    values = adapter.shira_weight.detach().clone()
    merged = merge_and_unload(model)
    diff = merged.transformer.h[0].attn.c_attn.weight - base.transformer.h[0].attn.c_attn.weight
    expected = torch.zeros(96, 32)
    expected[rows, cols] = values
    torch.testing.assert_close(diff, expected.T, atol=1e-6, rtol=0)
    assert int((diff != 0).sum()) == len(values) == round(0.05 * 96 * 32)


def test_forward_adds_the_sparse_delta():
    model = tiny_llama()
    add_adapter(model, ShiraConfig(density=0.1, target_modules=["up_proj"]))
    perturb_trainable(model, scale=0.5)
    layer = model.model.layers[0].mlp.up_proj
    adapter = layer.adapters["default"]
    delta = torch.zeros(64, 32)
    rows, cols = adapter.shira_indices.long()
    delta[rows, cols] = adapter.shira_weight.detach()
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (layer.base_layer.weight + delta).T)


def test_magnitude_mask_keeps_the_largest_weights():
    model = tiny_llama()
    add_adapter(model, ShiraConfig(density=0.1, mask_type="magnitude", target_modules=["o_proj"]))
    layer = model.model.layers[1].self_attn.o_proj
    rows, cols = layer.adapters["default"].shira_indices.long()
    magnitude = layer.base_layer.weight.abs()
    threshold = magnitude.flatten().topk(len(rows)).values.min()
    assert (magnitude[rows, cols] >= threshold).all()


def test_gradient_mask_keeps_the_largest_gradients():
    base = tiny_llama()
    ids = sample_ids()
    base.model.layers[0].self_attn.v_proj.weight.requires_grad_(True)
    base(ids, labels=ids).loss.backward()
    grad = base.model.layers[0].self_attn.v_proj.weight.grad.abs()
    base.zero_grad(set_to_none=True)
    model = copy.deepcopy(base)
    add_adapter(model, ShiraConfig(density=0.1, mask_type="gradient", target_modules=["v_proj"]))
    hooks = training_hooks(model, "default")
    hooks.prepare(model, [{"input_ids": ids}], lambda m, batch: m(batch["input_ids"], labels=batch["input_ids"]).loss)
    rows, cols = model.model.layers[0].self_attn.v_proj.adapters["default"].shira_indices.long()
    chosen = set(zip(rows.tolist(), cols.tolist()))
    top = grad.flatten().topk(len(rows)).indices
    assert chosen == {(int(i) // 32, int(i) % 32) for i in top}
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".adapters." not in n)
    assert all(p.grad is None for p in model.parameters())


def test_rank_above_the_layer_size_is_a_clear_error():
    with pytest.raises(AdapterError, match="r=20 asks for 1280 trainable entries.*only 1024"):
        add_adapter(tiny_llama(), ShiraConfig(r=20, target_modules=["q_proj"]))


INTEROP = [("llama", tiny_llama, ["q_proj", "v_proj", "down_proj"]), ("llama-mlp", tiny_llama, ["up_proj"])]


@pytest.mark.parametrize("case_id,make_model,targets", INTEROP, ids=[c[0] for c in INTEROP])
def test_tuneforge_shira_loads_in_peft(case_id, make_model, targets, tmp_path):
    base = make_model()
    model = copy.deepcopy(base)
    add_adapter(model, ShiraConfig(r=2, mask_type="magnitude", target_modules=targets))
    perturb_trainable(model, scale=0.3)
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = sample_ids()
    diff = (logits(theirs, ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-5, f"peft's logits differ by {diff}"
    assert (logits(model, ids) - logits(base, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("case_id,make_model,targets", INTEROP, ids=[c[0] for c in INTEROP])
def test_peft_shira_loads_in_tuneforge(case_id, make_model, targets, tmp_path):
    base = make_model()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.ShiraConfig(r=2, random_seed=7, target_modules=targets))
    perturb_trainable(theirs, scale=0.3)
    theirs.eval()
    ids = sample_ids()
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    diff = (logits(model, ids) - expected).abs().max().item()
    assert diff <= 1e-5, f"tuneforge's logits differ from peft's by {diff}"
