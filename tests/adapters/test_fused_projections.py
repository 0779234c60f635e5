"""Fused projections (adapters/lora/fused.py) equal the unfused adapted layers: logits and adapter
gradients, for LoRA and DoRA, on tiny Llama and Qwen2 (q/k/v with biases) configs."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB, perturb_trainable, sample_ids, tiny_llama
from transformers import Qwen2Config, Qwen2ForCausalLM

from tuneforge.adapters import LoraConfig, add_adapter, merge_adapters
from tuneforge.adapters.layer import AdaptedLayer
from tuneforge.adapters.lora import fused as fused_module
from tuneforge.adapters.lora.fused import _FrozenBaseLoraFn, fuse_projections, unfuse_projections


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2}
# Every method whose layers take the fused path (fused_kind is not None): LoRA, DoRA, LoRA-FA.
METHODS = {"lora": {}, "dora": {"use_dora": True}, "rslora-ranks": {"use_rslora": True, "rank_pattern": {"k_proj": 2}},
           "lora-fa": {"method": "lora-fa"}}


def adapted_pair(model_name: str, method: str):
    from tuneforge.adapters.rank.lora_fa import LoraFaConfig

    settings = dict(METHODS[method])
    config_class = LoraFaConfig if settings.pop("method", None) == "lora-fa" else LoraConfig
    model = MODELS[model_name]()
    add_adapter(model, config_class(r=4, alpha=8, target_modules="all-linear", **settings))
    perturb_trainable(model)  # B away from zero, so the LoRA terms and their gradients count
    return model, copy.deepcopy(model)


def logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    (logits.float() ** 2).mean().backward()  # every logit gets a distinct gradient
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    original = _FrozenBaseLoraFn.apply

    def counting(*args):
        calls.append(args[4])  # the group's output sizes
        return original(*args)

    monkeypatch.setattr(fused_module._FrozenBaseLoraFn, "apply", counting)
    return calls


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_fused_equals_unfused(model_name, method, fused_calls):
    plain, fused = adapted_pair(model_name, method)
    adapted = sum(isinstance(m, AdaptedLayer) for m in fused.modules())
    assert fuse_projections(fused, "default") == adapted == 14  # 7 Linear per layer, 2 layers
    fused.train(), plain.train()
    ids = sample_ids(batch=2, length=9)
    expected_logits, expected_grads = logits_and_grads(plain, ids)
    logits, grads = logits_and_grads(fused, ids)
    # Per layer: q/k/v as one group, gate/up as one, o and down alone.
    config = fused.config
    head_dim = config.hidden_size // config.num_attention_heads
    qkv = (config.hidden_size, config.num_key_value_heads * head_dim, config.num_key_value_heads * head_dim)
    assert fused_calls.count(qkv) == 2 and fused_calls.count((config.intermediate_size,) * 2) == 2
    assert len(fused_calls) == 8
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_function_gradients_match_finite_differences():
    generator = torch.Generator().manual_seed(0)
    x, weight = (torch.randn(5, 6, generator=generator, dtype=torch.float64) for _ in range(2))
    x = torch.randn(5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 6, generator=generator, dtype=torch.float64)
    a_cat = torch.randn(3, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(4, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(3, 1, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, a, b1, b2: _FrozenBaseLoraFn.apply(x, weight, a, (2, 1), (4, 3), (0.5, 2.0), b1, b2),
        (x, a_cat, b1, b2))


def test_fused_forward_is_the_lora_equation():
    generator = torch.Generator().manual_seed(1)
    x, weight = torch.randn(5, 6, generator=generator), torch.randn(7, 6, generator=generator)
    a1, a2 = torch.randn(2, 6, generator=generator), torch.randn(1, 6, generator=generator)
    b1, b2 = torch.randn(4, 2, generator=generator), torch.randn(3, 1, generator=generator)
    out = _FrozenBaseLoraFn.apply(x, weight, torch.cat([a1, a2]), (2, 1), (4, 3), (0.5, 2.0), b1, b2)
    expected = torch.cat([x @ weight[:4].T + 0.5 * (b1 @ a1 @ x.T).T, x @ weight[4:].T + 2.0 * (b2 @ a2 @ x.T).T], dim=1)
    torch.testing.assert_close(out, expected)


def test_fusing_adds_no_weight_memory_and_unfuse_restores_own_weights():
    _, model = adapted_pair("llama", "lora")
    before = sum(p.numel() for p in model.parameters())
    ids = sample_ids()
    expected = model(input_ids=ids).logits.detach()
    fuse_projections(model, "default")
    attention = model.model.layers[0].self_attn
    storages = {attention.q_proj.base_layer.weight.untyped_storage().data_ptr(),
                attention.k_proj.base_layer.weight.untyped_storage().data_ptr(),
                attention.v_proj.base_layer.weight.untyped_storage().data_ptr()}
    assert len(storages) == 1 and sum(p.numel() for p in model.parameters()) == before
    unfuse_projections(model)
    assert attention.q_proj.base_layer.weight.untyped_storage().data_ptr() != \
        attention.k_proj.base_layer.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_dropout_and_merge_fall_back_to_the_unfused_path(fused_calls):
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=0.1))
    perturb_trainable(model)
    fuse_projections(model, "default")
    model.train()
    model(input_ids=sample_ids())
    assert fused_calls == []  # per-layer dropout masks: unfused
    model.eval()
    ids = sample_ids()
    unmerged = model(input_ids=ids).logits.detach()
    assert len(fused_calls) == 8
    merge_adapters(model)  # merge writes W + ΔW into the rows of the fused weight
    merged = model(input_ids=ids).logits.detach()
    assert len(fused_calls) == 8  # a merged adapter is no longer applied on top
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_fused_stays_close_to_unfused():
    plain, fused = adapted_pair("llama", "lora")
    fuse_projections(fused, "default")
    ids = sample_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        expected_logits, expected_grads = logits_and_grads(plain, ids)
        logits, grads = logits_and_grads(fused, ids)
    torch.testing.assert_close(logits.float(), expected_logits.float(), rtol=2e-2, atol=2e-2)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32  # the adapter's masters stay float32
        torch.testing.assert_close(grad, expected_grads[name], rtol=5e-2, atol=5e-3, msg=name)


def _train_config(tmp_path, name, fused):
    from tuneforge.config import parse_train_config

    return parse_train_config({
        "output_dir": str(tmp_path / name), "adapter": {"r": 4, "use_dora": True},
        "data": {"train": "arithmetic", "options": {"size": 24}, "max_seq_len": 192, "eval_size": 0},
        "training": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "save_every": None, "fused_projections": fused},
    })


def test_training_with_fused_projections_takes_the_same_steps(tmp_path, fused_calls):
    from tiny_models import tiny_chat_model_and_tokenizer

    from tuneforge.train import train

    runs = {}
    for fused in (False, True):
        losses = []
        model, tokenizer = tiny_chat_model_and_tokenizer()
        train(_train_config(tmp_path, f"fused-{fused}", fused), model_and_tokenizer=(model, tokenizer),
              on_step=lambda step, loss: losses.append(loss))
        runs[fused] = losses
        if fused:
            assert fused_calls, "the fused run never took the fused path"
            assert not any(getattr(m, "fused", None) for m in model.modules()), "train() leaves the model unfused"
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)


def test_fused_projections_true_refuses_compile():
    from tuneforge.config import parse_train_config
    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError, match="fused_projections=true and compile=true"):
        parse_train_config({"training": {"fused_projections": True, "compile": True}})
    assert parse_train_config({"training": {"fused_projections": "auto", "compile": True}}).training.compile


def test_every_class_that_takes_the_fused_path_has_a_case_above():
    import tuneforge.adapters.methods  # noqa: F401  (registers every method, so every subclass exists)
    from tuneforge.adapters.lora.dora import DoraLinear
    from tuneforge.adapters.lora.fused import fused_kind_of_class
    from tuneforge.adapters.lora.lora import LoraLinear
    from tuneforge.adapters.rank.lora_fa import LoraFaLinear

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    fusable = {cls for cls in (LoraLinear, *subclasses(LoraLinear)) if fused_kind_of_class(cls) is not None}
    assert fusable == {LoraLinear, DoraLinear, LoraFaLinear}, "add a METHODS case for the new class"


def test_fused_layers_run_under_inference_mode_and_gradient_checkpointing(fused_calls):
    plain, fused = adapted_pair("llama", "dora")
    fuse_projections(fused, "default")
    ids = sample_ids()
    with torch.inference_mode():  # what the serving engine decodes under (co-served finetune jobs)
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert len(fused_calls) == 8
    fused.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    fused.train(), plain.train()
    _, expected = logits_and_grads(plain, ids)
    _, grads = logits_and_grads(fused, ids)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fused_equals_unfused_on_a_gpu(method):
    plain, fused = adapted_pair("qwen2", method)
    plain, fused = plain.cuda(), fused.cuda()
    fuse_projections(fused, "default")  # after the move: the stacked weight lives on the GPU
    ids = sample_ids().cuda()
    expected_logits, expected_grads = logits_and_grads(plain, ids)
    logits, grads = logits_and_grads(fused, ids)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-3, atol=1e-5, msg=name)
