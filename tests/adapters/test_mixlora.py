"""MixLoRA: one router per FFN block (a token uses the same experts in every projection), the block
output against a per-token reference, the load-balancing loss, refusals, and training through the loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import perturb_trainable, sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import add_adapter, merge_adapters, merge_and_unload
from tuneforge.adapters.config import validate_config
from tuneforge.adapters.hooks import training_hooks
from tuneforge.adapters.mixtures.mixlora import MixLoraBlock, MixLoraConfig
from tuneforge.errors import AdapterError, ConfigError

MLP = "model.layers.0.mlp"


def mixlora_model(make_model=tiny_llama, **kwargs):
    model = make_model()
    add_adapter(model, MixLoraConfig(**{"num_experts": 4, "top_k": 2, "r": 4, **kwargs}))
    perturb_trainable(model, scale=0.2)
    return model


def naive_expert_ffn(block, adapter: MixLoraBlock, expert: int, token: torch.Tensor) -> torch.Tensor:
    """FFN_e(x) written out for one token: every projection uses W + s B_e A_e of the *same* expert e."""
    def project(name, value):
        base = getattr(block, name)
        weight = base.weight.T if name.startswith("c_") else base.weight  # GPT-2's Conv1D stores (in, out)
        lora = adapter.mixlora_B[name][expert] @ adapter.mixlora_A[name][expert]
        bias = 0 if base.bias is None else base.bias
        return (weight + adapter.scaling * lora) @ value + bias

    if hasattr(block, "gate_proj"):
        return project("down_proj", F.silu(project("gate_proj", token)) * project("up_proj", token))
    return project("c_proj", block.act(project("c_fc", token)))


def naive_block_output(wrapped, x: torch.Tensor) -> torch.Tensor:
    """Token by token: one routing decision, then Σ_k g_e FFN_e(x) (Switch-style change for k = 1)."""
    adapter, block = wrapped.adapters["default"], wrapped.base_layer
    rows = []
    for token in x.reshape(-1, x.shape[-1]):
        probabilities = torch.softmax(adapter.mixlora_router @ token, dim=0)
        best = sorted(range(len(probabilities)), key=lambda e: -probabilities[e].item())[: adapter.top_k]
        base = block(token[None])[0]
        if adapter.top_k == 1:
            e = best[0]
            rows.append(base + probabilities[e] * (naive_expert_ffn(block, adapter, e, token) - base))
        else:
            weights = probabilities[best] / probabilities[best].sum()
            rows.append(sum(w * naive_expert_ffn(block, adapter, e, token) for w, e in zip(weights, best)))
    return torch.stack(rows).view(*x.shape[:-1], -1)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_block_output_is_the_mixture_of_whole_lora_ffn_experts(top_k):
    model = mixlora_model(top_k=top_k)
    wrapped = model.get_submodule(MLP)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), naive_block_output(wrapped, x), atol=1e-5, rtol=1e-5)


def test_gpt2_block_output_matches_the_reference():
    model = mixlora_model(tiny_gpt2, top_k=2)
    wrapped = model.get_submodule("transformer.h.1.mlp")
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), naive_block_output(wrapped, x), atol=1e-5, rtol=1e-5)


def test_each_token_uses_the_same_expert_in_gate_up_and_down():
    """Make expert 3 the only one that changes anything, in every projection; a token routed to it must
    see FFN_3, and a token routed elsewhere the base FFN, with nothing mixed across projections."""
    model = tiny_llama()
    add_adapter(model, MixLoraConfig(num_experts=4, top_k=1, r=4, target_modules=["model.layers.0.mlp"]))
    wrapped = model.get_submodule(MLP)
    adapter = wrapped.adapters["default"]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            adapter.mixlora_B[name][3] = 0.3 * torch.randn(adapter.mixlora_B[name][3].shape, generator=generator)
        adapter.mixlora_router.zero_()
        adapter.mixlora_router[3, 0] = 20.0  # tokens with x[0] > 0 go to expert 3 with p ≈ 1
        adapter.mixlora_router[1, 0] = -20.0  # the others to expert 1, whose B's are zero
    x = torch.randn(64, 32, generator=generator)
    assert len(adapter.mixlora_router) == 4 and not hasattr(wrapped.base_layer.gate_proj, "adapters")
    with torch.no_grad():
        out = wrapped(x)
        for token, row in zip(x, out):
            probability = torch.softmax(adapter.mixlora_router @ token, dim=0).max()
            base = wrapped.base_layer(token[None])[0]
            expected = base
            if token[0] > 0:
                expected = base + probability * (naive_expert_ffn(wrapped.base_layer, adapter, 3, token) - base)
            torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-5)


def test_one_router_per_ffn_block():
    model = mixlora_model()
    routers = [name for name, _ in model.named_parameters() if name.endswith("mixlora_router")]
    assert routers == [f"model.layers.{i}.mlp.adapters.default.mixlora_router" for i in range(2)]


def test_load_balancing_loss_formula_and_hook():
    model = mixlora_model(aux_loss_weight=0.1)
    ids = sample_ids()
    with torch.no_grad():
        model(ids)
    assert training_hooks(model, "default").extra_loss(model) is None, "evaluation passes are not counted"
    model.train()
    model(ids)
    expected = []
    blocks = [m.adapters["default"] for _, m in model.named_modules() if hasattr(m, "adapters")]
    assert len(blocks) == 2  # one per decoder layer's FFN
    for block in blocks:
        probabilities, chosen = block.routing_stats
        counts = torch.zeros(4)
        for row in chosen.tolist():
            for expert in row:
                counts[expert] += 1
        fraction = counts / (chosen.shape[0] * 2)
        expected.append(4 * (fraction * probabilities.detach().mean(0)).sum())
    loss = training_hooks(model, "default").extra_loss(model)
    torch.testing.assert_close(loss.detach(), 0.1 * torch.stack(expected).mean())
    loss.backward()
    assert blocks[0].mixlora_router.grad is not None and blocks[0].mixlora_router.grad.abs().sum() > 0
    assert training_hooks(model, "default").extra_loss(model) is None, "each forward pass counts once"


def test_uniform_routing_gives_aux_loss_one():
    layer = tiny_llama().model.layers[0].mlp
    block = MixLoraBlock(layer, __import__("tuneforge.adapters.mixtures.mixlora", fromlist=["_"]).GATED_FFN,
                         MixLoraConfig(num_experts=4, top_k=1, r=2), "mlp")
    block.routing_stats = (torch.full((4, 4), 0.25), torch.tensor([[0], [1], [2], [3]]))
    assert block.load_balancing_loss().item() == pytest.approx(1.0)


def test_refusals():
    with pytest.raises(ValueError, match="top_k=5 exceeds num_experts=4"):
        MixLoraConfig(num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="top_k=5 exceeds num_experts=4"):
        validate_config(MixLoraConfig, {"num_experts": 4, "top_k": 5}, "adapter.yaml")
    with pytest.raises(AdapterError, match=r"'model\.layers\.0\.self_attn\.q_proj' \(Linear.*target_modules: \['mlp'\]"):
        add_adapter(tiny_llama(), MixLoraConfig(target_modules=["q_proj"]))


def test_merge_is_refused_and_the_base_is_untouched():
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, MixLoraConfig(num_experts=2, top_k=1, r=2))
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
        current = model.get_submodule(module.replace(".mlp", ".mlp.base_layer", 1) if ".mlp" in module else module)
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
        "adapter": {"method": "mixlora", "num_experts": 3, "top_k": 2, "r": 4, "aux_loss_weight": 0.5},
        "data": {"train": "arithmetic", "options": {"size": 16}, "max_seq_len": 192, "eval_size": 0},
        "training": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "seed": 3},
    })
    seen = []
    original = MixLoraBlock.load_balancing_loss

    def spy(self):
        loss = original(self)
        if loss is not None:
            seen.append(float(loss.detach()))
        return loss

    MixLoraBlock.load_balancing_loss = spy
    try:
        train(config, model_and_tokenizer=(model, tokenizer))
    finally:
        MixLoraBlock.load_balancing_loss = original
    layers = sum(1 for name, _ in model.named_modules() if name.endswith(".mlp"))
    assert len(seen) == 3 * layers, "one aux loss per step and per FFN block"
    assert all(0.0 < value <= 3.0 for value in seen), seen  # at most E, when one expert takes everything
    reloaded = copy.deepcopy(base)
    load_adapter(reloaded, tmp_path / "run" / "adapter")
    ids = sample_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
