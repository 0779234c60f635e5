"""LoRA initialisations against naive reference formulas (numpy / float64), plus save, load, training.

peft is the oracle in test_lora_inits_peft.py; bad input is in test_lora_inits_errors.py.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_chat_model_and_tokenizer, tiny_gpt2, tiny_llama

from tuneforge.adapters import LoraConfig, add_adapter, load_adapter, merge_adapters, save_adapter
from tuneforge.adapters.hooks import training_hooks
from tuneforge.adapters.lora.inits import initialize_lora
from tuneforge.adapters.lora.inits.corda import DAMPING
from tuneforge.adapters.lora.inits.eva import allocate_ranks
from tuneforge.adapters.lora.inits.loftq import loftq_factors, nf4_roundtrip
from tuneforge.adapters.lora.inits.pissa import pissa_factors
from tuneforge.adapters.model import wrapped_layers
from tuneforge.adapters.peft_format import load_adapter_weights
from tuneforge.errors import AdapterError


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def adapted(make_model=tiny_llama, **kwargs):
    base = make_model()
    model = copy.deepcopy(base)
    add_adapter(model, LoraConfig(**kwargs))
    return base, model


def batches(count=3, batch=2, length=24, seed=30):
    return [{"input_ids": sample_ids(batch, length, seed=seed + i)} for i in range(count)]


def weight_out_in(layer) -> np.ndarray:
    weight = layer.base_layer.weight.detach().double().numpy()
    return weight.T if layer.adapters["default"].transposed else weight


def init_product(adapter) -> np.ndarray:
    """s·B0 A0 as float64 (out, in)."""
    return (adapter.init_B.double() @ adapter.init_A.double()).numpy() * adapter.scaling


def input_grams(base, module_names, calibration):
    """Naive reference: mean x xᵀ of each module's inputs over all tokens, in float64."""
    grams = {name: 0 for name in module_names}
    counts = dict.fromkeys(module_names, 0)
    handles = []
    for name in module_names:
        def record(module, args, name=name):
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).double().numpy()
            grams[name] = grams[name] + rows.T @ rows
            counts[name] += rows.shape[0]
        handles.append(base.get_submodule(name).register_forward_pre_hook(record))
    with torch.no_grad():
        for batch in calibration:
            base(batch["input_ids"])
    for handle in handles:
        handle.remove()
    return {name: grams[name] / counts[name] for name in module_names}


def input_covariances(base, module_names, calibration):
    """Naive reference: the covariance of each module's inputs over all tokens (centred), in float64."""
    rows = {name: [] for name in module_names}
    handles = [base.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: rows[name].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for name in module_names]
    with torch.no_grad():
        for batch in calibration:
            base(batch["input_ids"])
    for handle in handles:
        handle.remove()
    covariances = {}
    for name in module_names:
        inputs = torch.cat(rows[name]).double().numpy()
        centred = inputs - inputs.mean(0)
        covariances[name] = centred.T @ centred / len(inputs)
    return covariances


def assert_rows_match_up_to_sign(actual: np.ndarray, expected: np.ndarray, atol: float):
    for row, reference in zip(actual, expected):
        sign = 1.0 if row @ reference >= 0 else -1.0
        np.testing.assert_allclose(sign * row, reference, atol=atol)


# --- data-free inits -------------------------------------------------------------------------------

@pytest.mark.parametrize("make_model,targets", [(tiny_llama, ["q_proj", "down_proj"]), (tiny_gpt2, ["c_attn"])])
def test_pissa_takes_the_best_rank_r_approximation_of_w(make_model, targets):
    _, model = adapted(make_model, r=4, alpha=8, init="pissa", target_modules=targets)
    for _, layer in wrapped_layers(model):
        weight = weight_out_in(layer)
        left, values, right_t = np.linalg.svd(weight, full_matrices=False)
        principal = (left[:, :4] * values[:4]) @ right_t[:4]
        np.testing.assert_allclose(init_product(layer.adapters["default"]), principal, atol=1e-5)
        # A and B carry the singular values evenly: both sqrt(S/s) times orthonormal vectors.
        adapter = layer.adapters["default"]
        row_norms = adapter.lora_A.detach().double().norm(dim=1).numpy()
        np.testing.assert_allclose(row_norms, np.sqrt(values[:4] / adapter.scaling), rtol=1e-5)


def test_pissa_niter_matches_the_exact_svd_on_a_decaying_spectrum():
    generator = torch.Generator().manual_seed(3)
    left = torch.linalg.qr(torch.randn(48, 48, generator=generator))[0]
    right = torch.linalg.qr(torch.randn(40, 40, generator=generator))[0]
    values = 0.7 ** torch.arange(40.0)
    weight = (left[:, :40] * values) @ right.T
    exact_A, exact_B = pissa_factors(weight, 4, 2.0)
    fast_A, fast_B = pissa_factors(weight, 4, 2.0, niter=2)
    torch.testing.assert_close(fast_B @ fast_A, exact_B @ exact_A, atol=1e-4, rtol=0)


def test_pissa_niter_is_deterministic_so_reloading_rebuilds_the_same_residual(tmp_path):
    base, model = adapted(r=4, init="pissa", pissa_niter=1, target_modules=["gate_proj"])
    _, again = adapted(r=4, init="pissa", pissa_niter=1, target_modules=["gate_proj"])
    for (_, one), (_, two) in zip(wrapped_layers(model), wrapped_layers(again)):
        assert torch.equal(one.adapters["default"].init_A, two.adapters["default"].init_A)
    perturb_trainable(model)
    save_adapter(model, tmp_path)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    ids = sample_ids()
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), atol=0, rtol=0)


def test_olora_b_is_an_orthonormal_basis_of_ws_first_columns():
    _, model = adapted(r=4, init="olora", target_modules=["q_proj", "up_proj"])
    for _, layer in wrapped_layers(model):
        adapter = layer.adapters["default"]
        basis = adapter.lora_B.detach().double().numpy()
        np.testing.assert_allclose(basis.T @ basis, np.eye(4), atol=1e-6)
        weight = weight_out_in(layer)
        first = weight[:, :4]
        np.testing.assert_allclose(basis @ (basis.T @ first), first, atol=1e-5)
        # A0 = Qᵣᵀ W: the residual is W minus its projection onto that basis, times s.
        np.testing.assert_allclose(init_product(adapter), adapter.scaling * basis @ (basis.T @ weight), atol=1e-5)


def test_residual_inits_leave_base_weights_untouched_and_merge_exactly():
    base, model = adapted(r=4, init="pissa", target_modules=["q_proj"])
    for name, layer in wrapped_layers(model):
        assert torch.equal(layer.base_layer.weight, base.get_submodule(name).weight)
    perturb_trainable(model)
    ids = sample_ids()
    expected = logits(model, ids)
    merge_adapters(model)
    for name, layer in wrapped_layers(model):
        adapter = layer.adapters["default"]
        reference = base.get_submodule(name).weight + adapter.scaling * (
            adapter.lora_B @ adapter.lora_A - adapter.init_B @ adapter.init_A)
        torch.testing.assert_close(layer.base_layer.weight, reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-4)


def test_pissa_on_a_quantized_base_starts_from_the_dequantized_weight():
    from tuneforge.quant.model import quantize_model

    base = quantize_model(tiny_llama(), compute_dtype=torch.float32)
    model = copy.deepcopy(base)
    add_adapter(model, LoraConfig(r=4, init="pissa", target_modules=["q_proj"]))
    for _, layer in wrapped_layers(model):
        weight = layer.base_layer.weight.detach().double().numpy()
        left, values, right_t = np.linalg.svd(weight, full_matrices=False)
        np.testing.assert_allclose(init_product(layer.adapters["default"]), (left[:, :4] * values[:4]) @ right_t[:4],
                                   atol=1e-5)
    ids = sample_ids()
    torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=1e-5, rtol=0)


# --- LoftQ -----------------------------------------------------------------------------------------

def _loftq_errors(weight: torch.Tensor, r: int, scaling: float, iters: int) -> tuple[float, float]:
    plain = (weight - nf4_roundtrip(weight)).norm().item()
    quantized, lora_A, lora_B = loftq_factors(weight, r, scaling, iters)
    return plain, (weight - quantized - scaling * lora_B @ lora_A).norm().item()


def test_loftq_lowers_the_quantization_error():
    generator = torch.Generator().manual_seed(0)
    random_weight = torch.randn(256, 128, generator=generator) * 0.02
    plain, one = _loftq_errors(random_weight, r=16, scaling=2.0, iters=1)
    _, five = _loftq_errors(random_weight, r=16, scaling=2.0, iters=5)
    print(f"\nLoftQ on a random 256x128 weight, r=16: ||W-Q||={plain:.5f}, "
          f"||W-(Q+sBA)|| iters=1: {one:.5f} ({100 * (1 - one / plain):.1f}% lower), "
          f"iters=5: {five:.5f} ({100 * (1 - five / plain):.1f}% lower)")
    assert one < 0.93 * plain and five <= one * 1.001
    tiny_weight = tiny_llama().model.layers[0].mlp.down_proj.weight.detach()  # 32x64
    plain, one = _loftq_errors(tiny_weight, r=8, scaling=2.0, iters=1)
    print(f"LoftQ on tiny_llama down_proj 32x64, r=8: ||W-Q||={plain:.5f}, ||W-(Q+sBA)||={one:.5f} "
          f"({100 * (1 - one / plain):.1f}% lower)")
    assert one < 0.85 * plain


def test_loftq_base_holds_q_and_requantizes_to_a_real_4bit_layer():
    from tuneforge.quant.linear import QuantLinear
    from tuneforge.quant.model import quantize_model

    base, model = adapted(r=4, init="loftq", loftq_iters=2, target_modules=["q_proj", "down_proj"])
    for name, layer in wrapped_layers(model):
        original = base.get_submodule(name).weight.detach()
        adapter = layer.adapters["default"]
        quantized, lora_A, lora_B = loftq_factors(original, 4, adapter.scaling, 2)
        torch.testing.assert_close(layer.base_layer.weight.detach(), quantized, atol=0, rtol=0)
        torch.testing.assert_close(adapter.lora_A.detach(), lora_A, atol=0, rtol=0)
        assert not adapter.has_residual
    ids = sample_ids()
    expected = logits(model, ids)
    quantize_model(model, double_quant=False, compute_dtype=torch.float32, skip_modules=["lm_head", "k_proj",
                   "v_proj", "o_proj", "gate_proj", "up_proj"])
    assert all(isinstance(layer.base_layer, QuantLinear) for _, layer in wrapped_layers(model))
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)


def test_loftq_start_is_closer_to_the_original_model_than_plain_nf4():
    base, model = adapted(r=8, init="loftq", target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])
    plain = copy.deepcopy(base)
    for name, _ in wrapped_layers(model):
        weight = plain.get_submodule(name).weight
        weight.data.copy_(nf4_roundtrip(weight.detach()))
    ids = sample_ids()
    reference = logits(base, ids)
    assert (logits(model, ids) - reference).norm() < (logits(plain, ids) - reference).norm()


def test_loftq_adapter_reloads_onto_the_original_base(tmp_path):
    base, model = adapted(r=4, init="loftq", target_modules=["v_proj", "up_proj"])
    perturb_trainable(model)
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    ids = sample_ids()
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), atol=1e-6, rtol=0)


# --- data-driven inits -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["instruction-previewed", "knowledge-preserved"])
def test_corda_adapts_the_top_or_bottom_components_of_w_times_c(mode):
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    base, model = adapted(r=4, init="corda", corda_mode=mode, target_modules=targets)
    calibration = batches()
    initialize_lora(model, "default", calibration)
    grams = input_grams(base, targets, calibration)
    layers = dict(wrapped_layers(model))
    for name in targets:
        weight = weight_out_in(layers[name])
        covariance = grams[name] + DAMPING * np.mean(np.diag(grams[name])) * np.eye(grams[name].shape[0])
        left, values, right_t = np.linalg.svd(weight @ covariance, full_matrices=False)
        chosen = slice(0, 4) if mode == "instruction-previewed" else slice(len(values) - 4, len(values))
        expected = (left[:, chosen] * values[chosen]) @ right_t[chosen]
        np.testing.assert_allclose(init_product(layers[name].adapters["default"]) @ covariance, expected,
                                   atol=2e-4 * np.abs(expected).max())
    ids = sample_ids()
    torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=1e-5, rtol=0)


def test_lora_ga_factors_follow_the_gradient_svd():
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"]
    base, model = adapted(r=4, init="lora-ga", lora_ga_gamma=9.0, target_modules=targets)
    calibration = batches(count=2)
    initialize_lora(model, "default", calibration)
    reference = copy.deepcopy(base)
    weights = [reference.get_submodule(name).weight for name in targets]
    for weight in weights:
        weight.requires_grad_(True)
    for batch in calibration:
        reference(batch["input_ids"], labels=batch["input_ids"]).loss.backward()
    layers = dict(wrapped_layers(model))
    for name, weight in zip(targets, weights):
        gradient = weight.grad.double().numpy() / len(calibration)
        left, _, right_t = np.linalg.svd(gradient, full_matrices=False)
        scale = gradient.shape[0] ** 0.25 / 9.0 ** 0.5
        adapter = layers[name].adapters["default"]
        assert_rows_match_up_to_sign(adapter.lora_A.detach().double().numpy(), scale * right_t[:4], atol=1e-4)
        assert_rows_match_up_to_sign(adapter.lora_B.detach().double().numpy().T, scale * left[:, 4:8].T, atol=1e-4)
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "adapters" not in n)
    ids = sample_ids()
    torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=1e-5, rtol=0)


def test_eva_takes_top_directions_of_the_centred_inputs_and_keeps_the_rank_budget():
    targets = ["q_proj", "v_proj", "up_proj"]
    base, model = adapted(r=4, alpha=8, init="eva", eva_rho=2.0, target_modules=targets)
    calibration = batches()
    initialize_lora(model, "default", calibration)
    layers = dict(wrapped_layers(model))
    covariances = input_covariances(base, list(layers), calibration)
    ranks = {name: layer.adapters["default"].r for name, layer in layers.items()}
    assert sum(ranks.values()) == 4 * 6 and max(ranks.values()) <= 8, "six target layers share a budget of 6 r"
    config = model.tuneforge_adapters.configs["default"]
    assert {name: config.rank_for(name) for name in layers} == ranks
    for name, layer in layers.items():
        adapter = layer.adapters["default"]
        eigenvalues, vectors = np.linalg.eigh(covariances[name])
        top = vectors[:, ::-1][:, : adapter.r].T
        assert_rows_match_up_to_sign(adapter.lora_A.detach().double().numpy(), top, atol=1e-4)
        assert not adapter.lora_B.any()
        assert adapter.scaling == pytest.approx(8 / 4), "a redistributed layer keeps the scale alpha / r"
        assert config.alpha_for(name) / config.rank_for(name) == pytest.approx(8 / 4)
    ids = sample_ids()
    torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=0, rtol=0)


def test_eva_rank_allocation_against_hand_worked_examples():
    ratios = {"a": torch.tensor([0.5, 0.3, 0.1, 0.05]), "b": torch.tensor([0.9, 0.05]),
              "c": torch.tensor([0.4, 0.35, 0.2, 0.01])}
    # budget 6, the six largest ratios: b:0.9, a:0.5, c:0.4, c:0.35, a:0.3, c:0.2
    assert allocate_ranks(ratios, {"a": 2, "b": 2, "c": 2}) == {"a": 2, "b": 1, "c": 3}
    # budget 3: a:0.6, c:0.5, c:0.4; b has nothing in the top 3 and gets rank 0 (as in peft)
    ratios = {"a": torch.tensor([0.6, 0.3]), "b": torch.tensor([0.2, 0.1]), "c": torch.tensor([0.5, 0.4])}
    assert allocate_ranks(ratios, {"a": 1, "b": 1, "c": 1}) == {"a": 1, "b": 0, "c": 2}


def test_eva_with_rho_one_keeps_every_rank_and_reloads_without_data(tmp_path):
    base, model = adapted(r=4, init="eva", eva_rho=1.0, target_modules=["k_proj", "o_proj"])
    initialize_lora(model, "default", batches())
    assert all(layer.adapters["default"].r == 4 for _, layer in wrapped_layers(model))
    perturb_trainable(model)
    save_adapter(model, tmp_path)
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, tmp_path).init == "eva"
    ids = sample_ids()
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), atol=1e-6, rtol=0)


def test_eva_with_redistributed_ranks_round_trips_through_its_file(tmp_path):
    base, model = adapted(r=4, init="eva", target_modules=["q_proj", "down_proj"])
    initialize_lora(model, "default", batches())
    perturb_trainable(model)
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["eva_config"] == {"rho": 2.0}
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    ids = sample_ids()
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("init", ["corda", "lora-ga", "eva"])
def test_data_driven_init_refuses_to_run_before_calibration(init):
    _, model = adapted(r=4, init=init, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match=rf"init '{init}' on 'model.layers.0.self_attn.q_proj' needs calibration "
                                           r"data.*initialize_lora\(model, adapter_name, batches\)"):
        model(sample_ids())


@pytest.mark.parametrize("init", ["corda", "lora-ga"])
def test_data_driven_residual_adapter_is_refused_on_a_plain_base_but_resumes(init, tmp_path):
    base, model = adapted(r=4, init=init, target_modules=["q_proj", "up_proj"])
    calibration = batches()
    initialize_lora(model, "default", calibration)
    perturb_trainable(model)
    save_adapter(model, tmp_path)
    fresh = copy.deepcopy(base)
    with pytest.raises(AdapterError, match=r"init=.*calibration data.*export_as_plain_lora"):
        load_adapter(fresh, tmp_path)
    assert not list(wrapped_layers(fresh)), "a refused load must not leave a half-loaded adapter"
    # The trainer's resume path: same init on the same batches, then the saved weights.
    add_adapter(fresh, LoraConfig(r=4, init=init, target_modules=["q_proj", "up_proj"]))
    initialize_lora(fresh, "default", calibration)
    load_adapter_weights(fresh, tmp_path)
    ids = sample_ids()
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), atol=1e-6, rtol=0)


def test_training_hooks_ask_for_data_only_for_data_driven_inits():
    _, pissa = adapted(r=4, init="pissa", target_modules=["q_proj"])
    assert not training_hooks(pissa, "default").needs_data()
    base, corda = adapted(r=4, init="corda", target_modules=["q_proj"])
    hooks = training_hooks(corda, "default")
    assert hooks.needs_data()
    hooks.prepare(corda, batches(), loss_fn=None)
    ids = sample_ids()
    torch.testing.assert_close(logits(corda, ids), logits(base, ids), atol=1e-5, rtol=0)


def _train_config(tmp_path, name, adapter, **training):
    from tuneforge.config import parse_train_config

    settings = {"max_steps": 4, "batch_size": 4, "lr": 5e-3, "log_every": 1, "save_every": 2, "seed": 7,
                "init_batches": 2}
    settings.update(training)
    return parse_train_config({
        "output_dir": str(tmp_path / name),
        "adapter": adapter,
        "data": {"train": "arithmetic", "options": {"size": 32}, "max_seq_len": 192, "eval_size": 4},
        "training": settings,
    })


def test_trainer_calibrates_lora_ga_and_resumes_identically(tmp_path):
    from tuneforge.train import train

    adapter = {"r": 4, "init": "lora-ga", "target_modules": ["q_proj", "down_proj"]}
    full_losses = []
    train(_train_config(tmp_path, "full", adapter), model_and_tokenizer=tiny_chat_model_and_tokenizer(),
          on_step=lambda step, loss: full_losses.append(loss))

    def stop_after_two(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    partial = _train_config(tmp_path, "partial", adapter)
    train(partial, model_and_tokenizer=tiny_chat_model_and_tokenizer(), on_step=stop_after_two)
    resumed = []
    summary = train(partial, resume=True, model_and_tokenizer=tiny_chat_model_and_tokenizer(),
                    on_step=lambda step, loss: resumed.append(loss))
    assert resumed == pytest.approx(full_losses[2:], rel=1e-5, abs=1e-6)
    saved = json.loads((summary.run_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "lora_ga"


def test_trainer_saves_eva_ranks_with_the_adapter(tmp_path):
    from tuneforge.train import train

    model, tokenizer = tiny_chat_model_and_tokenizer()
    base = copy.deepcopy(model)
    adapter = {"r": 4, "init": "eva", "target_modules": ["v_proj", "up_proj"]}
    summary = train(_train_config(tmp_path, "eva", adapter, max_steps=2), model_and_tokenizer=(model, tokenizer))
    saved = json.loads((summary.run_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva"
    trained = {name: next(iter(layer.adapters.values())).r for name, layer in wrapped_layers(model)}
    assert sum(trained.values()) == 4 * len(trained)
    load_adapter(base, summary.run_dir / "adapter")
    assert {name: layer.adapters["default"].r for name, layer in wrapped_layers(base)} == trained
