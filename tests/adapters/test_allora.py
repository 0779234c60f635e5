"""ALLoRA: no scaling, no dropout, a per-row adaptive learning rate c_i = 1/sqrt(‖(BA)_i‖ + 1/η²).

The rule is written out here with plain loops, independently of allora.py.
"""

from __future__ import annotations

import copy
import math

import peft
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_llama

from tuneforge.adapters import LoraConfig, add_adapter, save_adapter
from tuneforge.adapters.rank.allora import AlloraConfig, AlloraLinear
from tuneforge.adapters.hooks import training_hooks
from tuneforge.adapters.model import wrapped_layers
from tuneforge.config.schema import TrainingConfig
from tuneforge.train.optim import build_optimizer

TARGETS = ["k_proj", "up_proj"]
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, used by build_optimizer


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


def paper_coefficients(lora_A: torch.Tensor, lora_B: torch.Tensor, eta: float) -> list[float]:
    """c_i = 1 / sqrt(‖row i of B A‖₂ + 1/η²), one per output row, by explicit sums."""
    out_features, r = lora_B.shape
    in_features = lora_A.shape[1]
    coefficients = []
    for i in range(out_features):
        row = [sum(float(lora_B[i, k]) * float(lora_A[k, j]) for k in range(r)) for j in range(in_features)]
        norm = math.sqrt(sum(v * v for v in row))
        coefficients.append(1.0 / math.sqrt(norm + 1.0 / eta ** 2))
    return coefficients


def test_only_the_gradient_reaching_A_is_scaled_per_output_row():
    torch.manual_seed(0)
    adapter = AlloraLinear(in_features=5, out_features=3, r=2, eta=2.0, transposed=False).double()
    with torch.no_grad():
        adapter.lora_B.normal_()
        adapter.lora_B[1].zero_()  # a zero row gets the largest multiplier, eta
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4, 3, dtype=torch.float64)
    adapter.lora_output(x).backward(upstream)

    A, B = adapter.lora_A.detach(), adapter.lora_B.detach()
    c = paper_coefficients(A, B, eta=2.0)
    assert c[1] == 2.0
    expected_A = torch.zeros_like(A)
    expected_B = torch.zeros_like(B)
    for t in range(4):
        hidden = A @ x[t].detach()  # (r,)
        for i in range(3):
            expected_B[i] += upstream[t, i] * hidden
            expected_A += c[i] * upstream[t, i] * torch.outer(B[i], x[t].detach())
    torch.testing.assert_close(adapter.lora_A.grad, expected_A)
    torch.testing.assert_close(adapter.lora_B.grad, expected_B)
    torch.testing.assert_close(x.grad, upstream @ B @ A)  # the input's gradient is left alone


def test_each_row_of_B_steps_with_its_own_learning_rate():
    _, model = allora_model(eta=3.0)
    first = adapters(model)[0]
    with torch.no_grad():
        first.lora_B[0].zero_()
    lr = 1e-2
    optimizer = build_optimizer(model, TrainingConfig(lr=lr))
    ids = sample_ids()
    model(ids, labels=ids).loss.backward()
    before = [(a.lora_A.detach().clone(), a.lora_B.detach().clone(), a.lora_A.grad.clone(), a.lora_B.grad.clone())
              for a in adapters(model)]
    optimizer.step()
    for adapter, (A, B, grad_A, grad_B) in zip(adapters(model), before):
        # Adam's first step is lr·g/(|g|+eps); ALLoRA multiplies row i of B's step by c_i.
        c = torch.tensor(paper_coefficients(A, B, eta=3.0), dtype=B.dtype)[:, None]
        torch.testing.assert_close(adapter.lora_B.detach(), B - lr * c * grad_B / (grad_B.abs() + ADAM_EPS),
                                   atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(adapter.lora_A.detach(), A - lr * grad_A / (grad_A.abs() + ADAM_EPS),
                                   atol=1e-6, rtol=1e-5)
    step = (adapters(model)[0].lora_B[0] - before[0][1][0]).abs()
    torch.testing.assert_close(step, torch.full_like(step, 3.0 * lr), atol=1e-6, rtol=1e-4)


def train_two_steps(model, lr=1e-2):
    """Two optimizer steps the way the training loop takes them (hooks included)."""
    hooks = training_hooks(model, "default")
    optimizer = build_optimizer(model, TrainingConfig(lr=lr))
    ids = sample_ids()
    for step in range(2):
        model(ids, labels=ids).loss.backward()
        hooks.before_optimizer_step(model, step, 2)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hooks.after_optimizer_step(model, step, 2)
    return [layer.adapters["default"].delta_weight(layer.base_layer).detach() for _, layer in wrapped_layers(model)]


def test_training_differs_from_lora_with_alpha_equal_to_r():
    base = tiny_llama()
    torch.manual_seed(5)
    allora = copy.deepcopy(base)
    add_adapter(allora, AlloraConfig(r=4, eta=4.0, target_modules=TARGETS))
    torch.manual_seed(5)
    lora = copy.deepcopy(base)
    add_adapter(lora, LoraConfig(r=4, alpha=4, dropout=0.0, target_modules=TARGETS))
    for a, b in zip(adapters(allora), adapters(lora)):
        torch.testing.assert_close(a.lora_A, b.lora_A)  # the same starting point
    for ours, plain in zip(train_two_steps(allora), train_two_steps(lora)):
        # B starts at zero, so every row's step is eta = 4 times LoRA's at first.
        ratio = ours.norm() / plain.norm()
        assert ratio > 2.0, f"ALLoRA's update is only {ratio:.3f}x LoRA(alpha=r)'s"


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


def test_the_training_loop_takes_eta_times_larger_first_steps_on_B(tmp_path):
    from tiny_models import tiny_chat_model_and_tokenizer

    from tuneforge.config import parse_train_config
    from tuneforge.train import train

    model, tokenizer = tiny_chat_model_and_tokenizer()
    lr = 1e-3
    config = parse_train_config({
        "output_dir": str(tmp_path / "run"),
        "adapter": {"method": "allora", "r": 4, "eta": 4.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": "arithmetic", "options": {"size": 8}, "max_seq_len": 192, "eval_size": 0},
        "training": {"max_steps": 1, "batch_size": 4, "lr": lr, "seed": 3, "scheduler": "constant",
                     "warmup_steps": 0},
    })
    train(config, model_and_tokenizer=(model, tokenizer))
    for adapter in adapters(model):
        # B started at zero (coefficient eta for every row): Adam's first step is lr·sign(g), times eta.
        steps = adapter.lora_B.detach().abs().flatten()
        moved = steps[steps > 0]
        assert moved.numel() > 0.9 * steps.numel()
        torch.testing.assert_close(moved.median(), torch.tensor(4.0 * lr), atol=0, rtol=1e-3)


def test_a_resumed_run_keeps_the_per_row_learning_rate(tmp_path):
    """The step multipliers live on the optimizer object, so a resumed run must get them again."""
    import pytest
    from tiny_models import tiny_chat_model_and_tokenizer

    from tuneforge.config import parse_train_config
    from tuneforge.train import train

    def config(name):
        return parse_train_config({
            "output_dir": str(tmp_path / name),
            "adapter": {"method": "allora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": "arithmetic", "options": {"size": 24}, "max_seq_len": 192, "eval_size": 0},
            "training": {"max_steps": 4, "batch_size": 4, "lr": 5e-3, "save_every": 2, "seed": 7},
        })

    full = []
    train(config("full"), model_and_tokenizer=tiny_chat_model_and_tokenizer(),
          on_step=lambda s, loss: full.append(loss))

    def stop_after_two(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    train(config("partial"), model_and_tokenizer=tiny_chat_model_and_tokenizer(), on_step=stop_after_two)
    resumed = []
    train(config("partial"), resume=True, model_and_tokenizer=tiny_chat_model_and_tokenizer(),
          on_step=lambda s, loss: resumed.append(loss))
    assert resumed == pytest.approx(full[2:], rel=1e-5, abs=1e-6)
