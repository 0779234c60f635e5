"""Combining LoRA adapters: parity with peft's add_weighted_adapter, and independent formulas."""

from __future__ import annotations

import copy
import math

import peft
import peft.tuners.lora.model as peft_lora_model
import pytest
import torch
from peft.tuners.lora import LoraLayer
from tiny_models import perturb_trainable, sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import LoraConfig, add_adapter, load_adapter, read_adapter_config, save_adapter
from tuneforge.adapters.peft_format import read_adapter_tensors
from tuneforge.merge import combine_adapters, combine_loras, read_lora
from tuneforge.merge.combine import _generator

QV = ["q_proj", "v_proj"]
# name: (base model, LoRA settings). a/b/c share targets and rank (for the factor-level methods);
# d differs in rank and targets; c uses rsLoRA so per-adapter scalings all differ.
ADAPTERS = {
    "a": (tiny_llama, dict(r=4, alpha=8, target_modules=QV)),
    "b": (tiny_llama, dict(r=4, alpha=4, target_modules=QV)),
    "c": (tiny_llama, dict(r=4, alpha=6, use_rslora=True, target_modules=QV)),
    "d": (tiny_llama, dict(r=2, alpha=4, target_modules=["q_proj", "o_proj"])),
    "e1": (tiny_llama, dict(r=4, alpha=8, target_modules=["embed_tokens", "k_proj"])),
    "e2": (tiny_llama, dict(r=4, alpha=4, target_modules=["embed_tokens", "k_proj"])),
    "g1": (tiny_gpt2, dict(r=4, alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "g2": (tiny_gpt2, dict(r=4, alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}

EXACT, SVD_TOL = 1e-6, 1e-5
# (combination type, adapters, weights, options, tolerance on ΔW relative to its largest entry)
PEFT_CASES = [
    ("linear", "abc", [0.7, -0.4, 0.5], {}, EXACT),
    ("cat", "abc", [0.7, -0.4, 0.5], {}, EXACT),
    ("cat", "ad", [1.0, 0.5], {}, EXACT),
    ("svd", "abc", [0.7, -0.4, 0.5], {}, SVD_TOL),
    ("svd", "ad", [1.0, -0.5], dict(svd_rank=3), SVD_TOL),
    ("ties", "abc", [0.7, -0.4, 0.5], dict(density=0.5), EXACT),
    ("ties", "ab", [1.0, 1.0], dict(density=0.7, majority_sign_method="frequency"), EXACT),
    ("ties_svd", "abc", [0.7, -0.4, 0.5], dict(density=0.5), SVD_TOL),
    ("magnitude_prune", "abc", [0.7, 0.4, 0.5], dict(density=0.6), EXACT),
    ("magnitude_prune_svd", "abc", [0.7, 0.4, 0.5], dict(density=0.6), SVD_TOL),
    ("dare_linear", "abc", [0.7, -0.4, 0.5], dict(density=0.5), EXACT),
    ("dare_ties", "abc", [0.7, -0.4, 0.5], dict(density=0.5), EXACT),
    ("dare_linear_svd", "abc", [0.7, -0.4, 0.5], dict(density=0.5, svd_rank=2), SVD_TOL),
    ("dare_ties_svd", "abc", [0.7, -0.4, 0.5], dict(density=0.5), SVD_TOL),
    ("svd", ["e1", "e2"], [1.0, 0.5], {}, SVD_TOL),
    ("cat", ["e1", "e2"], [1.0, -0.5], {}, EXACT),
    ("svd", ["g1", "g2"], [1.0, 0.5], {}, SVD_TOL),
    ("ties", ["g1", "g2"], [1.0, 0.5], dict(density=0.5), EXACT),
]
SEED = 3


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    models = {}
    for i, (name, (make, settings)) in enumerate(ADAPTERS.items()):
        model = models.setdefault(make, make())
        add_adapter(model, LoraConfig(**settings), name)
        perturb_trainable(model, seed=10 + i)
        save_adapter(model, root / name, name)
    return root


def lora_product(layer, name: str) -> torch.Tensor:
    """scaling · B A of peft's adapter ``name`` on one layer, (out, in) as in the files."""
    if name in layer.lora_A:
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    else:
        a, b = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return (b @ a) * layer.scaling[name]


def peft_with(saved, names, make):
    model = peft.PeftModel.from_pretrained(make(), saved / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(saved / name, adapter_name=name)
    return model.eval()


def seeded_dare_calls(monkeypatch, model, combination: str, seed: int) -> None:
    """Make peft's DARE draw the masks tuneforge draws: before each call, seed the global generator
    with tuneforge's per-(module, factor) seed. peft visits modules in model order, A then B."""
    parts = ["delta"] if combination.endswith("_svd") else ["A", "B"]
    first = next(iter(model.peft_config))
    order = [(name, part) for name, layer in model.base_model.model.named_modules()
             if isinstance(layer, LoraLayer) and (first in layer.lora_A or first in layer.lora_embedding_A)
             for part in parts]
    calls = iter(order)
    for fn_name in ("dare_linear", "dare_ties"):
        original = getattr(peft_lora_model, fn_name)

        def seeded(*args, _original=original, **kwargs):
            torch.manual_seed(_generator(seed, *next(calls)).initial_seed())
            return _original(*args, **kwargs)

        monkeypatch.setattr(peft_lora_model, fn_name, seeded)


@pytest.mark.parametrize("combination,names,weights,options,tol", PEFT_CASES,
                         ids=[f"{c[0]}-{''.join(c[1])}" for c in PEFT_CASES])
def test_matches_peft_add_weighted_adapter(saved, tmp_path, monkeypatch, combination, names, weights, options, tol):
    names = list(names)
    make = ADAPTERS[names[0]][0]
    theirs = peft_with(saved, names, make)
    if combination.startswith("dare"):
        seeded_dare_calls(monkeypatch, theirs, combination, SEED)
    theirs.add_weighted_adapter(names, weights, "merged", combination_type=combination, **options)
    ours_options = {("target_rank" if k == "svd_rank" else k): v for k, v in options.items()}
    out = combine_adapters([saved / n for n in names], weights, combination, tmp_path / "merged",
                           seed=SEED, **ours_options)
    ours = read_lora(out)
    compared = 0
    for name, layer in theirs.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and "merged" in layer.scaling:
            expected = lora_product(layer, "merged").detach()
            diff = (ours.modules[name].delta() - expected).abs().max() / expected.abs().max()
            assert diff <= tol, f"{name}: ΔW differs from peft's by {diff:.2e} (relative)"
            compared += 1
    assert compared == len(ours.modules)
    # The written adapter gives peft's logits, loaded by tuneforge and by peft itself.
    theirs.set_adapter("merged")
    ids = sample_ids()
    with torch.no_grad():
        expected_logits = theirs(ids).logits
        model = make()
        load_adapter(model, out)
        assert (model(ids).logits - expected_logits).abs().max() <= 1e-5
        reloaded = peft.PeftModel.from_pretrained(make(), out).eval()
        assert (reloaded(ids).logits - expected_logits).abs().max() <= 1e-5


def deltas(saved, name: str) -> dict[str, torch.Tensor]:
    return {module: m.delta() for module, m in read_lora(saved / name).modules.items()}


def weighted_sum(saved, names, weights) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for name, w in zip(names, weights):
        for module, delta in deltas(saved, name).items():
            total[module] = total.get(module, 0) + w * delta
    return total


@pytest.mark.parametrize("method", ["cat", "task_arithmetic"])
def test_cat_is_the_exact_weighted_sum_of_deltas(saved, method):
    merged = combine_loras([saved / "a", saved / "d"], [0.8, -1.5], method)
    expected = weighted_sum(saved, ["a", "d"], [0.8, -1.5])
    assert set(merged.modules) == set(expected)  # the union of targets; a missing module adds nothing
    for module, delta in expected.items():
        assert torch.allclose(merged.modules[module].delta(), delta, atol=1e-6)
    assert merged.modules["model.layers.0.self_attn.q_proj"].rank == 6
    assert merged.modules["model.layers.0.self_attn.v_proj"].rank == 4


def test_svd_is_exact_at_full_rank_and_optimal_when_truncated(saved):
    expected = weighted_sum(saved, ["a", "b", "c"], [0.7, -0.4, 0.5])
    full = combine_loras([saved / n for n in "abc"], [0.7, -0.4, 0.5], "svd", target_rank=12)
    cut = combine_loras([saved / n for n in "abc"], [0.7, -0.4, 0.5], "svd", target_rank=3)
    for module, delta in expected.items():
        assert torch.allclose(full.modules[module].delta(), delta, atol=1e-5)
        singular = torch.linalg.svdvals(delta)
        error = torch.linalg.matrix_norm(cut.modules[module].delta() - delta)
        assert torch.isclose(error, singular[3:].square().sum().sqrt(), rtol=1e-3)  # Eckart–Young
        assert cut.modules[module].rank == 3


def test_a_negative_weight_subtracts_an_adapter(saved):
    merged = combine_loras([saved / "a", saved / "a"], [1.0, -1.0], "cat")
    assert all(m.delta().abs().max() < 1e-6 for m in merged.modules.values())


def test_module_filter_keeps_only_the_selected_modules(saved, tmp_path):
    out = combine_adapters([saved / "a", saved / "b"], [1.0, 1.0], "linear", tmp_path / "v",
                           module_filter=["v_proj"])
    assert sorted(read_lora(out).modules) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    regex = combine_loras([saved / "a", saved / "b"], [1.0, 1.0], "linear", module_filter=r".*layers\.0\..*")
    predicate = combine_loras([saved / "a", saved / "b"], [1.0, 1.0], "linear", module_filter=lambda n: ".0." in n)
    assert set(regex.modules) == set(predicate.modules) == {
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}


def test_state_dicts_combine_like_directories(saved):
    pairs = [(read_adapter_config(saved / n), read_adapter_tensors(saved / n)) for n in "ab"]
    from_dicts = combine_loras(pairs, [0.5, 0.5], "ties", density=0.5)
    from_dirs = combine_loras([saved / "a", saved / "b"], [0.5, 0.5], "ties", density=0.5)
    for module, m in from_dirs.modules.items():
        assert torch.equal(from_dicts.modules[module].A, m.A) and torch.equal(from_dicts.modules[module].B, m.B)


def test_dare_is_seeded_per_module(saved):
    sources = [saved / "a", saved / "b"]
    first = combine_loras(sources, [1.0, 1.0], "dare_ties", density=0.5, seed=1)
    again = combine_loras(sources, [1.0, 1.0], "dare_ties", density=0.5, seed=1)
    other = combine_loras(sources, [1.0, 1.0], "dare_ties", density=0.5, seed=2)
    only_v = combine_loras(sources, [1.0, 1.0], "dare_ties", density=0.5, seed=1, module_filter=["v_proj"])
    name = "model.layers.1.self_attn.v_proj"
    assert torch.equal(first.modules[name].A, again.modules[name].A)
    assert not torch.equal(first.modules[name].A, other.modules[name].A)
    assert torch.equal(first.modules[name].A, only_v.modules[name].A)  # unaffected by which modules are merged


def test_overwrite_replaces_an_existing_adapter(saved, tmp_path):
    out = combine_adapters([saved / "a"], [1.0], "cat", tmp_path / "out")
    combine_adapters([saved / "a", saved / "b"], [1.0, 1.0], "cat", out, overwrite=True)
    assert read_lora(out).modules["model.layers.0.self_attn.q_proj"].rank == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or backup dirs left
    assert "| " in (out / "README.md").read_text()


def test_linear_is_the_product_of_the_weighted_factor_sums(saved):
    """PEFT's 'linear' on LoRA: √|w s| on each factor, the sign on A, then the factors are summed."""
    weights = [0.7, -0.4]
    merged = combine_loras([saved / "a", saved / "b"], weights, "linear")
    inputs = [read_lora(saved / n) for n in "ab"]
    for module, m in merged.modules.items():
        a = sum(math.copysign(math.sqrt(abs(w * x.modules[module].scaling)), w) * x.modules[module].A
                for w, x in zip(weights, inputs))
        b = sum(math.sqrt(abs(w * x.modules[module].scaling)) * x.modules[module].B for w, x in zip(weights, inputs))
        assert torch.allclose(m.delta(), b @ a, atol=1e-6)
        assert m.scaling == 1.0


def test_half_precision_adapters_stay_half_precision(saved):
    config, tensors = read_adapter_config(saved / "a"), read_adapter_tensors(saved / "a")
    half = (config, {k: v.to(torch.bfloat16) for k, v in tensors.items()})
    for method in ("svd", "ties", "cat"):
        merged = combine_loras([half, half], [0.5, 0.5], method, density=0.5 if method == "ties" else None)
        assert {m.A.dtype for m in merged.modules.values()} == {torch.bfloat16}
    exact = combine_loras([half, half], [0.5, 0.5], "svd", target_rank=8)
    for module, m in read_lora(saved / "a").modules.items():
        expected = m.delta()
        assert (exact.modules[module].delta() - expected).abs().max() <= 1e-2 * expected.abs().max()
