"""GRPO samples through tuneforge's serving engine on the live policy: greedy samples equal
transformers' generate on the adapted model, before and after an optimizer step (so the engine
never samples from a stale copy of the adapter); adapters the engine cannot run per row fall back
to generate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import perturb_trainable, tiny_chat_model_and_tokenizer

from tuneforge.adapters import add_adapter
from tuneforge.adapters.config import LoraConfig
from tuneforge.adapters.selective.ia3 import IA3Config
from tuneforge.config import parse_train_config
from tuneforge.train.objectives.grpo_objective import GrpoObjective
from tuneforge.train.objectives.grpo_sampling import ENGINE, GENERATE
from tuneforge.train.objectives.reference import Reference

NEW_TOKENS = 6
QUESTIONS = ["Tom has 3 apples.", "How many boxes are there?", "Hello"]


def grpo_setup(adapter_config):
    config = parse_train_config({"training": {"objective": "grpo", "grpo_group_size": 3,
                                              "grpo_max_new_tokens": NEW_TOKENS, "grpo_temperature": 1.0}})
    model, tokenizer = tiny_chat_model_and_tokenizer()
    add_adapter(model, adapter_config, "default")
    perturb_trainable(model, scale=0.5)  # the adapter changes what the model says
    objective = GrpoObjective(config, tokenizer, Reference("adapter_off", "default", cache=False))
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS]
    prompts = [tokenizer(text)["input_ids"] for text in texts]
    return objective, model, tokenizer, prompts


def stop_ids(tokenizer):
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]


def generate_reference(model, tokenizer, prompts):
    """One prompt at a time (no padding), greedy, cut after the first stop token (kept)."""
    was_training = model.training
    model.eval()
    completions = []
    with torch.no_grad():
        for prompt in prompts:
            output = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=stop_ids(tokenizer),
                                    pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
            ids = output[0, len(prompt):].tolist()
            ends = [i for i, t in enumerate(ids) if t in stop_ids(tokenizer)]
            completions.append(ids[: ends[0] + 1] if ends else ids)
    model.train(was_training)
    return completions


def optimizer_steps(model, prompts, target: int, steps: int = 3):
    """A few AdamW steps making ``target`` the next token after every prompt."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        loss = sum(F.cross_entropy(model(input_ids=torch.tensor([p])).logits[0, -1:], torch.tensor([target]))
                   for p in prompts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_greedy_engine_samples_equal_generate_before_and_after_an_optimizer_step(one_torch_thread):
    objective, model, tokenizer, prompts = grpo_setup(LoraConfig(r=4))
    model.train()
    before = objective.sample(model, prompts, greedy=True)
    assert objective.sampler.backend == ENGINE
    assert model.training  # back to train mode
    assert before == generate_reference(model, tokenizer, prompts)

    target = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert any(c[:1] != [target] for c in before)
    optimizer_steps(model, prompts, target)
    after = objective.sample(model, prompts, greedy=True)
    assert after != before
    assert after == generate_reference(model, tokenizer, prompts)  # the live adapter, not a stale copy
    assert model.training


def test_sampled_groups_follow_the_global_seed(one_torch_thread):
    objective, model, _, prompts = grpo_setup(LoraConfig(r=4))
    torch.manual_seed(5)
    first = objective.sample(model, prompts[:2], greedy=False)
    torch.manual_seed(5)
    second = objective.sample(model, prompts[:2], greedy=False)
    assert len(first) == 2 * 3 and first == second
    assert all(0 < len(c) <= NEW_TOKENS + 1 for c in first)
    assert len({tuple(c) for c in first}) > 1  # temperature 1: the group's samples differ


def test_an_adapter_the_engine_cannot_batch_per_row_falls_back_to_generate(one_torch_thread, caplog):
    objective, model, tokenizer, prompts = grpo_setup(IA3Config())  # scales FFN inputs: not per-row servable
    with caplog.at_level("WARNING"):
        samples = objective.sample(model, prompts, greedy=True)
    assert objective.sampler.backend == GENERATE
    assert "scales layer inputs" in caplog.text
    assert samples == generate_reference(model, tokenizer, prompts)


@pytest.mark.parametrize("greedy", [True, False])
def test_sampling_leaves_eval_mode_models_in_eval_mode(greedy, one_torch_thread):
    objective, model, _, prompts = grpo_setup(LoraConfig(r=4))
    model.eval()
    objective.sample(model, prompts[:1], greedy=greedy)
    assert not model.training
