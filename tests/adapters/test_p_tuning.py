"""P-tuning: the encoder's output is the prompt; peft interop both ways for the MLP and LSTM encoders."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_llama

from tuneforge.adapters import add_adapter, load_adapter, save_adapter
from tuneforge.adapters.model_level.p_tuning import PTuningConfig

KINDS = ["MLP", "LSTM"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def tuned(kind: str):
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, PTuningConfig(num_virtual_tokens=3, encoder_reparameterization_type=kind, encoder_hidden_size=8))
    perturb_trainable(model)
    return base, model


def test_mlp_encoder_matches_a_naive_formula():
    base, model = tuned("MLP")
    adapter = model.tuneforge_model_adapters.adapters["default"]
    first, second, third = (adapter.encoder.head[i] for i in (0, 2, 4))
    hidden = torch.relu(adapter.encoder.embedding @ first.weight.T + first.bias)
    hidden = torch.relu(hidden @ second.weight.T + second.bias)
    prompt = (hidden @ third.weight.T + third.bias).detach()
    ids = sample_ids()
    embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
    with torch.no_grad():
        expected = base(inputs_embeds=embeds).logits[:, 3:]
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_saved_adapter_loads_in_peft_with_equal_logits(tmp_path, kind):
    base, model = tuned(kind)
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = sample_ids()
    torch.testing.assert_close(logits(theirs, ids)[:, 3:], logits(model, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapter_loads_in_tuneforge_with_equal_logits(tmp_path, kind):
    base = tiny_llama()
    config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=8,
                                      encoder_reparameterization_type=kind)
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    perturb_trainable(theirs)
    theirs.eval()
    ids = sample_ids()
    expected = logits(theirs, ids)[:, 4:]
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=0)


def test_lstm_encoder_shapes_follow_the_config():
    _, model = tuned("LSTM")
    head = model.tuneforge_model_adapters.adapters["default"].encoder.head
    assert head.lstm.bidirectional and head.lstm.num_layers == 2 and head.lstm.hidden_size == 8
    assert head.mlp[0].in_features == 16 and head.mlp[2].out_features == 32


def test_greedy_generation_with_and_without_cache_agree():
    _, model = tuned("MLP")
    ids = sample_ids(batch=2, length=5)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_resumed_training_matches_an_uninterrupted_run(tmp_path):
    """Files hold only the encoder's output; checkpoints must keep the encoder so a resume continues it."""
    from tiny_models import tiny_chat_model_and_tokenizer

    from tuneforge.config import parse_train_config
    from tuneforge.train import train

    def config(name):
        return parse_train_config({
            "output_dir": str(tmp_path / name),
            "adapter": {"method": "p-tuning", "num_virtual_tokens": 3, "encoder_hidden_size": 8},
            "data": {"train": "arithmetic", "options": {"size": 24}, "max_seq_len": 160, "eval_size": 4},
            "training": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "log_every": 1, "save_every": 2, "seed": 3},
        })

    full = []
    train(config("full"), model_and_tokenizer=tiny_chat_model_and_tokenizer(), on_step=lambda s, loss: full.append(loss))

    def stop_after_two(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    train(config("partial"), model_and_tokenizer=tiny_chat_model_and_tokenizer(), on_step=stop_after_two)
    resumed = []
    train(config("partial"), resume=True, model_and_tokenizer=tiny_chat_model_and_tokenizer(),
          on_step=lambda s, loss: resumed.append(loss))
    assert resumed == pytest.approx(full[2:], rel=1e-5, abs=1e-6)
