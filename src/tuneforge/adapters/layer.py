"""The wrapper every layer-level method plugs into, and the interface an adapter implements.

A targeted module ``m`` is replaced by ``AdaptedLayer(base_layer=m)``. The wrapper owns no method
logic: it holds one ``LayerAdapter`` per adapter name and, in ``forward``, lets each active,
unmerged adapter transform the layer's input (activation scaling, e.g. IA3 on an FFN input) and
output (weight deltas such as LoRA, output scaling, bottleneck modules)::

    x ──transform_input (each adapter)──> base_layer ──transform_output (each adapter)──> out

Serving many adapters in one batch sets ``row_adapters`` (one adapter name or None per row);
adapters then apply only to their own rows (see ``_forward_per_row``).
"""

from __future__ import annotations

import torch
from torch import nn

from tuneforge.errors import AdapterError


class LayerAdapter(nn.Module):
    """One adapter's state and math for one wrapped layer.

    Subclasses define ``transform_output`` (and ``transform_input`` when they scale inputs),
    ``delta_weight`` when the method is a mergeable weight delta, and ``file_tensors`` /
    ``load_file_tensors`` for the PEFT file format.
    """

    modifies_input = False
    mergeable = True

    def transform_input(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return x

    def transform_output(self, x: torch.Tensor, out: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """ΔW in the base layer's own weight layout; the only place a method defines its delta."""
        raise NotImplementedError

    def merge(self, base_layer: nn.Module, safe: bool) -> None:
        weight = base_layer.weight
        merged = weight.data + self.delta_weight(base_layer).to(weight.dtype)
        _write_weight(weight, merged, safe, self)

    def unmerge(self, base_layer: nn.Module) -> None:
        weight = base_layer.weight
        weight.data -= self.delta_weight(base_layer).to(weight.dtype)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to save, keyed by PEFT's leaf names (e.g. ``lora_A.weight``)."""
        raise NotImplementedError

    def load_file_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        own = self.file_tensors()
        for key, target in own.items():
            full_key = f"{where}.{key}"
            if key not in tensors:
                raise AdapterError(f"adapter file has no tensor '{full_key}' (expected shape {tuple(target.shape)})")
            value = tensors[key]
            if value.shape != target.shape:
                raise AdapterError(
                    f"tensor '{full_key}' has shape {tuple(value.shape)} in the adapter file but "
                    f"{tuple(target.shape)} in this model: the adapter was made for a different base model "
                    f"(or a different rank/target). Load it onto the model it was trained on."
                )
            with torch.no_grad():
                target.copy_(value.to(target.dtype))

    def parameter_roles(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by role, for optimizer groups (LoRA+ gives 'lora_B' its own learning rate)."""
        return {"default": list(self.parameters())}


def _write_weight(weight: nn.Parameter, merged: torch.Tensor, safe: bool, adapter: nn.Module) -> None:
    if safe and not torch.isfinite(merged).all():
        raise AdapterError(
            f"safe merge refused: merging {type(adapter).__name__} would put NaN/Inf into the base weights; "
            "the base model is unchanged. Check the adapter for diverged values."
        )
    weight.data.copy_(merged)


class AdaptedLayer(nn.Module):
    """A base layer plus named adapters; state is explicit, no attribute forwarding."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.row_adapters: list[str | None] | None = None

    def live_adapters(self) -> list[LayerAdapter]:
        if self.disabled:
            return []
        return [self.adapters[name] for name in self.active if name in self.adapters and name not in self.merged]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None and not self.disabled:
            return self._forward_per_row(x, *args, **kwargs)
        live = self.live_adapters()
        for adapter in live:
            if adapter.modifies_input:
                x = adapter.transform_input(x, self.base_layer)
        out = self.base_layer(x, *args, **kwargs)
        for adapter in live:
            out = adapter.transform_output(x, out, self.base_layer)
        return out

    def _forward_per_row(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each batch row uses its own adapter (or none): base once, then each adapter on its rows."""
        if self.merged:
            raise AdapterError("per-row adapters need unmerged adapters; call unmerge_adapters(model) first")
        names = self.row_adapters
        if len(names) != x.shape[0]:
            raise AdapterError(f"row_adapters has {len(names)} names for a batch of {x.shape[0]} rows")
        if any(self.adapters[n].modifies_input for n in set(names) if n in self.adapters):
            raise AdapterError("per-row batching supports output-side adapters only (e.g. LoRA), not input scaling")
        out = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(n for n in names if n is not None and n in self.adapters):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            out = out.index_copy(0, rows, self.adapters[name].transform_output(x[rows], out[rows], self.base_layer))
        return out

    def merge(self, names: list[str], safe: bool) -> None:
        for name in names:
            if name in self.merged or name not in self.adapters:
                continue
            adapter = self.adapters[name]
            if not adapter.mergeable:
                raise AdapterError(f"adapter '{name}' ({type(adapter).__name__}) cannot be merged into the weights")
            adapter.merge(self.base_layer, safe)
            self.merged.append(name)

    def unmerge(self) -> None:
        # Reverse order: DoRA's merge is not additive, so undo the last one first.
        for name in reversed(self.merged):
            self.adapters[name].unmerge(self.base_layer)
        self.merged = []

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}"
