"""AdaLoRA: budget schedule, importance and masking, orthogonality penalty, bad input, peft files, a real run."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_chat_model_and_tokenizer, tiny_gpt2, tiny_llama

from tuneforge.adapters import add_adapter, load_adapter, save_adapter
from tuneforge.adapters.rank.adalora import AdaLoraConfig, AdaLoraLinear, adalora_hooks
from tuneforge.adapters.model import wrapped_layers
from tuneforge.config import parse_train_config
from tuneforge.errors import ConfigError

TARGETS = ["q_proj", "v_proj", "down_proj"]  # 3 modules x 2 layers = 6 adapted layers


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def naive_budget(step, initial, target, tinit, tfinal, total):
    """The paper's eq. 9, written out again; the last step lands on the target."""
    if step < tinit:
        return initial
    if step >= total - tfinal or step == total - 1:
        return target
    fraction = (step - tinit) / (total - tfinal - tinit)
    return int(target + (initial - target) * (1 - fraction) ** 3)


def adalora_layers(model):
    return [(name, layer.adapters["default"]) for name, layer in wrapped_layers(model)]


def run_steps(model, hooks, total, *, before_step=None, stop_after=None):
    """A minimal training loop calling the hooks the way train/loop.py does; returns kept triplets per step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = sample_ids(batch=2, length=12)
    model.train()
    kept = []
    for step in range(total if stop_after is None else stop_after):
        loss = model(ids, labels=ids).loss + hooks.extra_loss(model)
        loss.backward()
        if before_step is not None:
            before_step(step)
        hooks.before_optimizer_step(model, step, total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hooks.after_optimizer_step(model, step, total)
        kept.append(sum(int(adapter.rank_mask.sum()) for _, adapter in adalora_layers(model)))
    return kept


def adalora_model(**settings):
    model = tiny_llama()
    config = AdaLoraConfig(**{"init_r": 6, "target_r": 2, "target_modules": TARGETS, **settings})
    add_adapter(model, config)
    return model, config, adalora_hooks(model, "default", config)


def test_budget_after_each_allocation_follows_the_cubic_schedule():
    model, config, hooks = adalora_model(tinit=2, tfinal=3, delta_t=2)
    total = 14
    kept = run_steps(model, hooks, total)
    layers = len(adalora_layers(model))
    assert layers == 6
    initial, target = 6 * layers, 2 * layers
    allocation_steps = [step for step, _ in hooks.budgets]
    assert allocation_steps == [2, 4, 6, 8, 10, 11]  # every delta_t from tinit; the final one at total - tfinal
    for step, budget in hooks.budgets:
        assert budget == naive_budget(step, initial, target, 2, 3, total)
        assert kept[step] == budget, f"step {step}: {kept[step]} triplets kept, schedule says {budget}"
    assert kept[:2] == [initial, initial]
    assert kept[-1] == target
    assert all(a >= b for a, b in zip(kept, kept[1:])), "the budget only shrinks"
    # The schedule is not trivially flat or linear: it has intermediate values.
    assert len({budget for _, budget in hooks.budgets}) >= 4
    for _, adapter in adalora_layers(model):
        assert torch.all(adapter.lora_E[~adapter.rank_mask] == 0), "pruned triplets must have λ = 0"
    assert config.total_step == total  # recorded for the saved file


def test_tfinal_zero_still_ends_at_target():
    model, _, hooks = adalora_model(tinit=0, tfinal=0, delta_t=3)
    kept = run_steps(model, hooks, 5)
    assert kept[-1] == 2 * 6
    assert [step for step, _ in hooks.budgets] == [0, 3, 4]


def naive_ema(history, beta1, beta2):
    """Ī and Ū of the paper's eqs. 6-7 from a list of (param, grad) snapshots."""
    smoothed = torch.zeros_like(history[0][0])
    uncertainty = torch.zeros_like(history[0][0])
    for param, grad in history:
        sensitivity = (param * grad).abs()
        smoothed = beta1 * smoothed + (1 - beta1) * sensitivity
        uncertainty = beta2 * uncertainty + (1 - beta2) * (sensitivity - smoothed).abs()
    return smoothed, uncertainty


def test_importance_is_the_smoothed_sensitivity_times_uncertainty_and_masks_the_least_important():
    model, config, hooks = adalora_model(tinit=1, tfinal=1, beta1=0.7, beta2=0.6, orth_reg_weight=0.1)
    history: dict[str, list] = {}

    def snapshot(step):
        # Importance comes from the task loss alone: its gradient, recomputed without the regulariser.
        leaves = [(f"{name}.{leaf}", getattr(adapter, leaf)) for name, adapter in adalora_layers(model)
                  for leaf in ("lora_A", "lora_E", "lora_B")]
        ids = sample_ids(batch=2, length=12)  # run_steps' batch
        task_grads = torch.autograd.grad(model(ids, labels=ids).loss, [param for _, param in leaves])
        for (key, param), grad in zip(leaves, task_grads):
            if not key.endswith("lora_E"):  # Λ is not regularised
                assert not torch.allclose(grad, param.grad), "the step's gradient should include the regulariser's"
            history.setdefault(key, []).append((param.detach().clone(), grad))

    # Steps 0-3 of a 6-step schedule, so the last allocation is an intermediate one.
    run_steps(model, hooks, 6, before_step=snapshot, stop_after=4)

    scores = {}
    for name, adapter in adalora_layers(model):
        element = {}
        for leaf in ("lora_A", "lora_E", "lora_B"):
            smoothed, uncertainty = naive_ema(history[f"{name}.{leaf}"], 0.7, 0.6)
            torch.testing.assert_close(hooks.sensitivity[f"{name}.{leaf}"], smoothed)
            torch.testing.assert_close(hooks.uncertainty[f"{name}.{leaf}"], uncertainty)
            element[leaf] = smoothed * uncertainty
        r = config.init_r
        scores[name] = torch.tensor([
            float(element["lora_E"][i, 0]) + float(element["lora_A"][i, :].mean()) + float(element["lora_B"][:, i].mean())
            for i in range(r)
        ])
    step, budget = hooks.budgets[-1]
    assert step == 3 and 12 < budget < 36
    masks = {name: adapter.rank_mask for name, adapter in adalora_layers(model)}
    kept_scores = torch.cat([scores[n][masks[n]] for n in scores])
    pruned_scores = torch.cat([scores[n][~masks[n]] for n in scores])
    assert kept_scores.numel() == budget
    assert pruned_scores.max() <= kept_scores.min() + 1e-12, "a pruned triplet was more important than a kept one"


def test_orthogonality_penalty_is_the_mean_of_unsquared_distances():
    model, config, hooks = adalora_model(orth_reg_weight=0.3)
    perturb_trainable(model, scale=0.3)
    distances = []
    for _, adapter in adalora_layers(model):
        p, q = adapter.lora_B.detach().double(), adapter.lora_A.detach().double()
        r = p.shape[1]
        for gram in ([[float(p[:, i] @ p[:, j]) for j in range(r)] for i in range(r)],
                     [[float(q[i] @ q[j]) for j in range(r)] for i in range(r)]):
            squares = sum((gram[i][j] - (1.0 if i == j else 0.0)) ** 2 for i in range(r) for j in range(r))
            distances.append(squares ** 0.5)
    assert len(distances) == 2 * 6
    assert float(hooks.extra_loss(model).detach()) == pytest.approx(0.3 * sum(distances) / len(distances), rel=1e-5)


def test_orthogonality_penalty_equals_peft_adalora_models():
    """peft's AdaLoraModel.forward adds the regulariser to the loss: the difference is its value."""
    base = tiny_llama()
    model = copy.deepcopy(base)
    config = AdaLoraConfig(init_r=6, target_r=2, alpha=8, total_step=10, orth_reg_weight=0.5, target_modules=TARGETS)
    add_adapter(model, config)
    perturb_trainable(model, scale=0.3)
    hooks = adalora_hooks(model, "default", config)
    theirs = peft_adalora(base, total_step=10, orth_reg_weight=0.5)
    ours = {f"base_model.model.{name}.{leaf}.default": tensor
            for name, adapter in adalora_layers(model) for leaf, tensor in adapter.file_tensors().items()}
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if name in ours:
                param.copy_(ours[name])
    ids = sample_ids()
    model.eval(), theirs.eval()
    with torch.no_grad():
        task_loss = model(ids, labels=ids).loss
        peft_loss = theirs.base_model(input_ids=ids, labels=ids).loss  # AdaLoraModel.forward adds it
        ours_total = task_loss + hooks.extra_loss(model)
    assert float(peft_loss - task_loss) > 0.05  # the regulariser is really there
    assert float(ours_total) == pytest.approx(float(peft_loss), rel=1e-5)


def test_importance_ignores_the_regularisers_gradient():
    model, _, hooks = adalora_model(orth_reg_weight=0.5)
    perturb_trainable(model, scale=0.3)
    ids = sample_ids()
    (model(ids, labels=ids).loss + hooks.extra_loss(model)).backward()
    hooks.before_optimizer_step(model, 0, 10)
    with_regulariser = dict(hooks.sensitivity)
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    task_only = adalora_hooks(model, "default", hooks.config)
    task_only.update_importance()
    for key, value in task_only.sensitivity.items():
        torch.testing.assert_close(with_regulariser[key], value, atol=1e-7, rtol=1e-4)


def test_no_penalty_when_weight_is_zero():
    model, _, hooks = adalora_model(orth_reg_weight=0.0)
    assert hooks.extra_loss(model) is None


def train_config(adapter: dict, **training):
    return {"output_dir": "unused", "adapter": {"method": "adalora", **adapter},
            "training": {"max_steps": 4, **training}}


def test_target_above_init_is_a_config_error():
    with pytest.raises(ConfigError, match=r"target_r=8 is larger than init_r=4"):
        parse_train_config(train_config({"init_r": 4, "target_r": 8}))


def test_impossible_schedule_in_config_is_a_config_error():
    with pytest.raises(ConfigError, match=r"impossible budget schedule: tinit=6 \+ tfinal=4 >= 10 total steps"):
        parse_train_config(train_config({"tinit": 6, "tfinal": 4, "total_step": 10}))


def test_impossible_schedule_for_the_run_is_a_config_error():
    model, _, hooks = adalora_model(tinit=3, tfinal=2)
    with pytest.raises(ConfigError, match=r"impossible budget schedule: tinit=3 \+ tfinal=2 >= 5 total steps"):
        hooks.before_optimizer_step(model, 0, 5)


def test_disagreeing_total_step_warns_and_follows_the_run():
    model, config, hooks = adalora_model(total_step=20)
    with pytest.warns(UserWarning, match=r"adapter.total_step=20 but this run takes 12 optimizer steps"):
        run_steps(model, hooks, 12)
    assert config.total_step == 12
    assert hooks.budgets[-1] == (11, 12)


def test_hook_state_round_trips_masks_and_averages():
    model, config, hooks = adalora_model(tinit=0, tfinal=1)
    run_steps(model, hooks, 3)
    state = hooks.state_dict()
    fresh = copy.deepcopy(model)
    for _, adapter in adalora_layers(fresh):
        adapter.rank_mask.fill_(True)
    restored = adalora_hooks(fresh, "default", config)
    restored.load_state_dict(state)
    assert restored.budgets == hooks.budgets
    for (_, a), (_, b) in zip(adalora_layers(model), adalora_layers(fresh)):
        assert torch.equal(a.rank_mask, b.rank_mask)
    for key, value in hooks.sensitivity.items():
        assert torch.equal(restored.sensitivity[key], value)


# --- PEFT files, both ways ---------------------------------------------------------------------------


@pytest.mark.parametrize("make_model,targets", [(tiny_llama, TARGETS), (tiny_gpt2, ["c_attn", "c_fc"])],
                         ids=["llama", "gpt2-conv1d"])
def test_tuneforge_adalora_loads_in_peft(make_model, targets, tmp_path):
    base = make_model()
    model = copy.deepcopy(base)
    config = AdaLoraConfig(init_r=6, target_r=2, alpha=8, total_step=10, target_modules=targets)
    add_adapter(model, config)
    perturb_trainable(model, scale=0.2)
    hooks = adalora_hooks(model, "default", config)
    for name, adapter in adalora_layers(model):  # some importance so the mask is not arbitrary
        hooks.sensitivity.update({f"{name}.{k}": torch.rand_like(p) for k, p in adapter.triplet_parameters().items()})
        hooks.uncertainty.update({f"{name}.{k}": torch.rand_like(p) for k, p in adapter.triplet_parameters().items()})
    hooks.allocate(2 * 6 + 3)
    ids = sample_ids()
    expected = logits(model, ids)
    assert (expected - logits(base, ids)).abs().max() > 1e-3
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    diff = (logits(theirs, ids) - expected).abs().max().item()
    assert diff <= 1e-5, f"peft's logits differ by {diff}"


def peft_adalora(base, **settings):
    config = peft.AdaLoraConfig(init_r=6, target_r=2, lora_alpha=8, target_modules=TARGETS, **settings)
    return peft.get_peft_model(copy.deepcopy(base), config)


def test_peft_adalora_loads_in_tuneforge(tmp_path):
    base = tiny_llama()
    theirs = peft_adalora(base, total_step=10)
    perturb_trainable(theirs, scale=0.2)
    theirs.eval()
    ids = sample_ids()
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    diff = (logits(model, ids) - expected).abs().max().item()
    assert diff <= 1e-5, f"tuneforge's logits differ from peft's by {diff}"


def test_peft_trained_pruned_adalora_loads_in_tuneforge(tmp_path):
    """A peft-trained adapter is saved pruned to the kept triplets, with a rank_pattern."""
    base = tiny_llama()
    total = 4
    theirs = peft_adalora(base, total_step=total, tinit=0, tfinal=1)
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=5e-2)
    ids = sample_ids(batch=2, length=12)
    theirs.train()
    for step in range(total):
        theirs(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        theirs.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    theirs.eval()
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path)
    saved = peft.PeftConfig.from_pretrained(tmp_path)
    assert saved.rank_pattern, "peft did not write a rank pattern; the test would not cover pruned files"
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    diff = (logits(model, ids) - expected).abs().max().item()
    assert diff <= 1e-5, f"tuneforge's logits differ from peft's by {diff}"
    kept = sum(int(adapter.rank_mask.sum()) for _, adapter in adalora_layers(model))
    assert kept == sum(sum(pattern) for pattern in saved.rank_pattern.values())


# --- a real run through the training loop -----------------------------------------------------------


def run_config(tmp_path, name, **training):
    return parse_train_config({
        "output_dir": str(tmp_path / name),
        "adapter": {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2,
                    "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": "arithmetic", "options": {"size": 24}, "max_seq_len": 192, "eval_size": 0},
        "training": {"max_steps": 8, "batch_size": 4, "lr": 1e-2, "seed": 3, **training},
    })


def test_training_run_ends_at_the_target_budget(tmp_path):
    from tuneforge.train import train

    model, tokenizer = tiny_chat_model_and_tokenizer()
    train(run_config(tmp_path, "run"), model_and_tokenizer=(model, tokenizer))
    adapters = [layer.adapters["default"] for _, layer in wrapped_layers(model)]
    assert len(adapters) == 4 and all(isinstance(a, AdaLoraLinear) for a in adapters)
    assert sum(int(a.rank_mask.sum()) for a in adapters) == 2 * len(adapters)
    assert sum(int(torch.count_nonzero(a.lora_E)) for a in adapters) <= 2 * len(adapters)
    fresh, _ = tiny_chat_model_and_tokenizer()
    load_adapter(fresh, tmp_path / "run" / "adapter")
    ids = torch.tensor([[3, 10, 20, 30, 40, 4]])
    model.eval()
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_resumed_run_takes_the_same_steps_and_masks(tmp_path):
    from tuneforge.train import train

    full_model, tokenizer = tiny_chat_model_and_tokenizer()
    full_losses = []
    train(run_config(tmp_path, "full"), model_and_tokenizer=(full_model, tokenizer),
          on_step=lambda step, loss: full_losses.append(loss))

    def stop_after_five(step, loss):
        if step == 5:  # inside the decreasing phase: masks and averages must survive the restart
            raise KeyboardInterrupt

    partial = run_config(tmp_path, "partial", save_every=1)
    train(partial, model_and_tokenizer=tiny_chat_model_and_tokenizer(), on_step=stop_after_five)
    resumed_model, tokenizer = tiny_chat_model_and_tokenizer()
    resumed_losses = []
    train(partial, resume=True, model_and_tokenizer=(resumed_model, tokenizer),
          on_step=lambda step, loss: resumed_losses.append(loss))
    assert resumed_losses == pytest.approx(full_losses[5:], rel=1e-5, abs=1e-6)
    for (_, full), (_, resumed) in zip(wrapped_layers(full_model), wrapped_layers(resumed_model)):
        assert torch.equal(full.adapters["default"].rank_mask, resumed.adapters["default"].rank_mask)


def test_importance_and_mask_agree_with_peft_rank_allocator():
    """peft's RankAllocator as an oracle: same weights and gradients, same kept triplets."""
    import torch.nn.functional as F

    base = tiny_llama()
    model = copy.deepcopy(base)
    config = AdaLoraConfig(init_r=6, target_r=2, alpha=8, total_step=10, target_modules=TARGETS)
    add_adapter(model, config)
    perturb_trainable(model, scale=0.2)
    hooks = adalora_hooks(model, "default", config)
    theirs = peft_adalora(base, total_step=10)
    ours = {f"base_model.model.{name}.{leaf}.default": tensor
            for name, adapter in adalora_layers(model) for leaf, tensor in adapter.file_tensors().items()}
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if name in ours:
                param.copy_(ours[name])
    allocator = theirs.base_model.rankallocator
    for seed in (1, 2, 3):
        ids = sample_ids(batch=2, length=10, seed=seed)
        for net in (model, theirs):
            out = net(input_ids=ids).logits
            F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        hooks.update_importance()
        allocator.update_ipt(theirs.base_model.model)
        model.zero_grad()
        theirs.zero_grad()
    budget = 6 * 6 - 13
    hooks.allocate(budget)
    pattern = allocator.mask_to_budget(theirs.base_model.model, budget)
    for name, adapter in adalora_layers(model):
        assert adapter.rank_mask.tolist() == pattern[f"{name}.lora_E.default"], name
