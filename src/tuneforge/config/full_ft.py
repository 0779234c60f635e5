"""Config of full-parameter finetuning: ``adapter.method: full`` and the ``update_rule`` section.

Full finetuning is a training mode, not an adapter: nothing wraps a layer, the model's own weights
train. It sits under ``adapter:`` because that key already answers "what trains". The update rule
(plain optimizer, GaLore, APOLLO, BAdam, LISA, LOMO/AdaLomo, MeZO) says how a step turns data into
a weight change; see tuneforge/train/update_rules/. Combinations that cannot work are refused here,
before anything loads, in ``check_update_rule``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tuneforge.adapters.config import AdapterConfig

LAYER_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


class FullConfig(AdapterConfig):
    """Train the model's own weights: all of them, or those named by ``trainable`` and ``layers``."""

    method: Literal["full"] = "full"
    trainable: list[str] | str | None = Field(
        None, description="parameters that train: a list matches names equal to an entry or containing '.entry' "
                          "(e.g. [self_attn, mlp.down_proj, embed_tokens]); a string is a regex over the whole "
                          "parameter name; null: every parameter")
    layers: list[int | str] | None = Field(
        None, description="decoder layers whose parameters may train, as indices or ranges ('0-3'); parameters "
                          "outside decoder layers (embeddings, final norm, head) still follow 'trainable'")
    # Layer-wrapping fields mean nothing here; fixed so a saved config does not suggest otherwise.
    target_modules: None = None

    @field_validator("layers")
    @classmethod
    def _expand_ranges(cls, value):
        if value is None:
            return None
        indices: set[int] = set()
        for entry in value:
            if isinstance(entry, int):
                indices.add(entry)
                continue
            found = LAYER_RANGE.match(entry)
            if found is None or int(found.group(1)) > int(found.group(2)):
                raise ValueError(f"layers entry {entry!r} is neither an index nor a range 'first-last' (e.g. '0-3')")
            indices.update(range(int(found.group(1)), int(found.group(2)) + 1))
        return sorted(indices)


UpdateRuleName = Literal["optimizer", "galore", "apollo", "apollo-mini", "badam", "lisa", "lomo", "adalomo", "mezo"]
# Rules that replace backprop + optimizer.step on the *full* weights; only MeZO also trains adapters.
# Rules that take the whole step themselves, without a GradScaler: fp16 would under/overflow unscaled.
NO_LOSS_SCALER = {"lomo", "adalomo", "mezo"}
FULL_WEIGHT_RULES = {"galore", "apollo", "apollo-mini", "badam", "lisa", "lomo", "adalomo"}


class UpdateRuleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: UpdateRuleName = Field(
        "optimizer", description="how a step updates the weights: optimizer (backprop + training.optimizer), galore, "
                                 "apollo, apollo-mini, badam, lisa, lomo, adalomo (adapter.method full), or mezo "
                                 "(full or an adapter); see docs/full_finetuning.md")
    rank: int = Field(128, gt=0, description="galore/apollo: rank of the gradient projection (apollo-mini uses 1)")
    update_proj_gap: int = Field(200, gt=0, description="galore/apollo: steps between new projections")
    scale: float = Field(0.25, gt=0, allow_inf_nan=False, description="galore: scale α of the projected-back update; apollo and "
                                                                  "apollo-mini use 1 and √128 unless this is set")
    per_layer: bool = Field(False, description="galore: update each weight as its gradient arrives in backward "
                                               "(one full gradient alive at a time); needs grad_accum 1")
    switch_every: int = Field(50, gt=0, description="badam/lisa: steps between block (or layer sample) switches")
    order: Literal["ascending", "descending", "random", "fixed"] = Field(
        "ascending", description="badam: the order decoder-layer blocks take turns (random: reshuffled every round; fixed: the "
                                  "layers listed in 'blocks', in that order)")
    blocks: list[int] | None = Field(None, description="badam order=fixed: the decoder layers that take turns")
    active_layers: int = Field(2, gt=0, description="lisa: γ, the middle layers sampled to train every switch_every steps")
    eps: float = Field(1e-3, gt=0, allow_inf_nan=False, description="mezo: perturbation size ε of SPSA")
    n_spsa: int = Field(1, gt=0, description="mezo: perturbations averaged per step (n-SPSA)")
    clip_two_pass: bool = Field(True, description="lomo/adalomo: with training.max_grad_norm, a first backward measures "
                                                  "the gradient norm and a second applies the clipped update (false: one backward, "
                                                  "no clipping)")


def check_update_rule(config) -> list[str]:
    """Problems with ``config.update_rule`` given the rest of the config (each names its keys)."""
    rule, adapter, training = config.update_rule, config.adapter, config.training
    problems = []
    full = isinstance(adapter, FullConfig)
    if rule.method in FULL_WEIGHT_RULES and not full:
        problems.append(f"update_rule.method={rule.method!r} trains the model's own weights, but adapter.method="
                        f"{adapter.method!r} adds an adapter: set adapter.method=full, or update_rule.method=optimizer "
                        "(or mezo) to train the adapter")
    if rule.method in ("lomo", "adalomo") and training.grad_accum > 1:
        problems.append(f"update_rule.method={rule.method} applies each gradient inside backward, so it cannot "
                        f"accumulate training.grad_accum={training.grad_accum} micro-batches: set training.grad_accum=1 "
                        "and raise training.batch_size instead")
    if rule.method == "galore" and rule.per_layer and training.grad_accum > 1:
        problems.append(f"update_rule.per_layer=true updates each weight inside backward, so it cannot accumulate "
                        f"training.grad_accum={training.grad_accum}: set training.grad_accum=1 or update_rule.per_layer=false")
    if rule.method == "galore" and rule.per_layer and training.max_grad_norm is not None:
        problems.append(f"update_rule.per_layer=true applies each weight's update before the next gradient exists, "
                        f"so no global norm can clip it (training.max_grad_norm={training.max_grad_norm}): set "
                        "training.max_grad_norm=null or update_rule.per_layer=false")
    if rule.method in ("lomo", "adalomo", "mezo") and training.optimizer != "adamw":
        problems.append(f"update_rule.method={rule.method} is its own optimizer; training.optimizer="
                        f"{training.optimizer!r} would be ignored: leave training.optimizer at adamw")
    if rule.method in NO_LOSS_SCALER and training.precision == "fp16":
        problems.append(f"update_rule.method={rule.method} has no loss scaler: use training.precision=bf16 or fp32")
    dropout = getattr(adapter, "dropout", 0.0) or 0.0
    if rule.method == "mezo" and dropout > 0:
        problems.append(f"update_rule.method=mezo compares two forward passes that must differ only by the "
                        f"perturbation, but adapter.dropout={dropout} makes them differ at random: set adapter.dropout=0")
    if rule.method == "badam" and rule.order == "fixed" and not rule.blocks:
        problems.append("update_rule.order=fixed needs update_rule.blocks: [layer indices] to train")
    return problems
