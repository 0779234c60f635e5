"""ALLoRA: no scaling, no dropout, each row's gradient divided by sqrt(||row||² + 1/eta²)."""

from __future__ import annotations

import copy
import math

import peft
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_llama

from tuneforge.adapters import add_adapter, save_adapter
from tuneforge.adapters.allora import AlloraConfig
from tuneforge.adapters.hooks import training_hooks
from tuneforge.adapters.model import wrapped_layers

TARGETS = ["k_proj", "up_proj"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def allora_model(**settings):
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, AlloraConfig(**{"r": 4, "target_modules": TARGETS, **settings}))
    perturb_trainable(model, scale=0.3)
    return base, model


def adapters(model):
    return [layer.adapters["default"] for _, layer in wrapped_layers(model)]


def test_gradients_are_rescaled_per_row():
    _, model = allora_model(eta=2.0)
    ids = sample_ids()
    model.train()
    model(ids, labels=ids).loss.backward()
    raw = [(adapter.lora_A.grad.clone(), adapter.lora_B.grad.clone()) for adapter in adapters(model)]
    training_hooks(model, "default").before_optimizer_step(model, 0, 1)
    for adapter, grads in zip(adapters(model), raw):
        for param, grad in zip((adapter.lora_A, adapter.lora_B), grads):
            for row in range(param.shape[0]):
                norm_sq = sum(float(v) ** 2 for v in param[row].detach())
                expected = grad[row] / math.sqrt(norm_sq + 1 / 2.0 ** 2)
                torch.testing.assert_close(param.grad[row], expected, atol=1e-9, rtol=1e-5)


def test_zero_rows_get_the_largest_multiplier_eta():
    _, model = allora_model(eta=3.0)
    adapter = adapters(model)[0]
    with torch.no_grad():
        adapter.lora_B[0].zero_()
    adapter.lora_B.grad = torch.ones_like(adapter.lora_B)
    adapter.lora_A.grad = torch.ones_like(adapter.lora_A)
    training_hooks(model, "default").before_optimizer_step(model, 0, 1)
    torch.testing.assert_close(adapter.lora_B.grad[0], torch.full_like(adapter.lora_B[0], 3.0))
    assert torch.all(adapter.lora_B.grad[1:] < 3.0)


def test_no_scaling_no_dropout_and_peft_loads_it_as_lora(tmp_path):
    base, model = allora_model()
    for _, layer in wrapped_layers(model):
        adapter = layer.adapters["default"]
        assert adapter.scaling == 1.0 and isinstance(adapter.dropout, torch.nn.Identity)
        torch.testing.assert_close(adapter.delta_weight(layer.base_layer), adapter.lora_B @ adapter.lora_A)
    ids = sample_ids()
    expected = logits(model, ids)
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    diff = (logits(theirs, ids) - expected).abs().max().item()
    assert diff <= 1e-5, f"peft's logits differ by {diff}"
