"""LoRA initialisations against the `peft` package as an oracle.

Compared with peft: PiSSA and OLoRA factors (up to the sign of each component) and the residual
they leave, CorDA's residual (both modes), LoRA-GA's full-weight gradient, EVA's rank redistribution
(rank 0 included), scales and components (peft's incremental randomized PCA stops at cosine
similarity tau = 0.99 to the exact components we compute, so components are compared to that
tolerance, on one calibration batch that peft repeats until it converges); files both ways
(peft re-derives the PiSSA/OLoRA residual on load, as we do); and the rank-2r plain-LoRA export of
every residual init loading in peft on the *unmodified* base.

Not compared, with the reason:
- LoftQ: peft's ``loftq_init`` needs bitsandbytes with CUDA (not installed; no GPU in CI).
- LoRA-GA factors: peft's scale multiplies B by the gradient's singular values (all its scale
  options do); we follow the paper's stable scale d_out^(1/4)/sqrt(gamma) on singular vectors
  only. The gradient both start from is compared.
- OLoRA on GPT-2's Conv1D: peft's ``olora_init`` takes the QR of the stored (in, out) weight without
  honouring fan_in_fan_out, so its factors come out with swapped shapes; ours is checked on Conv1D by
  the shared checks (cases.py) and the plain-LoRA export below.
- pissa_niter on peft's side: peft draws its randomized-SVD start from the global RNG, so its
  residual differs from ours at low niter; our own reload uses a fixed seed and is exact.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_gpt2, tiny_llama

from tuneforge.adapters import LoraConfig, add_adapter, load_adapter, save_adapter
from tuneforge.adapters.model import disabled_adapters, wrapped_layers
from tuneforge.adapters.lora.inits import export_as_plain_lora, initialize_lora
from tuneforge.adapters.lora.inits.calibration import collect_weight_gradients

PEFT_NAMES = {"alpha": "lora_alpha", "init": "init_lora_weights"}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def ours(make_model, **kwargs):
    base = make_model()
    model = copy.deepcopy(base)
    add_adapter(model, LoraConfig(**kwargs))
    return base, model


def theirs(base, **kwargs):
    kwargs = {PEFT_NAMES.get(k, k): v for k, v in kwargs.items()}
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).eval()


def peft_layers(model):
    """module path (as in the base model) -> peft LoRA layer."""
    return {name.removeprefix("base_model.model."): module for name, module in model.named_modules()
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})}


def align_signs(ours_A, ours_B, their_A, their_B):
    """Flip each of our components (row of A with column of B) to match peft's sign."""
    signs = torch.sign((ours_A * their_A).sum(dim=1))
    signs[signs == 0] = 1
    return ours_A * signs[:, None], ours_B * signs[None, :]


FACTOR_CASES = [
    ("pissa-llama", tiny_llama, dict(r=4, alpha=8, init="pissa", target_modules=["q_proj", "v_proj", "down_proj"])),
    ("pissa-llama-rslora", tiny_llama, dict(r=4, alpha=3, use_rslora=True, init="pissa", target_modules=["o_proj"])),
    ("olora-llama", tiny_llama, dict(r=4, alpha=8, init="olora", target_modules=["k_proj", "up_proj"])),
    ("pissa-gpt2", tiny_gpt2, dict(r=4, alpha=8, init="pissa", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
]


@pytest.mark.parametrize("case_id,make_model,kwargs", FACTOR_CASES, ids=[c[0] for c in FACTOR_CASES])
def test_factors_and_residual_match_peft(case_id, make_model, kwargs):
    base, model = ours(make_model, **kwargs)
    reference = theirs(base, **kwargs)
    their_layers = peft_layers(reference)
    layers = dict(wrapped_layers(model))
    assert set(layers) == set(their_layers) and layers
    for name, layer in layers.items():
        adapter, their = layer.adapters["default"], their_layers[name]
        their_A, their_B = their.lora_A["default"].weight, their.lora_B["default"].weight
        our_A, our_B = align_signs(adapter.lora_A.detach(), adapter.lora_B.detach(), their_A.detach(), their_B.detach())
        torch.testing.assert_close(our_A, their_A, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(our_B, their_B, atol=1e-5, rtol=1e-4)
        # peft stores W - s·B0 A0 in the base layer; ours is W with the same product applied on the fly.
        residual = layer.base_layer.weight + adapter.delta_weight(layer.base_layer) - _product(adapter, layer)
        torch.testing.assert_close(residual, their.base_layer.weight, atol=1e-5, rtol=1e-4)


def _product(adapter, layer):
    product = adapter.lora_B @ adapter.lora_A * adapter.scaling
    return product.T if adapter.transposed else product


@pytest.mark.parametrize("case_id,make_model,kwargs", FACTOR_CASES, ids=[c[0] for c in FACTOR_CASES])
def test_same_trained_factors_give_peft_logits(case_id, make_model, kwargs):
    base, model = ours(make_model, **kwargs)
    reference = theirs(base, **kwargs)
    perturb_trainable(model)
    their_layers = peft_layers(reference)
    with torch.no_grad():
        for name, layer in wrapped_layers(model):
            their_layers[name].lora_A["default"].weight.copy_(layer.adapters["default"].lora_A)
            their_layers[name].lora_B["default"].weight.copy_(layer.adapters["default"].lora_B)
    ids = sample_ids()
    diff = (logits(model, ids) - logits(reference, ids)).abs().max().item()
    assert diff <= 1e-4, f"logits differ from peft's by {diff}"


@pytest.mark.parametrize("case_id,make_model,kwargs", FACTOR_CASES, ids=[c[0] for c in FACTOR_CASES])
def test_saved_adapter_loads_in_peft_which_rederives_the_residual(case_id, make_model, kwargs, tmp_path):
    base, model = ours(make_model, **kwargs)
    perturb_trainable(model)
    save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert loaded.peft_config["default"].init_lora_weights == kwargs["init"]
    ids = sample_ids()
    diff = (logits(loaded, ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-4, f"peft's logits differ by {diff}"


@pytest.mark.parametrize("case_id,make_model,kwargs", FACTOR_CASES, ids=[c[0] for c in FACTOR_CASES])
def test_peft_adapter_loads_in_tuneforge(case_id, make_model, kwargs, tmp_path):
    base = make_model()
    reference = theirs(base, **kwargs)
    perturb_trainable(reference)
    reference.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    config = load_adapter(model, tmp_path)
    assert config.init == kwargs["init"]
    ids = sample_ids()
    diff = (logits(model, ids) - logits(reference, ids)).abs().max().item()
    assert diff <= 1e-4, f"tuneforge's logits differ from peft's by {diff}"


def test_pissa_niter_is_recorded_in_peft_spelling(tmp_path):
    base, model = ours(tiny_llama, r=4, init="pissa", pissa_niter=3, target_modules=["q_proj"])
    save_adapter(model, tmp_path)
    assert peft.PeftConfig.from_pretrained(tmp_path).init_lora_weights == "pissa_niter_3"
    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, tmp_path).pissa_niter == 3


def calibration_batches(count=1, batch=1, length=48):
    return [{"input_ids": sample_ids(batch, length, seed=20 + i)} for i in range(count)]


@pytest.mark.parametrize("mode,peft_method", [("instruction-previewed", "ipm"), ("knowledge-preserved", "kpm")])
def test_corda_residual_matches_peft(mode, peft_method):
    pytest.importorskip("attr", reason="peft's CorDA module imports `attrs`, which is not installed")
    from peft.tuners.lora.corda import preprocess_corda

    kwargs = dict(r=4, alpha=8, target_modules=["q_proj", "up_proj", "down_proj"])
    base, model = ours(tiny_llama, init="corda", corda_mode=mode, **kwargs)
    # peft normalises each calibration call by its max and does not support batch > 1: one row, one call.
    batches = calibration_batches()
    initialize_lora(model, "default", batches)
    reference_base = copy.deepcopy(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=kwargs["target_modules"], init_lora_weights="corda",
                             corda_config=peft.tuners.lora.config.CordaConfig(corda_method=peft_method))
    preprocess_corda(reference_base, config, run_model=lambda: reference_base(batches[0]["input_ids"]))
    reference = peft.get_peft_model(reference_base, config).eval()
    their_layers = peft_layers(reference)
    for name, layer in wrapped_layers(model):
        adapter = layer.adapters["default"]
        residual = layer.base_layer.weight - _product(adapter, layer)
        torch.testing.assert_close(residual, their_layers[name].base_layer.weight, atol=2e-5, rtol=1e-3)
        their_product = their_layers[name].lora_B["default"].weight @ their_layers[name].lora_A["default"].weight
        torch.testing.assert_close(adapter.lora_B @ adapter.lora_A, their_product, atol=2e-5, rtol=1e-3)


def test_lora_ga_gradient_matches_peft():
    from peft.tuners.lora.loraga import preprocess_loraga

    targets = ["q_proj", "gate_proj"]
    base, model = ours(tiny_llama, r=4, init="lora-ga", target_modules=targets)
    batches = calibration_batches(count=2, batch=2, length=12)
    layers = {name: layer for name, layer in wrapped_layers(model)}
    with disabled_adapters(model):
        ours_grad = collect_weight_gradients(model, layers, batches,
                                             lambda m, b: m(b["input_ids"], labels=b["input_ids"]).loss)
    reference = copy.deepcopy(base)
    config = peft.LoraConfig(r=4, target_modules=targets, init_lora_weights="lora_ga",
                             lora_ga_config=peft.tuners.lora.config.LoraGAConfig())

    def train_step():
        for batch in batches:
            reference(batch["input_ids"], labels=batch["input_ids"]).loss.backward()

    preprocess_loraga(reference, config, train_step)
    for name, grad in ours_grad.items():
        their = reference.get_submodule(name)._peft_loraga_grad
        # peft may sum or average over calls: compare directions and the scale relative to the count.
        ratio = (their.norm() / grad.norm()).item()
        assert min(abs(ratio - 1), abs(ratio - len(batches))) < 1e-3, f"{name}: gradient scale ratio {ratio}"
        torch.testing.assert_close(grad * ratio, their.float(), atol=1e-6, rtol=1e-4)


EXPORT_CASES = [
    ("pissa", tiny_llama, dict(r=4, alpha=8, init="pissa", target_modules=["q_proj", "v_proj"],
                               rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3.0})),
    ("pissa-niter-rslora", tiny_llama, dict(r=4, init="pissa", pissa_niter=2, use_rslora=True,
                                            target_modules=["o_proj"])),
    ("olora-gpt2", tiny_gpt2, dict(r=4, init="olora", target_modules=["c_attn"], fan_in_fan_out=True)),
    ("corda-kp", tiny_llama, dict(r=4, init="corda", corda_mode="knowledge-preserved",
                                  target_modules=["q_proj", "down_proj"])),
    ("lora-ga", tiny_llama, dict(r=4, init="lora-ga", target_modules=["k_proj", "up_proj"])),
]


@pytest.mark.parametrize("case_id,make_model,kwargs", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_plain_lora_export_loads_on_the_unmodified_base(case_id, make_model, kwargs, tmp_path):
    base, model = ours(make_model, **kwargs)
    initialize_lora(model, "default", calibration_batches(count=2, batch=2, length=24))
    perturb_trainable(model)
    ids = sample_ids()
    expected = logits(model, ids)
    export_as_plain_lora(model, "default", tmp_path)
    saved = peft.PeftConfig.from_pretrained(tmp_path)
    assert saved.init_lora_weights is True and saved.r == 2 * kwargs["r"]
    assert "plain LoRA of rank 8" in (tmp_path / "README.md").read_text()
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    diff = (logits(in_peft, ids) - expected).abs().max().item()
    assert diff <= 1e-4, f"peft's logits differ by {diff}"
    in_tuneforge = copy.deepcopy(base)
    assert load_adapter(in_tuneforge, tmp_path).init == "kaiming"
    diff = (logits(in_tuneforge, ids) - expected).abs().max().item()
    assert diff <= 1e-4, f"tuneforge's logits differ by {diff}"


def test_eva_adapter_with_redistributed_ranks_loads_in_peft(tmp_path):
    base, model = ours(tiny_llama, r=4, init="eva", target_modules=["q_proj", "down_proj"])
    initialize_lora(model, "default", calibration_batches(count=3, batch=2, length=24))
    ranks = {layer.adapters["default"].r for _, layer in wrapped_layers(model)}
    assert len(ranks) > 1, "this calibration should move ranks between layers"
    perturb_trainable(model)
    save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = sample_ids()
    expected = logits(model, ids)
    assert (expected - logits(base, ids)).abs().max() > 1e-3
    diff = (logits(loaded, ids) - expected).abs().max().item()
    assert diff <= 1e-5, f"peft's logits differ by {diff}"


def test_eva_rank_redistribution_scales_and_components_match_peft_including_rank_zero(tmp_path):
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    targets = ["q_proj", "o_proj", "down_proj"]  # distinct inputs: no ties between layers sharing one
    batch = {"input_ids": sample_ids(2, 40, seed=20), "attention_mask": torch.ones(2, 40, dtype=torch.long)}
    base, model = ours(tiny_llama, r=2, alpha=4, init="eva", target_modules=targets)
    initialize_lora(model, "default", [batch])
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=targets, init_lora_weights="eva", eva_config=peft.EvaConfig(rho=2.0)))
    initialize_lora_eva_weights(reference, [batch], show_progress_bar=False)
    theirs_layers = peft_layers(reference)
    ours_layers = {name: layer.adapters["default"] for name, layer in wrapped_layers(model)}
    all_targets = {name for name, _ in base.named_modules() if name.rsplit(".", 1)[-1] in targets}
    assert set(ours_layers) < all_targets, "this calibration should leave some layer with rank 0"
    assert {name: a.r for name, a in ours_layers.items()} == {name: m.r["default"] for name, m in theirs_layers.items()}
    for name, adapter in ours_layers.items():
        theirs_layer = theirs_layers[name]
        assert adapter.scaling == pytest.approx(theirs_layer.scaling["default"]), name
        mine, their_a = adapter.lora_A.detach(), theirs_layer.lora_A["default"].weight.detach()
        cosine = (mine * their_a).sum(1) / (mine.norm(dim=1) * their_a.norm(dim=1))
        assert cosine.abs().min() >= 0.99, f"{name}: components differ from peft's (|cos| {cosine.abs().tolist()})"
    # The saved file rebuilds the same structure (rank-0 layers excluded) in peft.
    perturb_trainable(model)
    save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert set(peft_layers(loaded)) == set(ours_layers)
    ids = sample_ids()
    diff = (logits(loaded, ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-5, f"peft's logits differ by {diff}"
