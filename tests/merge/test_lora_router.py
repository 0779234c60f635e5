"""LoraHub-style composition: the composed ΔW is the weighted sum; the weight search beats uniform weights."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB, perturb_trainable, tiny_llama

from tuneforge.adapters import LoraConfig, add_adapter, load_adapter, save_adapter
from tuneforge.adapters.model import wrapped_layers
from tuneforge.errors import AdapterError, ConfigError
from tuneforge.merge.lora_router import add_lora_router, compose_loras, mean_token_loss, search_lora_weights

DOWN = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Three random LoRAs (on lm_head and down_proj, so they move the logits a lot) and their deltas."""
    base = tiny_llama()
    root = tmp_path_factory.mktemp("loras")
    dirs, deltas = [], []
    for index in range(3):
        model = copy.deepcopy(base)
        add_adapter(model, LoraConfig(r=4, alpha=4 + 2 * index, target_modules=["lm_head", "down_proj"]))
        generator = torch.Generator().manual_seed(100 + index)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        save_adapter(model, root / f"task{index}")
        dirs.append(root / f"task{index}")
        deltas.append(model.get_submodule(DOWN).adapters["default"].delta_weight(None).detach())
    return base, dirs, deltas


def few_shot_batches(base, dirs, right: int):
    """Labels are the greedy predictions of the base plus adapter ``right`` alone: that adapter is the answer."""
    teacher = copy.deepcopy(base)
    weights = [1.0 if i == right else 0.0 for i in range(len(dirs))]
    compose_loras(teacher, dirs, weights, "teacher")
    generator = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (4, 12), generator=generator)
        with torch.no_grad():
            predicted = teacher(ids).logits.argmax(-1)
        batches.append({"input_ids": ids, "labels": torch.cat([ids[:, :1], predicted[:, :-1]], dim=1)})
    return batches


def test_composition_is_the_weighted_sum_of_deltas(library):
    base, dirs, deltas = library
    model = copy.deepcopy(base)
    compose_loras(model, dirs, [0.7, -0.4, 1.3], "mix")
    composed = model.get_submodule(DOWN).adapters["mix"]
    expected = 0.7 * deltas[0] - 0.4 * deltas[1] + 1.3 * deltas[2]
    torch.testing.assert_close(composed.delta_weight(None).detach(), expected, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in model.parameters()), "a composition is frozen"


def test_search_beats_uniform_weights_and_finds_the_right_adapter(library):
    base, dirs, _ = library
    batches = few_shot_batches(base, dirs, right=1)
    model = copy.deepcopy(base)
    result = search_lora_weights(model, dirs, batches, steps=12, seed=0)
    assert result.loss < result.uniform_loss - 1.0, (result.loss, result.uniform_loss)
    assert max(range(3), key=lambda i: result.weights[i]) == 1, result.weights
    assert result.history == sorted(result.history, reverse=True)  # best-so-far never gets worse
    # The model is left at the best weights: its loss plus the L1 term is the reported objective.
    with torch.no_grad():
        loss = sum(float(mean_token_loss(model, b)) for b in batches) / len(batches)
    assert loss + 0.05 * sum(abs(w) for w in result.weights) == pytest.approx(result.loss, rel=1e-5)
    again = search_lora_weights(copy.deepcopy(base), dirs, batches, steps=12, seed=0)
    assert again.weights == result.weights, "the search is deterministic for a seed"


def test_bad_search_arguments_are_reported_together(library):
    base, dirs, _ = library
    with pytest.raises(ConfigError, match=r"batches is empty(.|\n)*bounds=\(1.0, -1.0\)"):
        search_lora_weights(copy.deepcopy(base), dirs, [], bounds=(1.0, -1.0))
    with pytest.raises(ConfigError, match="got 2 weights for 3 adapters"):
        compose_loras(copy.deepcopy(base), dirs, [0.5, 0.5])


def test_router_experts_are_the_loras_and_one_expert_reproduces_its_lora(library):
    base, dirs, deltas = library
    routed = copy.deepcopy(base)
    add_lora_router(routed, dirs, top_k=2)
    experts = routed.get_submodule(DOWN).adapters["router"]
    for index, delta in enumerate(deltas):
        torch.testing.assert_close(experts.mole_B[index] @ experts.mole_A[index], delta, atol=1e-5, rtol=1e-5)
    # With a single expert the router's probability is 1: the model is base + that LoRA.
    single = copy.deepcopy(base)
    add_lora_router(single, [dirs[1]], top_k=1)
    reference = copy.deepcopy(base)
    compose_loras(reference, [dirs[1]], [1.0])
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(single(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_training_only_the_router_finds_the_right_lora(library):
    base, dirs, _ = library
    batches = few_shot_batches(base, dirs, right=2)
    model = copy.deepcopy(base)
    add_lora_router(model, dirs, top_k=1, aux_loss_weight=0.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    routers = [layer.adapters["router"].mole_router for _, layer in wrapped_layers(model)]
    assert {id(p) for p in trainable} == {id(p) for p in routers}, "only the routers train"
    optimizer = torch.optim.Adam(trainable, lr=0.05)
    model.train()
    with torch.no_grad():
        start = sum(float(mean_token_loss(model, b)) for b in batches) / len(batches)
    for _ in range(25):
        for batch in batches:
            optimizer.zero_grad()
            mean_token_loss(model, batch).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        end = sum(float(mean_token_loss(model, b)) for b in batches) / len(batches)
        hidden = model.model(batches[0]["input_ids"]).last_hidden_state.reshape(-1, 32)
        share = model.lm_head.adapters["router"].route(hidden)[0].mean(0)
    assert end < start - 1.0, (start, end)
    assert int(share.argmax()) == 2 and share[2] > 0.5, share


def test_router_needs_loras_of_the_same_modules(library, tmp_path):
    base, dirs, _ = library
    other = copy.deepcopy(base)
    add_adapter(other, LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(other, tmp_path / "q")
    with pytest.raises(AdapterError, match="must adapt the same modules"):
        add_lora_router(copy.deepcopy(base), [dirs[0], tmp_path / "q"])


def test_router_adapter_saves_and_loads_with_its_experts(library, tmp_path):
    base, dirs, _ = library
    model = copy.deepcopy(base)
    add_lora_router(model, dirs, top_k=2)
    perturb_trainable(model, scale=0.5)
    save_adapter(model, tmp_path / "router", "router")
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "router")
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
