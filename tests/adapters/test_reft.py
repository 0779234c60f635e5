"""LoReFT / DiReFT: the edit against a naive formula on captured hidden states, positions, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_llama

from tuneforge.adapters import add_adapter, disabled_adapters
from tuneforge.adapters.model_level.reft import DiReftConfig, LoReftConfig, edited_positions
from tuneforge.errors import AdapterError, ConfigError


def reft_model(config):
    base = tiny_llama()
    model = copy.deepcopy(base)
    captured = {}
    # Registered before the adapter's own hook: sees layer 1's unedited output.
    model.model.layers[1].register_forward_hook(lambda m, a, out: captured.update(raw=out.detach().clone()))
    add_adapter(model, config)
    perturb_trainable(model, scale=0.3)
    model.model.layers[1].register_forward_hook(lambda m, a, out: captured.update(edited=out.detach().clone()))
    return base, model, captured


def naive_positions(spec, mask):
    rows = []
    for row in mask.tolist():
        real = [i for i, m in enumerate(row) if m]
        chosen = set(real) if spec == "all" else set()
        for part in ([] if spec == "all" else spec.split("+")):
            n = int(part[1:])
            chosen |= set(real[:n] if part[0] == "f" else real[-n:])
        rows.append([i in chosen for i in range(len(row))])
    return torch.tensor(rows)


@pytest.mark.parametrize("spec", ["f2", "l3", "f1+l2", "f4+l4", "all"])
def test_positions_match_a_naive_selection_with_padding(spec):
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]])
    got = edited_positions(spec, 7, mask, None, 3, torch.device("cpu"))
    assert torch.equal(got, naive_positions(spec, mask))


def test_packed_rows_count_positions_per_example():
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    mask4d = torch.zeros(1, 1, 9, 9)
    got = edited_positions("f1+l1", 9, mask4d, positions, 1, torch.device("cpu"))
    assert got.int().tolist() == [[1, 0, 0, 1, 1, 0, 1, 1, 1]]


def test_loreft_edit_matches_the_formula_on_captured_hidden_states():
    _, model, captured = reft_model(LoReftConfig(layers=[1], positions="f2+l1", r=3))
    ids = sample_ids(batch=2, length=7)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask)
    h, edited = captured["raw"], captured["edited"]
    intervention = model.tuneforge_model_adapters.adapters["default"].interventions[0]
    R = intervention.rotation.weight.detach()
    W, b = intervention.source.weight.detach(), intervention.source.bias.detach()
    torch.testing.assert_close(R @ R.T, torch.eye(3), atol=1e-5, rtol=0)
    expected = h.clone()
    chosen = naive_positions("f2+l1", mask)
    for row, col in chosen.nonzero().tolist():
        x = h[row, col]
        expected[row, col] = x + R.T @ (W @ x + b - R @ x)
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=0)
    assert not torch.equal(edited, h)


def test_direft_edit_matches_the_formula_on_captured_hidden_states():
    _, model, captured = reft_model(DiReftConfig(layers=[1], positions="l2", r=2))
    ids = sample_ids(batch=2, length=6)
    with torch.no_grad():
        model(ids)
    h, edited = captured["raw"], captured["edited"]
    intervention = model.tuneforge_model_adapters.adapters["default"].interventions[0]
    W1, b, W2 = (t.detach() for t in (intervention.source.weight, intervention.source.bias,
                                       intervention.project_back.weight))
    expected = h.clone()
    expected[:, -2:] = h[:, -2:] + (h[:, -2:] @ W1.T + b) @ W2
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=0)


def test_disabled_and_decoding_steps_are_not_edited():
    base, model, captured = reft_model(LoReftConfig(layers=[0, 1], positions="f2", r=2))
    ids = sample_ids(batch=2, length=6)
    with torch.no_grad(), disabled_adapters(model):
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=0, rtol=0)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)  # first-token positions do not move as the sequence grows


def test_rotation_stays_orthonormal_after_training_steps():
    _, model, _ = reft_model(LoReftConfig(layers=[1], positions="all", r=4))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = sample_ids()
    for _ in range(3):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    R = model.tuneforge_model_adapters.adapters["default"].interventions[0].rotation.weight.detach()
    torch.testing.assert_close(R @ R.T, torch.eye(4), atol=1e-5, rtol=0)


def test_bad_layers_and_positions_are_clear_errors():
    with pytest.raises(AdapterError, match=r"layers=\[5\] names layers this model does not have; valid .* 0\.\.1"):
        add_adapter(tiny_llama(), LoReftConfig(layers=[0, 5]))
    with pytest.raises(ConfigError, match="positions must be 'all', 'fN', 'lN' or 'fN\\+lM'"):
        from tuneforge.adapters.config import validate_config
        validate_config(LoReftConfig, {"positions": "first3"}, "adapter")


def _gradients(model, checkpointed: bool):
    model = copy.deepcopy(model)
    model.train()
    if checkpointed:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = sample_ids()
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients():
    _, model, _ = reft_model(LoReftConfig(layers=[0, 1], positions="f2+l2", r=2))
    plain, checkpointed = _gradients(model, False), _gradients(model, True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_layer_selection_fields_are_refused_for_model_level_methods():
    from tuneforge.config import parse_train_config

    with pytest.raises(ConfigError, match="layers_to_transform select layers .* mean nothing to 'loreft'"):
        parse_train_config({"adapter": {"method": "loreft", "layers_to_transform": [1]}})
