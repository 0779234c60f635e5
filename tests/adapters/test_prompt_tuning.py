"""Prompt tuning: a naive reference, peft interop both ways, generation with the KV cache, training."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from tiny_models import perturb_trainable, sample_ids, tiny_chat_model_and_tokenizer, tiny_llama

from tuneforge.adapters import (
    LoraConfig,
    add_adapter,
    disabled_adapters,
    load_adapter,
    loraplus_param_groups,
    merge_adapters,
    merge_and_unload,
    save_adapter,
    set_active_adapters,
)
from tuneforge.adapters.model_level.prompt_tuning import PromptTuningConfig
from tuneforge.errors import AdapterError
from tuneforge.losses import token_loss_sum

VIRTUAL = 4


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def prompted(seed: int = 2, **config):
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=VIRTUAL, **config))
    perturb_trainable(model, seed=seed)
    return base, model


def prompt_of(model) -> torch.Tensor:
    return model.tuneforge_model_adapters.adapters["default"].prompt_embeddings.detach()


def naive_logits(base, prompt, ids):
    """The base model run on [prompt; token embeddings], virtual positions cut off."""
    embeds = base.get_input_embeddings()(ids)
    full = torch.cat([prompt.expand(ids.shape[0], -1, -1), embeds], dim=1)
    with torch.no_grad():
        return base(inputs_embeds=full).logits[:, prompt.shape[0]:]


def test_logits_match_the_naive_prompt_prepending():
    base, model = prompted()
    ids = sample_ids()
    out = logits(model, ids)
    assert out.shape == (2, ids.shape[1], base.config.vocab_size)
    torch.testing.assert_close(out, naive_logits(base, prompt_of(model), ids), atol=1e-5, rtol=0)
    with disabled_adapters(model):
        torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=0, rtol=0)


def test_left_padding_with_positions_gives_the_unpadded_logits():
    _, model = prompted()
    ids = sample_ids(batch=1, length=6)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = logits(model, padded, attention_mask=mask, position_ids=positions)[:, 3:]
    torch.testing.assert_close(out, logits(model, ids), atol=1e-5, rtol=0)


def test_chunked_training_loss_equals_the_models_own_loss():
    _, model = prompted()
    ids = sample_ids()
    labels = ids.clone()
    labels[:, :3] = -100
    total, count = token_loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    with torch.no_grad():
        expected = model(ids, labels=labels).loss
    assert count == 2 * (ids.shape[1] - 3)
    torch.testing.assert_close(total / count, expected, atol=1e-5, rtol=1e-5)


def test_greedy_generation_with_and_without_cache_matches_a_naive_loop():
    base, model = prompted(seed=5)
    ids = sample_ids(batch=2, length=5)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    naive = ids
    for _ in range(6):
        next_token = naive_logits(base, prompt_of(model), naive)[:, -1].argmax(-1, keepdim=True)
        naive = torch.cat([naive, next_token], dim=1)
    assert torch.equal(cached, naive)
    assert torch.equal(uncached, naive)


def test_saved_adapter_loads_in_peft_with_equal_logits(tmp_path):
    base, model = prompted()
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PROMPT_TUNING" and saved["token_dim"] == 32 and "target_modules" not in saved
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = sample_ids()
    # peft also returns the virtual positions' logits; ours align with the input ids.
    torch.testing.assert_close(logits(theirs, ids)[:, VIRTUAL:], logits(model, ids), atol=1e-5, rtol=0)


def test_peft_adapter_loads_in_tuneforge_with_equal_logits(tmp_path):
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    perturb_trainable(theirs)
    theirs.eval()
    ids = sample_ids()
    expected = logits(theirs, ids)[:, 5:]
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        load_adapter(model, tmp_path)
    assert not [w for w in record if "ignoring keys" in str(w.message)], "peft's model-derived fields must be understood"
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=0)


def test_text_init_uses_the_tokenized_text_repeated_to_length():
    model, tokenizer = tiny_chat_model_and_tokenizer()
    text = "Hello there"
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 1 < len(token_ids) < 7
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=7, init="text", init_text=text), tokenizer=tokenizer)
    expected_ids = (token_ids * 7)[:7]
    expected = model.get_input_embeddings().weight[expected_ids]
    torch.testing.assert_close(prompt_of(model), expected.detach(), atol=0, rtol=0)


def test_text_init_from_token_ids_needs_no_tokenizer_and_still_loads_in_peft(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=3, init="text", init_token_ids=[5, 9]))
    torch.testing.assert_close(prompt_of(model), model.get_input_embeddings().weight[[5, 9, 5]].detach())
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = sample_ids()
    torch.testing.assert_close(logits(theirs, ids)[:, 3:], logits(model, ids), atol=1e-5, rtol=0)


def test_text_init_without_tokenizer_is_a_clear_error():
    model = tiny_llama()
    with pytest.raises(AdapterError, match="needs a tokenizer.*tokenizer=tokenizer"):
        add_adapter(model, PromptTuningConfig(num_virtual_tokens=3, init="text", init_text="hello"))
    assert not hasattr(model, "tuneforge_model_adapters")


def test_too_many_positions_name_both_numbers():
    with pytest.raises(AdapterError, match="num_virtual_tokens=200 .* max_position_embeddings=128"):
        add_adapter(tiny_llama(), PromptTuningConfig(num_virtual_tokens=200))
    _, model = prompted()
    ids = torch.zeros(1, 125, dtype=torch.long)
    with pytest.raises(AdapterError, match=r"num_virtual_tokens=4 \+ 125 input positions = 129 exceeds .*=128"):
        model(ids)


def test_merge_is_refused_and_the_base_is_untouched():
    base, model = prompted()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="cannot be merged; the base model is unchanged"):
        merge_adapters(model)
    with pytest.raises(AdapterError, match="cannot be merged"):
        merge_and_unload(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_optimizer_groups_hold_exactly_the_trainable_prompt():
    _, model = prompted()
    groups = loraplus_param_groups(model, 1e-3)
    params = [p for group in groups for p in group["params"]]
    assert len(params) == 1 and params[0] is model.tuneforge_model_adapters.adapters["default"].prompt_embeddings


def test_training_run_with_prompt_tuning(tmp_path):
    from tuneforge.config import parse_train_config
    from tuneforge.train import train

    config = parse_train_config({
        "output_dir": str(tmp_path / "run"),
        "adapter": {"method": "prompt-tuning", "num_virtual_tokens": 4},
        "data": {"train": "arithmetic", "options": {"size": 24}, "max_seq_len": 160, "eval_size": 4},
        "training": {"max_steps": 4, "batch_size": 4, "lr": 3e-2, "log_every": 1, "save_every": None,
                     "eval_every": 4, "seed": 3},
    })
    losses = []
    summary = train(config, model_and_tokenizer=tiny_chat_model_and_tokenizer(), on_step=lambda s, loss: losses.append(loss))
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    saved = json.loads((summary.run_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PROMPT_TUNING" and saved["num_virtual_tokens"] == 4
    model, _ = tiny_chat_model_and_tokenizer()
    load_adapter(model, summary.run_dir / "adapter")
    assert model.tuneforge_model_adapters.adapters["default"].prompt_embeddings.shape == (4, 48)


def test_lora_beside_prompt_tuning_and_one_model_level_adapter_at_a_time():
    _, model = prompted()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), "lora", activate=False)
    set_active_adapters(model, ["default", "lora"])
    assert logits(model, sample_ids()).shape[1] == sample_ids().shape[1]
    add_adapter(model, PromptTuningConfig(num_virtual_tokens=2), "second", activate=False)
    with pytest.raises(AdapterError, match="only one of them can be active"):
        set_active_adapters(model, ["default", "second"])


def test_packed_rows_with_a_4d_mask_give_each_example_its_own_logits():
    from tuneforge.data import collate_packed
    from tuneforge.data.tokenization import TokenizedExample

    _, model = prompted()
    first, second = sample_ids(batch=1, length=5, seed=3)[0], sample_ids(batch=1, length=4, seed=4)[0]
    examples = [TokenizedExample(t.tolist(), t.tolist()) for t in (first, second)]
    batch = collate_packed([examples], pad_id=0, mask_dtype=torch.float32)
    out = logits(model, batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    torch.testing.assert_close(out[:, :5], logits(model, first[None]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 5:9], logits(model, second[None]), atol=1e-5, rtol=0)
