"""Update rules against their oracles: galore-torch for GaLore, the papers' equations (written here,
independently of the code) for APOLLO, LOMO, AdaLomo and MeZO, and the papers' schedules for BAdam
and LISA. Each test also checks the rule did not degenerate to plain AdamW."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import sample_ids, tiny_llama

from tuneforge.config import parse_train_config
from tuneforge.train.full import FullWeights
from tuneforge.train.update_rules import build_update_rule

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def full_config(rule: dict, **training):
    settings = {"lr": 1e-2, "max_grad_norm": None, **training}
    return parse_train_config({"adapter": {"method": "full"}, "update_rule": rule, "training": settings})


def model_and_rule(rule: dict, **training):
    model = tiny_llama(seed=3).train()
    config = full_config(rule, **training)
    FullWeights(model, config.adapter)
    return model, build_update_rule(model, config, full_finetune=True), config


def loss_of(model, seed=1):
    ids = sample_ids(batch=2, length=9, seed=seed)
    return model(input_ids=ids, labels=ids).loss


def backprop_steps(model, rule, steps: int):
    for step in range(steps):
        rule.begin_step(model, step)
        loss_of(model, seed=step + 1).backward()
        rule.optimizer.step()
        rule.optimizer.zero_grad(set_to_none=True)


def adamw_reference(lr: float, steps: int):
    model = tiny_llama(seed=3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        loss_of(model, seed=step + 1).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def max_difference(a, b) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


# ---- GaLore: galore-torch's GaLoreAdamW is the oracle ----

@pytest.mark.parametrize("slice_elements", [None, 5])
def test_galore_matches_galore_torch(slice_elements, monkeypatch):
    """slice_elements=5: unprojected weights (embeddings, norms) take their Adam step in slices of 5
    numbers, which must not change the step."""
    galore_torch = pytest.importorskip("galore_torch")
    if slice_elements is not None:
        from tuneforge.train.update_rules import galore

        monkeypatch.setattr(galore, "SLICE_ELEMENTS", slice_elements)
    ours, rule, _ = model_and_rule({"method": "galore", "rank": 4, "update_proj_gap": 2, "scale": 0.25})
    backprop_steps(ours, rule, steps=5)  # crosses two projection refreshes

    reference = tiny_llama(seed=3).train()
    projected = [p for n, p in reference.named_parameters() if ".layers." in n and p.dim() == 2]
    plain = [p for n, p in reference.named_parameters() if not (".layers." in n and p.dim() == 2)]
    optimizer = galore_torch.GaLoreAdamW(
        [{"params": plain}, {"params": projected, "rank": 4, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"}],
        lr=1e-2, eps=1e-8, weight_decay=0.0, no_deprecation_warning=True)
    for step in range(5):
        loss_of(reference, seed=step + 1).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    assert max_difference(ours, reference) < 1e-5
    assert max_difference(ours, adamw_reference(1e-2, 5)) > 1e-3, "GaLore must not be plain AdamW"
    state = rule.optimizer.state[ours.model.layers[0].mlp.up_proj.weight]  # (64, 32): moments are (64, r)
    assert state["exp_avg"].shape == (64, 4) and state["projection"].shape == (4, 32)


def test_the_sliced_adam_step_is_the_whole_adam_step_on_contiguous_and_strided_weights(monkeypatch):
    """W - lr * M / (sqrt(V) + eps), written out here, for a weight stored row-major and one stored transposed."""
    from tuneforge.train.update_rules import galore

    monkeypatch.setattr(galore, "SLICE_ELEMENTS", 5)
    torch.manual_seed(0)
    for weight in (torch.randn(6, 4), torch.randn(4, 6).t()):
        param = torch.nn.Parameter(weight.clone() if weight.is_contiguous() else weight.clone().t().contiguous().t())
        state = {"exp_avg": torch.randn(4, 6).t(), "exp_avg_sq": torch.rand(6, 4)}
        expected = param.detach() - 0.1 * state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)
        storage = param.data_ptr()
        galore._adam_step_by_slices(param, state, eps=1e-8, step_size=0.1)
        torch.testing.assert_close(param.detach(), expected)
        assert param.data_ptr() == storage, "the step is in place"


def test_per_layer_galore_equals_galore_stepped_after_backward():
    stepped, stepped_rule, _ = model_and_rule({"method": "galore", "rank": 4, "update_proj_gap": 2})
    backprop_steps(stepped, stepped_rule, steps=3)
    fused, fused_rule, _ = model_and_rule({"method": "galore", "rank": 4, "update_proj_gap": 2, "per_layer": True})
    for step in range(3):
        loss_of(fused, seed=step + 1).backward()  # every update happens in here
        assert all(p.grad is None for p in fused.parameters()), "per-layer GaLore frees each gradient"
        fused_rule.optimizer.step()  # finds nothing left to do
    assert max_difference(stepped, fused) < 1e-6


# ---- APOLLO: Algorithm 1 of the paper, written out here ----

def apollo_reference_step(weight, grad, state, lr, rank, scale, tensor_wise, projection, eps=1e-8, betas=(0.9, 0.999)):
    """One APOLLO step for one weight, straight from the paper's Algorithm 1."""
    m, n = grad.shape
    left = m <= n
    r_t = projection @ grad if left else grad @ projection.T
    t = state["t"] = state.get("t", 0) + 1
    state["m"] = betas[0] * state.get("m", 0) + (1 - betas[0]) * r_t
    state["v"] = betas[1] * state.get("v", 0) + (1 - betas[1]) * r_t**2
    adam = (state["m"] / (1 - betas[0] ** t)) / ((state["v"] / (1 - betas[1] ** t)).sqrt() + eps)
    if tensor_wise:
        s = adam.norm() / (r_t.norm() + 1e-8)
    elif left:
        s = torch.stack([adam[:, j].norm() / (r_t[:, j].norm() + 1e-8) for j in range(n)])[None, :]
    else:
        s = torch.stack([adam[i, :].norm() / (r_t[i, :].norm() + 1e-8) for i in range(m)])[:, None]
    update = scale * grad * s
    if "last" in state and update.norm() > 1.01 * state["last"]:
        update = update * 1.01 * state["last"] / update.norm()
    state["last"] = update.norm()
    return weight - lr * update


@pytest.mark.parametrize("method", ["apollo", "apollo-mini"])
def test_apollo_follows_the_paper_equations(method):
    model, rule, _ = model_and_rule({"method": method, "rank": 3, "update_proj_gap": 10})
    weight = model.model.layers[1].mlp.down_proj.weight  # (32, 64): a left projection
    tall = model.model.layers[0].mlp.up_proj.weight  # (64, 32): a right projection
    expected, states = {}, {id(weight): {}, id(tall): {}}
    for step in range(3):
        loss_of(model, seed=step + 1).backward()
        for param in (weight, tall):
            expected[id(param)] = (param.detach().clone(), param.grad.clone())
        rule.optimizer.step()
        for param in (weight, tall):
            before, grad = expected[id(param)]
            projection = rule.optimizer.state[param]["projection"]
            mini = method == "apollo-mini"
            assert projection.shape[0] == (1 if mini else 3)
            want = apollo_reference_step(before, grad, states[id(param)], 1e-2, projection.shape[0],
                                         math.sqrt(128) if mini else 1.0, mini, projection)
            torch.testing.assert_close(param.detach(), want, rtol=1e-5, atol=1e-6)
        rule.optimizer.zero_grad(set_to_none=True)
    assert max_difference(model, adamw_reference(1e-2, 3)) > 1e-3, "APOLLO must not be plain AdamW"


# ---- LOMO and AdaLomo: fused SGD and Algorithm 1 of AdaLomo, written out here ----

def whole_step(model, rule, max_grad_norm, step=0, seed=1):
    ids = sample_ids(batch=2, length=9, seed=seed)
    return rule.whole_step(model, [{"ids": ids}], lambda batch: model(input_ids=batch["ids"], labels=batch["ids"]).loss,
                           max_grad_norm, step)


def reference_gradients(model, seed=1):
    copy_ = copy.deepcopy(model)
    loss_of(copy_, seed).backward()
    return {name: p.grad.clone() for name, p in copy_.named_parameters()}


def test_lomo_is_sgd_with_two_pass_clipping():
    model, rule, _ = model_and_rule({"method": "lomo"})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = reference_gradients(model)
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    clip = total / 4  # clipping must bite
    outcome = whole_step(model, rule, max_grad_norm=clip)
    assert outcome.grad_norm == pytest.approx(total, rel=1e-5)
    coefficient = clip / (total + 1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), before[name] - 1e-2 * coefficient * grads[name], rtol=1e-5, atol=1e-7)
        assert param.grad is None


def adalomo_reference(weight, grad, state, lr, t):
    """AdaLomo Algorithm 1 (ε1 = 1e-30, ε2 = 1e-3, d = 1, β_t = 1 − t^-0.8)."""
    beta = 1 - t ** -0.8
    squared = grad**2 + 1e-30
    if grad.dim() == 2:
        state["r"] = beta * state.get("r", 0) + (1 - beta) * squared.mean(dim=1)
        state["c"] = beta * state.get("c", 0) + (1 - beta) * squared.mean(dim=0)
        v = torch.outer(state["r"], state["c"]) / state["r"].mean()
    else:
        v = state["v"] = beta * state.get("v", 0) + (1 - beta) * squared
    u = grad / v.sqrt()
    rms = lambda x: x.norm() / math.sqrt(x.numel())  # noqa: E731
    u = u / max(1.0, float(rms(u)))
    return weight - lr * max(1e-3, float(rms(weight))) * u


def test_adalomo_follows_the_paper_equations():
    model, rule, _ = model_and_rule({"method": "adalomo"})
    states: dict[str, dict] = {}
    for step in range(2):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = reference_gradients(model, seed=step + 1)
        whole_step(model, rule, max_grad_norm=None, step=step, seed=step + 1)
        for name, param in model.named_parameters():
            want = adalomo_reference(before[name], grads[name], states.setdefault(name, {}), 1e-2, step + 1)
            torch.testing.assert_close(param.detach(), want, rtol=1e-4, atol=1e-7)
    assert max_difference(model, adamw_reference(1e-2, 2)) > 1e-4


# ---- MeZO: Algorithm 1 of the paper, with z drawn here from the documented seed stream ----

def draw_z(params, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=generator) for p in params]


@pytest.mark.parametrize("n_spsa", [1, 2])
def test_mezo_is_spsa_with_seeded_perturbations(n_spsa):
    model, rule, _ = model_and_rule({"method": "mezo", "eps": 1e-3, "n_spsa": n_spsa})
    params = [p for p in model.parameters()]
    theta = [p.detach().clone() for p in params]
    reference = copy.deepcopy(model)
    ref_params = list(reference.parameters())
    step_size = torch.zeros(())
    expected = [t.clone() for t in theta]
    for sample in range(n_spsa):
        z = draw_z(params, rule.seed_for(4, sample))
        with torch.no_grad():
            for p, t, zi in zip(ref_params, theta, z):
                p.copy_(t + 1e-3 * zi)
            plus = float(loss_of(reference))
            for p, t, zi in zip(ref_params, theta, z):
                p.copy_(t - 1e-3 * zi)
            minus = float(loss_of(reference))
        g = (plus - minus) / 2e-3
        step_size += abs(g)
        expected = [e - 1e-2 * g / n_spsa * zi for e, zi in zip(expected, z)]
    outcome = whole_step(model, rule, max_grad_norm=None, step=4)
    assert outcome.applied and math.isfinite(outcome.loss)
    for param, want in zip(params, expected):
        torch.testing.assert_close(param.detach(), want, rtol=1e-4, atol=2e-6)
    assert all(p.grad is None for p in params), "MeZO takes no backward"


def test_mezo_trains_only_an_adapter():
    from tuneforge.adapters import LoraConfig, add_adapter

    model = tiny_llama(seed=3).train()
    add_adapter(model, LoraConfig(r=2, init="gaussian"))
    config = parse_train_config({"adapter": {"r": 2}, "update_rule": {"method": "mezo"}, "training": {"lr": 1e-2}})
    rule = build_update_rule(model, config, full_finetune=False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    whole_step(model, rule, max_grad_norm=None)
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert any(not torch.equal(p, adapter[n]) for n, p in model.named_parameters() if n in adapter)


# ---- BAdam and LISA: which weights move, and when ----

def changed_layers(model, before):
    return sorted({int(n.split(".")[2]) for n, p in model.named_parameters()
                   if ".layers." in n and not torch.equal(p, before[n])})


def test_badam_trains_one_block_at_a_time_and_restarts_its_adam():
    model, rule, _ = model_and_rule({"method": "badam", "switch_every": 2, "order": "descending"})
    embed_before = model.model.embed_tokens.weight.detach().clone()
    seen = []
    for step in range(5):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        backprop_steps_at(model, rule, step)
        seen.append(changed_layers(model, before))
        states = [s for s in rule.optimizer.state.values() if s]
        assert len(states) == len(list(model.model.layers[seen[-1][0]].parameters())), "state of one block only"
    assert seen == [[1], [1], [0], [0], [1]]
    assert torch.equal(model.model.embed_tokens.weight, embed_before), "weights outside layers stay frozen"
    # The block that comes back at step 4 starts Adam afresh: its step count is 1.
    assert all(int(s["step"]) == 1 for s in rule.optimizer.state.values() if s)


def backprop_steps_at(model, rule, step):
    rule.begin_step(model, step)
    loss_of(model, seed=step + 1).backward()
    rule.optimizer.step()
    rule.optimizer.zero_grad(set_to_none=True)


def test_badam_random_order_is_a_permutation_per_round_and_reproducible():
    model, rule, _ = model_and_rule({"method": "badam", "switch_every": 1, "order": "random"})
    rounds = [[rule.block_at(step) for step in range(r * 2, r * 2 + 2)] for r in range(6)]
    assert all(sorted(r) == [0, 1] for r in rounds)
    _, again, _ = model_and_rule({"method": "badam", "switch_every": 1, "order": "random"})
    assert [again.block_at(s) for s in range(12)] == [b for r in rounds for b in r]


def test_lisa_keeps_embeddings_and_head_on_and_samples_gamma_layers():
    model = tiny_llama(seed=3, num_hidden_layers=4).train()
    config = full_config({"method": "lisa", "switch_every": 2, "active_layers": 2})
    FullWeights(model, config.adapter)
    rule = build_update_rule(model, config, full_finetune=True)
    samples = set()
    for step in range(6):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        backprop_steps_at(model, rule, step)
        layers = changed_layers(model, before)
        assert layers == rule.layers_at(step) and len(layers) == 2
        assert not torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
        assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])
        samples.add(tuple(layers))
    assert len(samples) > 1, "a new sample every switch_every steps"


def test_badam_restarts_adam_even_when_the_same_block_follows_itself():
    model, rule, _ = model_and_rule({"method": "badam", "switch_every": 2, "order": "fixed", "blocks": [1]})
    steps = []
    for step in range(3):
        backprop_steps_at(model, rule, step)
        steps.append({int(s["step"]) for s in rule.optimizer.state.values() if s})
    assert steps == [{1}, {2}, {1}], "a block's Adam moments are cleared at every switch (BAdam Algorithm 1)"


def test_badam_matches_the_badam_package():
    """badam's BlockOptimizer as the oracle. With switch_every > 1 its first block gets one step fewer
    (badam 1.4 tests ``(global_step + 1) % K`` after counting the step), so the schedules agree at K = 1,
    where every step switches block and restarts Adam: the order and the moment resets are compared."""
    badam = pytest.importorskip("badam")
    ours, rule, _ = model_and_rule({"method": "badam", "switch_every": 1, "order": "descending"})
    backprop_steps(ours, rule, steps=5)
    reference = tiny_llama(seed=3).train()
    optimizer = badam.BlockOptimizer(torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0),
                                     list(reference.named_parameters()), switch_block_every=1,
                                     switch_mode="descending", verbose=0)
    for step in range(5):
        loss_of(reference, seed=step + 1).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert max_difference(ours, reference) < 1e-6
    assert max_difference(ours, adamw_reference(1e-2, 5)) > 1e-3, "BAdam must not be plain AdamW"
