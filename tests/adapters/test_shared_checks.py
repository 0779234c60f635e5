"""Shared checks over the table of adapter cases (cases.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import CASES, AdapterCase
from tiny_models import perturb_trainable, sample_ids

from tuneforge.adapters import (
    AdaptedLayer,
    add_adapter,
    delete_adapter,
    disabled_adapters,
    list_methods,
    load_adapter,
    merge_adapters,
    merge_and_unload,
    save_adapter,
    set_active_adapters,
    unmerge_adapters,
)

case_params = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def adapted(case: AdapterCase, name: str = "default"):
    base = case.make_model()
    model = copy.deepcopy(base)
    add_adapter(model, case.make_config(), name)
    return base, model


def test_every_registered_method_has_a_case():
    covered = {case.method for case in CASES}
    missing = [spec.name for spec in list_methods() if spec.name not in covered]
    assert not missing, f"registered methods without a row in tests/adapters/cases.py: {missing}"


@case_params
def test_identity_at_init(case):
    if not case.identity_at_init:
        pytest.skip(f"{case.id} does not promise identity at init")
    base, model = adapted(case)
    ids = sample_ids()
    torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=case.atol, rtol=0)


@case_params
def test_adapter_changes_output_once_trained(case):
    base, model = adapted(case)
    perturb_trainable(model)
    ids = sample_ids()
    assert (logits(model, ids) - logits(base, ids)).abs().max() > 1e-3


@case_params
def test_merged_equals_unmerged_and_unmerge_restores_base(case):
    if not case.mergeable:
        pytest.skip("not mergeable")
    base, model = adapted(case)
    perturb_trainable(model)
    ids = sample_ids()
    expected = logits(model, ids)
    merge_adapters(model, safe=True)
    torch.testing.assert_close(logits(model, ids), expected, atol=case.atol, rtol=1e-4)
    unmerge_adapters(model)
    torch.testing.assert_close(logits(model, ids), expected, atol=case.atol, rtol=1e-4)
    for (name, p_base), (_, p_model) in zip(base.state_dict().items(), _base_state(model).items()):
        torch.testing.assert_close(p_model, p_base, atol=1e-5, rtol=0, msg=f"unmerge did not restore {name}")


def _base_state(model):
    """The model's base weights under the original names (wrapper prefixes stripped)."""
    state = {}
    for key, value in model.state_dict().items():
        if ".adapters." in key or ".modules_to_save." in key:
            continue
        state[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    return state


@case_params
def test_merge_and_unload_gives_plain_model(case):
    if not case.mergeable:
        pytest.skip("not mergeable")
    base, model = adapted(case)
    perturb_trainable(model)
    ids = sample_ids()
    expected = logits(model, ids)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    assert set(plain.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(logits(plain, ids), expected, atol=case.atol, rtol=1e-4)


@case_params
def test_disabled_equals_base_even_when_merged(case):
    base, model = adapted(case)
    perturb_trainable(model)
    ids = sample_ids()
    with disabled_adapters(model):
        torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=case.atol, rtol=0)
    if case.mergeable:
        merge_adapters(model)
        with disabled_adapters(model):
            torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=1e-5, rtol=1e-4)
        trained = logits(model, ids)
        assert (trained - logits(base, ids)).abs().max() > 1e-3, "adapter was not merged back after the context"


@case_params
def test_save_load_round_trip_with_substring_names(case, tmp_path):
    ids = sample_ids()
    base = case.make_model()
    model = copy.deepcopy(base)
    # Names that are substrings of each other and of PEFT's own leaf names must not collide.
    for index, name in enumerate(["lora", "lora_A", "a"]):
        add_adapter(model, case.make_config(), name)
        perturb_trainable(model, seed=10 + index)
    expected = {}
    for name in ["lora", "lora_A", "a"]:
        set_active_adapters(model, [name])
        expected[name] = logits(model, ids)
        save_adapter(model, tmp_path / name, name)
    fresh = copy.deepcopy(base)
    for name in ["a", "lora_A", "lora"]:
        load_adapter(fresh, tmp_path / name, name)
    for name in ["lora", "lora_A", "a"]:
        set_active_adapters(fresh, [name])
        torch.testing.assert_close(logits(fresh, ids), expected[name], atol=1e-6, rtol=0)
    assert (tmp_path / "a" / "README.md").read_text().startswith("---")


@case_params
def test_one_step_changes_only_adapter_parameters(case):
    base, model = adapted(case)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "adapter has no trainable parameters"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = sample_ids()
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        if name not in trainable:
            assert param.grad is None, f"frozen parameter {name} received a gradient"
    optimizer.step()
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"adapter parameter {name} did not change"
        else:
            assert torch.equal(param, before[name]), f"base parameter {name} changed"


@case_params
def test_delete_restores_plain_structure(case):
    base, model = adapted(case)
    delete_adapter(model, "default")
    assert set(model.state_dict()) == set(base.state_dict())
