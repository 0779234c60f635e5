"""``sequential``: plain sequential finetuning, the baseline. One adapter (any adapter.method) is
trained on task 1, then continues on task 2 from where it stopped, and so on (each stage starts
from the previous stage's saved adapter through ``training.init_adapter``). Nothing protects the
earlier tasks, so this measures catastrophic forgetting (McCloskey & Cohen 1989)."""

from tuneforge.continual.methods.base import ContinualMethod


class Sequential(ContinualMethod):
    name = "sequential"
