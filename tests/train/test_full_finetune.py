"""Full-parameter finetuning (adapter.method: full): what trains, bad combinations refused before
loading, exact resume for every update rule, and the saved model loading in transformers."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_chat_model_and_tokenizer, tiny_llama

from tuneforge.config import parse_train_config
from tuneforge.config.schema import describe_keys
from tuneforge.errors import ConfigError
from tuneforge.train import train
from tuneforge.train.full import FullWeights
from tuneforge.train.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def parse(adapter=None, update_rule=None, **training):
    return parse_train_config({"adapter": adapter or {"method": "full"}, "update_rule": update_rule or {},
                               "training": training})


def trainable_names(adapter: dict) -> set[str]:
    model = tiny_llama(seed=0)
    FullWeights(model, parse(adapter).adapter)
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_everything_trains_by_default_and_patterns_and_layers_narrow_it():
    model = tiny_llama(seed=0)
    assert trainable_names({"method": "full"}) == {n for n, _ in model.named_parameters()}
    attention_of_layer_1 = trainable_names({"method": "full", "trainable": ["self_attn"], "layers": ["1-1"]})
    assert attention_of_layer_1 == {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.self_attn.")}
    # Outside decoder layers, `layers` does not restrict: the embedding follows `trainable` alone.
    chosen = trainable_names({"method": "full", "trainable": ["embed_tokens", "down_proj"], "layers": [0]})
    assert chosen == {"model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"}
    assert trainable_names({"method": "full", "trainable": r".*\.layers\.0\..*norm.*"}) == {
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"}


def test_a_selection_of_nothing_is_refused_with_the_keys():
    with pytest.raises(ConfigError, match=r"adapter.trainable=\['qproj'\].*selects no parameter"):
        trainable_names({"method": "full", "trainable": ["qproj"]})
    with pytest.raises(ConfigError, match="neither an index nor a range"):
        parse({"method": "full", "layers": ["3-1"]})


@pytest.mark.parametrize("config, keys", [
    (dict(adapter={"r": 4}, update_rule={"method": "galore"}), ["update_rule.method='galore'", "adapter.method=full"]),
    (dict(update_rule={"method": "lomo"}, grad_accum=2), ["training.grad_accum=2"]),
    (dict(update_rule={"method": "galore", "per_layer": True}, grad_accum=2), ["update_rule.per_layer", "grad_accum=2"]),
    (dict(update_rule={"method": "galore", "per_layer": True}), ["training.max_grad_norm=1.0"]),
    (dict(adapter={"r": 4, "dropout": 0.1}, update_rule={"method": "mezo"}), ["adapter.dropout=0.1"]),
    (dict(update_rule={"method": "badam", "order": "fixed"}), ["update_rule.blocks"]),
    (dict(update_rule={"method": "adalomo"}, optimizer="adamw8bit"), ["training.optimizer='adamw8bit'"]),
])
def test_combinations_that_cannot_work_are_refused_before_loading(config, keys):
    training = {k: v for k, v in config.items() if k not in ("adapter", "update_rule")}
    with pytest.raises(ConfigError) as caught:
        parse(config.get("adapter"), config.get("update_rule"), **training)
    for key in keys:
        assert key in str(caught.value)


def test_train_help_documents_every_new_key():
    from tuneforge.config.full_ft import FullConfig, UpdateRuleConfig

    text = describe_keys()
    for name, field in UpdateRuleConfig.model_fields.items():
        assert f"update_rule.{name} (default" in text and field.description in text
    for name in ("trainable", "layers"):
        assert f"adapter.{name} (default" in text and FullConfig.model_fields[name].description in text


@pytest.mark.parametrize("optimizer, state_dtype", [("adamw", torch.float32), ("adamw8bit", torch.uint8)])
def test_baseline_optimizers_cover_every_trainable_weight_once(optimizer, state_dtype):
    model = tiny_llama(seed=0, tie_word_embeddings=True)
    config = parse(optimizer=optimizer)
    FullWeights(model, config.adapter)
    built = build_optimizer(model, config.training, full_finetune=True)
    params = [p for g in built.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))  # the tied head once
    model(input_ids=torch.ones(1, 4, dtype=torch.long), labels=torch.ones(1, 4, dtype=torch.long)).loss.backward()
    built.step()
    state = built.state[model.model.embed_tokens.weight]  # 4096 values: 8-bit moments at the default min_8bit_size
    assert any(t.dtype == state_dtype for t in state.values() if torch.is_tensor(t) and t.dim() > 0)


# ---- through the loop: resume is exact for every rule, and the model comes out loadable ----

def loop_config(tmp_path, name, rule, **training):
    settings = {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "log_every": 1, "save_every": 2, "seed": 7,
                "max_grad_norm": None if rule.get("per_layer") else 1.0, "warmup_steps": 0, **training}
    return parse_train_config({
        "output_dir": str(tmp_path / name), "adapter": {"method": "full"}, "update_rule": rule,
        "data": {"train": "arithmetic", "options": {"size": 16}, "max_seq_len": 96, "eval_size": 0},
        "training": settings,
    })


RULES = [
    {"method": "optimizer"},
    {"method": "galore", "rank": 2, "update_proj_gap": 3},
    {"method": "galore", "rank": 2, "update_proj_gap": 3, "per_layer": True},
    {"method": "apollo", "rank": 2, "update_proj_gap": 3},
    {"method": "badam", "switch_every": 3, "order": "random"},
    {"method": "lisa", "switch_every": 3, "active_layers": 1},
    {"method": "lomo"},
    {"method": "adalomo"},
    {"method": "mezo", "n_spsa": 2},
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r["method"] + ("-per-layer" if r.get("per_layer") else ""))
def test_resume_continues_exactly(tmp_path, rule):
    """An interrupted run resumed from its step-3 checkpoint takes the same steps as an uninterrupted run
    (step 3 sits mid-block for BAdam/LISA and mid-period for the projections: their state must be saved)."""
    full_losses = []
    train(loop_config(tmp_path, "whole", rule), model_and_tokenizer=tiny_chat_model_and_tokenizer(),
          on_step=lambda s, loss: full_losses.append(loss))

    def stop_after_three(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    partial = loop_config(tmp_path, "partial", rule)
    train(partial, model_and_tokenizer=tiny_chat_model_and_tokenizer(), on_step=stop_after_three)
    resumed = []
    train(partial, resume=True, model_and_tokenizer=tiny_chat_model_and_tokenizer(),
          on_step=lambda s, loss: resumed.append(loss))
    assert resumed == pytest.approx(full_losses[3:], rel=1e-6, abs=1e-7)
    whole = _load(tmp_path / "whole" / "model")
    again = _load(tmp_path / "partial" / "model")
    for (name, a), b in zip(whole.named_parameters(), again.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def _load(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory)


def test_the_saved_model_is_a_transformers_directory_with_only_the_chosen_weights_changed(tmp_path):
    config = loop_config(tmp_path, "narrow", {"method": "optimizer"}, max_steps=2, save_every=None)
    config.adapter = parse({"method": "full", "trainable": ["mlp"], "layers": [1]}).adapter
    model, tokenizer = tiny_chat_model_and_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    summary = train(config, model_and_tokenizer=(model, tokenizer))
    assert summary.adapter_dir == summary.run_dir / "model"
    assert (summary.adapter_dir / "model.safetensors").is_file() and (summary.adapter_dir / "tokenizer.json").is_file()
    from tuneforge.models import load_model

    assert load_model(str(summary.adapter_dir)).model.config.num_hidden_layers == 2  # what `tuneforge serve --model` loads
    loaded = _load(summary.adapter_dir)
    for name, param in loaded.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == name.startswith("model.layers.1.mlp."), name
