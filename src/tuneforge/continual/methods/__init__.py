"""Continual methods, one module each; ``registry.build_method`` makes one from a config's ``method:``."""

from tuneforge.continual.methods.base import ContinualMethod, Stage, StreamContext
from tuneforge.continual.methods.joint import Joint
from tuneforge.continual.methods.registry import build_method, continual_methods, register_continual_method
from tuneforge.continual.methods.sequential import Sequential

register_continual_method(Sequential, "one adapter finetuned on each task in turn (the forgetting baseline)")
register_continual_method(Joint, "one adapter trained on all tasks at once (the upper bound)")

__all__ = ["ContinualMethod", "Stage", "StreamContext", "build_method", "continual_methods", "register_continual_method"]
