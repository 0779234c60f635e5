"""MoLE: top-k routing, the mixed output against a per-token loop, the load-balancing loss, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_llama

from tuneforge.adapters import add_adapter, merge_adapters, merge_and_unload
from tuneforge.adapters.config import validate_config
from tuneforge.adapters.hooks import training_hooks
from tuneforge.adapters.mole import MoleConfig, MoleLinear
from tuneforge.errors import AdapterError, ConfigError

UP = "model.layers.0.mlp.up_proj"


def mole_model(**kwargs):
    model = tiny_llama()
    add_adapter(model, MoleConfig(**{"num_experts": 4, "top_k": 2, "r": 4, **kwargs}))
    perturb_trainable(model, scale=0.2)
    return model


def naive_layer_output(layer: MoleLinear, base: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Token by token: base output + Σ over the k best experts of softmax(selected logits) · s B A x."""
    rows = []
    for token in x.reshape(-1, x.shape[-1]):
        logits = layer.mole_router @ token
        best = sorted(range(len(logits)), key=lambda e: -logits[e].item())[: layer.top_k]
        weights = torch.softmax(torch.stack([logits[e] for e in best]), dim=0)
        if layer.top_k == 1:  # Switch-style: the chosen expert's probability among all experts
            weights = torch.softmax(logits, dim=0)[best]
        update = sum(w * layer.scaling * (layer.mole_B[e] @ (layer.mole_A[e] @ token)) for w, e in zip(weights, best))
        rows.append(base(token) + update)
    return torch.stack(rows).view(*x.shape[:-1], -1)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_output_equals_the_per_token_sum_of_weighted_experts(top_k):
    model = mole_model(top_k=top_k)
    wrapped = model.get_submodule(UP)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), naive_layer_output(wrapped.adapters["default"], wrapped.base_layer, x),
                                   atol=1e-5, rtol=0)


def test_router_picks_the_top_k_experts():
    layer = mole_model().get_submodule(UP).adapters["default"]
    with torch.no_grad():
        layer.mole_router.zero_()
        layer.mole_router[1, 0] = 3.0
        layer.mole_router[3, 0] = 2.0
        layer.mole_router[0, 0] = 1.0
    token = torch.zeros(1, 32)
    token[0, 0] = 1.0
    _, chosen, weights = layer.route(token)
    assert chosen.tolist() == [[1, 3]]
    torch.testing.assert_close(weights, torch.softmax(torch.tensor([[3.0, 2.0]]), dim=-1))


def test_load_balancing_loss_formula_and_hook():
    model = mole_model(aux_loss_weight=0.1)
    ids = sample_ids()
    with torch.no_grad():
        model(ids)
    assert training_hooks(model, "default").extra_loss(model) is None, "evaluation passes are not counted"
    model.train()
    model(ids)
    expected = []
    layers = [m.adapters["default"] for _, m in model.named_modules() if hasattr(m, "adapters")]
    assert len(layers) == 6  # gate, up, down in two decoder layers
    for layer in layers:
        probabilities, chosen = layer.routing_stats
        counts = torch.zeros(4)
        for row in chosen.tolist():
            for expert in row:
                counts[expert] += 1
        fraction = counts / (chosen.shape[0] * 2)
        expected.append(4 * (fraction * probabilities.detach().mean(0)).sum())
    loss = training_hooks(model, "default").extra_loss(model)
    torch.testing.assert_close(loss.detach(), 0.1 * torch.stack(expected).mean())
    loss.backward()
    assert layers[0].mole_router.grad is not None and layers[0].mole_router.grad.abs().sum() > 0
    assert training_hooks(model, "default").extra_loss(model) is None, "each forward pass counts once"


def test_uniform_routing_gives_aux_loss_one():
    layer = MoleLinear(8, 8, MoleConfig(num_experts=4, top_k=1, r=2))
    layer.routing_stats = (torch.full((4, 4), 0.25), torch.tensor([[0], [1], [2], [3]]))
    assert layer.load_balancing_loss().item() == pytest.approx(1.0)


def test_top_k_above_num_experts_is_refused():
    with pytest.raises(ValueError, match="top_k=5 exceeds num_experts=4"):
        MoleConfig(num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="top_k=5 exceeds num_experts=4"):
        validate_config(MoleConfig, {"num_experts": 4, "top_k": 5}, "adapter.yaml")


def test_merge_is_refused_and_the_base_is_untouched():
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, MoleConfig(num_experts=2, top_k=1, r=2))
    perturb_trainable(model)
    ids = sample_ids()
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(AdapterError, match="cannot be merged"):
        merge_adapters(model)
    with pytest.raises(AdapterError, match="cannot be merged"):
        merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)
    for name, param in base.named_parameters():
        module, _, leaf = name.rpartition(".")
        current = model.get_submodule(module)
        current = getattr(current, "base_layer", current)
        assert torch.equal(getattr(current, leaf), param), f"{name} changed"


def test_training_loop_adds_the_load_balancing_loss_and_saves_a_loadable_adapter(tmp_path):
    from tiny_models import tiny_chat_model_and_tokenizer

    from tuneforge.adapters import load_adapter
    from tuneforge.config import parse_train_config
    from tuneforge.train import train

    model, tokenizer = tiny_chat_model_and_tokenizer()
    base = copy.deepcopy(model)
    config = parse_train_config({
        "output_dir": str(tmp_path / "run"),
        "adapter": {"method": "mole", "num_experts": 3, "top_k": 2, "r": 4, "aux_loss_weight": 0.5},
        "data": {"train": "arithmetic", "options": {"size": 16}, "max_seq_len": 192, "eval_size": 0},
        "training": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "seed": 3},
    })
    seen = []
    original = MoleLinear.load_balancing_loss

    def spy(self):
        loss = original(self)
        if loss is not None:
            seen.append(float(loss.detach()))
        return loss

    MoleLinear.load_balancing_loss = spy
    try:
        train(config, model_and_tokenizer=(model, tokenizer))
    finally:
        MoleLinear.load_balancing_loss = original
    assert len(seen) == 3 * 6, "one aux loss per step and per routed layer (gate, up, down × 2 layers)"
    assert all(0.0 < value <= 3.0 for value in seen), seen  # at most E, when one expert takes everything
    reloaded = copy.deepcopy(base)
    load_adapter(reloaded, tmp_path / "run" / "adapter")
    ids = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
