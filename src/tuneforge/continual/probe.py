"""The "general ability" probe: next-token loss on a fixed set of everyday dialogue the stream never
trains on. Its drift across the stream shows what finetuning costs outside the tasks.

``data: auto`` uses chatterbot-corpus dialogue when the package is installed, else the bundled
probe below (a few general-knowledge exchanges), so the measurement works offline either way.
"""

from __future__ import annotations

import torch
from torch import nn

from tuneforge.continual.config import ProbeSpec
from tuneforge.data import BatchPlan, Example, Origin, load_examples, tokenize_examples
from tuneforge.data.records import chat_example
from tuneforge.errors import MissingPackageError
from tuneforge.eval.loss import evaluate_loss

BUNDLED_PROBE = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What do bees make?", "Bees make honey and wax."),
    ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters the most."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("Name a primary color.", "Red is a primary color."),
    ("What season comes after winter?", "Spring comes after winter."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Where do fish live?", "Fish live in water, in rivers, lakes and the sea."),
    ("What do you use to write on paper?", "You can write on paper with a pen or a pencil."),
    ("What is the largest planet?", "Jupiter is the largest planet in the solar system."),
    ("Hello, how are you?", "I am well, thank you. How can I help you today?"),
    ("Can you tell me a fun fact?", "Octopuses have three hearts."),
    ("What is a baby cat called?", "A baby cat is called a kitten."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
)


def load_probe(spec: ProbeSpec) -> tuple[str, list[Example]]:
    """(the probe's name, its examples)."""
    if spec.data in ("auto", "chatterbot"):
        try:
            return "chatterbot", load_examples("chatterbot", split="eval", size=spec.size).examples
        except MissingPackageError:
            if spec.data == "chatterbot":
                raise
    if spec.data in ("auto", "bundled"):
        return "bundled", [chat_example([("user", question), ("assistant", reply)], Origin("probe", index + 1, unit="index"))
                           for index, (question, reply) in enumerate(BUNDLED_PROBE[: spec.size])]
    return spec.data, load_examples(spec.data).examples[: spec.size]


def probe_loss(model: nn.Module, tokenizer, examples: list[Example], *, template: str, max_seq_len: int,
               precision: str = "fp32", batch_size: int = 16) -> float:
    """Mean loss per answer token of ``examples`` (unpacked: each example's loss is its own)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokenized = tokenize_examples(examples, tokenizer, template=template, max_seq_len=max_seq_len)
    plan = BatchPlan(tokenized, batch_size, packing=False, seed=0, pad_id=pad_id)
    with torch.no_grad():
        return evaluate_loss(model, list(plan.batches(0)), precision=precision)
