"""Continual methods, one module each; ``registry.build_method`` makes one from a config's ``method:``."""

from tuneforge.continual.methods.base import ContinualMethod, Stage, StreamContext
from tuneforge.continual.methods.joint import Joint
from tuneforge.continual.methods.registry import build_method, continual_methods, register_continual_method
from tuneforge.continual.methods.ewc import Ewc
from tuneforge.continual.methods.inflora import InfLora
from tuneforge.continual.methods.merging import Merge
from tuneforge.continual.methods.migu import Migu
from tuneforge.continual.methods.olora import OLora
from tuneforge.continual.methods.replay import Replay
from tuneforge.continual.methods.sema_lite import SemaLite
from tuneforge.continual.methods.sequential import Sequential
from tuneforge.continual.methods.task_adapters import TaskAdapters

register_continual_method(Sequential, "one adapter finetuned on each task in turn (the forgetting baseline)")
register_continual_method(Replay, "sequential + a reservoir-sampled buffer of earlier tasks' examples")
register_continual_method(Ewc, "sequential + elastic weight consolidation on the adapter (diagonal Fisher penalty)")
register_continual_method(OLora, "a new LoRA per task, kept orthogonal to earlier tasks' LoRA subspaces (O-LoRA)")
register_continual_method(InfLora, "a new LoRA per task whose frozen A avoids earlier tasks' input subspace (InfLoRA)")
register_continual_method(Migu, "sequential, updating only rows of the largest-magnitude outputs (MIGU)")
register_continual_method(TaskAdapters, "one adapter per task + a nearest-centroid task selector (ConPET-style)")
register_continual_method(SemaLite, "per-task adapters added only when a shift detector fires (simplified SEMA)")
register_continual_method(Merge, "one LoRA per task, served as their TIES / task-arithmetic merge")
register_continual_method(Joint, "one adapter trained on all tasks at once (the upper bound)")

__all__ = ["ContinualMethod", "Stage", "StreamContext", "build_method", "continual_methods", "register_continual_method"]
