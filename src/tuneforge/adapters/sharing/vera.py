"""VeRA (Kopiczko et al. 2024): one frozen random pair (A, B) for the whole model, scaled per layer.

Paper: Kopiczko, Blankevoort & Asano, "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024,
arXiv:2310.11454; implements the update of its method section (written out below). Initialisation follows
PEFT, the reference implementation: Kaiming-uniform shared matrices, λ_b = 0, λ_d = ``d_initial``.

    h = W x + Λ_b B Λ_d A x,   Λ_b = diag(λ_b) (out), Λ_d = diag(λ_d) (r)

A (r × in_max) and B (out_max × r) are drawn once per adapter from ``projection_prng_key`` and each
layer uses their top-left corner for its own shape; only λ_b (zeros at init, so identity) and λ_d
(``d_initial``) train, r + out numbers per layer. The draw is PEFT's: Kaiming-uniform (gain √2, fan-in)
from a CPU generator seeded with the key, A first, sized by the largest targeted layer, so a file
saved without the projections (``save_projection=false``) regenerates the same A and B in either
tool. PEFT files keep the projections once, as ``base_model.vera_A`` / ``base_model.vera_B``.

This module also holds ``LayerGroup``: state one adapter shares across all of its layers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PrivateAttr
from torch import nn

from tuneforge.adapters.config import AdapterConfig
from tuneforge.adapters.layer import LayerAdapter
from tuneforge.adapters.lora.lora import is_transposed, refuse_quantized_merge, weight_shape
from tuneforge.errors import AdapterError


class LayerGroup:
    """What one adapter shares across its layers (VeRA's projections, VB-LoRA's vector bank).

    The registry builds one layer at a time, but ``add_adapter`` hands the same config object to every
    build of one adapter and only then moves the new layer adapters (``.train()``). So the group hangs on
    the config and is sealed once any of its layers is put to use; a build that finds the group sealed,
    or that sees a module name twice, belongs to a new adapter and starts a new group.
    """

    def __init__(self) -> None:
        self.module_names: set[str] = set()
        self.sealed = False


def check_rank_fits(r: int, in_features: int, out_features: int, module_name: str, field: str = "r") -> None:
    """A rank above min(in, out) adds parameters but no expressiveness: refuse it, naming the layer."""
    if r > min(in_features, out_features):
        raise AdapterError(
            f"{field}={r} is too large for '{module_name}': its weight is {out_features}x{in_features}, so the "
            f"update has rank at most {min(in_features, out_features)}. Lower {field}, or leave the module out "
            "(target_modules / exclude_modules)."
        )


def layer_group(config: "SharedGroupConfig", module_name: str, new_group) -> Any:
    """The group this build joins: the config's current one, or a fresh ``new_group()``."""
    group = config._layer_group
    if group is None or group.sealed or module_name in group.module_names:
        group = new_group()
        config._layer_group = group
    group.module_names.add(module_name)
    return group


class SharedGroupConfig(AdapterConfig):
    """An adapter config whose layers share state built during ``add_adapter`` (never saved)."""

    _layer_group: Any = PrivateAttr(default=None)


class PeftFlags(AdapterConfig):
    """Fields PEFT writes for weight-delta methods; kept so files round-trip without warnings."""

    fan_in_fan_out: bool = False  # the layout is read from each layer; kept for PEFT's files
    bias: Literal["none"] = "none"


class VeraConfig(SharedGroupConfig, PeftFlags):
    """VeRA: ``r`` is the shared projections' rank (use far more than a LoRA rank: λ_d costs r per layer).

    init_weights=false starts λ_b at ones and λ_d Gaussian (PEFT's meaning), a non-identity start
    meant for tests only.
    """

    method: Literal["vera"] = "vera"
    r: int = Field(256, gt=0)
    projection_prng_key: int = 0
    save_projection: bool = True
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    d_initial: float = 0.1
    init_weights: bool = True

    peft_type: ClassVar[str] = "VERA"
    peft_field_names: ClassVar[dict[str, str]] = {"dropout": "vera_dropout"}


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = √3 · √2 / √fan_in, fan_in = shape[1]: the bound PEFT's VeRA draws with."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(LayerGroup, nn.Module):
    """The frozen A (r, in_max) and B (out_max, r) of one adapter, drawn when first needed.

    Registered as a submodule of every layer adapter of the adapter, so ``model.to()`` moves it (once:
    it is one module); its buffers are not persistent, so the model's state_dict stays the base's.
    """

    def __init__(self, r: int, seed: int):
        nn.Module.__init__(self)
        LayerGroup.__init__(self)
        self.r, self.seed = r, seed
        self.max_in = self.max_out = 0
        self.register_buffer("vera_A", None, persistent=False)
        self.register_buffer("vera_B", None, persistent=False)
        # The file tensors last taken: held (not their ids, which Python reuses) so that every layer
        # of the adapter asking to load the same tensors copies them only once.
        self._loaded_from: tuple[torch.Tensor, torch.Tensor] | None = None

    def cover(self, in_features: int, out_features: int) -> None:
        self.max_in, self.max_out = max(self.max_in, in_features), max(self.max_out, out_features)

    def matrices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.vera_A is None:
            generator = torch.Generator(device="cpu").manual_seed(self.seed)
            vera_A = kaiming_uniform((self.r, self.max_in), generator)  # (r, in_max)
            vera_B = kaiming_uniform((self.max_out, self.r), generator)  # (out_max, r)
            self.vera_A, self.vera_B = vera_A.to(device), vera_B.to(device)
        self.sealed = True
        return self.vera_A, self.vera_B

    def load(self, vera_A: torch.Tensor, vera_B: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
        """Take the file's projections (once, however many layers ask)."""
        if self._loaded_from is None or self._loaded_from[0] is not vera_A or self._loaded_from[1] is not vera_B:
            self.vera_A, self.vera_B = vera_A.to(device, dtype), vera_B.to(device, dtype)
            self._loaded_from = (vera_A, vera_B)
        self.sealed = True


class VeraLinear(LayerAdapter):
    """VeRA on a Linear or Conv1D layer: trainable λ_b (out) and λ_d (r) around the shared A, B."""

    def __init__(self, projections: VeraProjections, in_features: int, out_features: int, config: VeraConfig,
                 transposed: bool):
        super().__init__()
        self.projections = projections
        self.in_features, self.out_features = in_features, out_features
        self.transposed = transposed
        self.save_projection = config.save_projection
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.init_weights:
            self.vera_lambda_b = nn.Parameter(torch.zeros(out_features))
            self.vera_lambda_d = nn.Parameter(torch.full((config.r,), config.d_initial))
        else:
            self.vera_lambda_b = nn.Parameter(torch.ones(out_features))
            self.vera_lambda_d = nn.Parameter(torch.randn(config.r))

    def train(self, mode: bool = True):
        self.projections.sealed = True  # add_adapter has built every layer of this adapter
        return super().train(mode)

    def sliced_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        vera_A, vera_B = self.projections.matrices(self.vera_lambda_d.device)
        return vera_A[:, : self.in_features], vera_B[: self.out_features, :]  # (r, in), (out, r)

    def transform_output(self, x, out, base_layer):
        vera_A, vera_B = self.sliced_projections()
        x = self.dropout(x).to(self.vera_lambda_d.dtype)
        delta = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, vera_A), vera_B)
        return out + delta.to(out.dtype)

    def delta_weight(self, base_layer) -> torch.Tensor:
        vera_A, vera_B = self.sliced_projections()
        delta = (self.vera_lambda_b.unsqueeze(1) * vera_B) @ (self.vera_lambda_d.unsqueeze(1) * vera_A)  # (out, in)
        return delta.T if self.transposed else delta

    def merge(self, base_layer, safe):
        refuse_quantized_merge(base_layer)
        super().merge(base_layer, safe)

    def file_tensors(self):
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    def shared_file_tensors(self) -> dict[str, torch.Tensor]:
        if not self.save_projection:
            return {}
        vera_A, vera_B = self.projections.matrices(self.vera_lambda_d.device)
        return {"vera_A": vera_A, "vera_B": vera_B}

    def load_shared_file_tensors(self, tensors: dict[str, torch.Tensor], path: Path) -> set[str]:
        if "vera_A" not in tensors and "vera_B" not in tensors:
            if self.save_projection:
                raise AdapterError(
                    f"{path}: no 'base_model.vera_A'/'base_model.vera_B' although adapter_config.json says "
                    "save_projection=true; re-save the adapter, or set save_projection=false to regenerate "
                    "the projections from projection_prng_key"
                )
            return set()
        vera_A, vera_B = tensors.get("vera_A"), tensors.get("vera_B")
        r = self.vera_lambda_d.shape[0]
        if not self._projections_fit(vera_A, vera_B):
            shapes = {k: tuple(v.shape) for k, v in tensors.items() if k in ("vera_A", "vera_B")}
            raise AdapterError(
                f"{path}: VeRA projections {shapes} do not fit this model: r={r} needs vera_A of shape "
                f"({r}, >={self.in_features}) and vera_B of shape (>={self.out_features}, {r}); the adapter "
                "was made for a different base model or target_modules"
            )
        self.projections.load(vera_A, vera_B, self.vera_lambda_d.device, self.vera_lambda_d.dtype)
        return {"vera_A", "vera_B"}

    def _projections_fit(self, vera_A: torch.Tensor | None, vera_B: torch.Tensor | None) -> bool:
        """Rank r on both, and at least this layer's in (A's columns) and out (B's rows) to slice from."""
        r = self.vera_lambda_d.shape[0]
        return (vera_A is not None and vera_B is not None and vera_A.shape[0] == r == vera_B.shape[1]
                and vera_A.shape[1] >= self.in_features and vera_B.shape[0] >= self.out_features)


def build_vera(base_layer: nn.Module, config: VeraConfig, module_name: str) -> VeraLinear:
    # No rank check: r may exceed a layer's size (PEFT's default r=256 does on small models). Each of the
    # r frozen rank-one directions brings its own trainable λ_d entry, so a larger r still adds freedom.
    in_features, out_features = weight_shape(base_layer)
    projections = layer_group(config, module_name, lambda: VeraProjections(config.r, config.projection_prng_key))
    projections.cover(in_features, out_features)
    return VeraLinear(projections, in_features, out_features, config, is_transposed(base_layer))
