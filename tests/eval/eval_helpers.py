"""Helpers shared by the evaluation tests: questions, examples, tiny models and saved adapters."""

from __future__ import annotations

from tiny_models import perturb_trainable, tiny_llama

from tuneforge.adapters import LoraConfig, add_adapter, save_adapter
from tuneforge.data import Example, Message

QUESTIONS = [
    "Hi",
    "Tom has 3 apples and buys 4 more. How many apples does Tom have now?",
    "There are 3 boxes. The key is in box 1. Move the key to box 2. Which box holds the key?",
    "How are you today?",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
    "Tom has 3 apples. How many apples does Tom have now?",
]
ANSWERS = ["7", "7", "box 2", "fine", "3"]


def qa_example(question: str, answer: str | None = "7") -> Example:
    return Example(messages=(Message("user", question), Message("assistant", answer or "fine")), answer=answer)


def make_model(tokenizer, seed: int = 0):
    # initializer_range 0.2 (transformers' default is 0.02) makes greedy outputs depend visibly on
    # the prompt and on adapter weights, so equality checks can fail.
    return tiny_llama(seed, vocab_size=len(tokenizer), initializer_range=0.2)


def save_perturbed_adapter(tokenizer, directory, seed: int, target_modules: list[str]):
    """A LoRA adapter for `make_model(tokenizer)` moved off its identity init, saved to `directory`."""
    model = make_model(tokenizer)
    add_adapter(model, LoraConfig(r=4, alpha=8, target_modules=target_modules), "default")
    perturb_trainable(model, scale=0.5, seed=seed)  # B starts at zero: move it, or the adapter is the identity
    save_adapter(model, directory, "default")
    return directory
