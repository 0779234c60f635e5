"""The wrapper every layer-level method plugs into, and the interface an adapter implements.

A targeted module ``m`` is replaced by ``AdaptedLayer(base_layer=m)``. The wrapper owns no method
logic: it holds one ``LayerAdapter`` per adapter name and, in ``forward``, lets each active,
unmerged adapter transform the layer's input (activation scaling, e.g. IA3 on an FFN input) and
output (weight deltas such as LoRA, output scaling, bottleneck modules)::

    x ──transform_input (each adapter)──> base_layer ──transform_output (each adapter)──> out

Serving many adapters in one batch sets ``row_adapters`` (one adapter name or None per row);
adapters then apply only to their own rows (see ``_forward_per_row``). Plain LoRA adapters are
applied to the whole batch at once, BGMV style (Chen et al. 2023, Punica; Sheng et al. 2023,
S-LoRA): each row gathers its adapter's A and s·B from stacks padded to the largest rank, then two
batched matmuls give every row its own low-rank delta; rows without an adapter gather zeros.
"""

from __future__ import annotations

from typing import NamedTuple

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

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A (r, in), B (out, r), scaling) when ``transform_output`` is exactly ``out + scaling·B A x``.

        Per-row serving gathers these into one batched computation; None (the default) makes the
        adapter go through its own ``transform_output`` on its rows instead.
        """
        return None


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
        self._row_stacks: _RowStacks | None = None
        self.fused = None  # a FusedGroup (adapters/lora/fused.py) when fuse_projections grouped this layer

    def live_adapters(self) -> list[LayerAdapter]:
        if self.disabled:
            return []
        return [self.adapters[name] for name in self.active if name in self.adapters and name not in self.merged]

    def forward(self, *args, **kwargs) -> torch.Tensor:
        # transformers calls some blocks by keyword (``self_attn(hidden_states=...)``): the wrapped
        # module's input is the first positional argument or ``hidden_states``.
        if args:
            x, args = args[0], args[1:]
        elif "hidden_states" in kwargs:
            x = kwargs.pop("hidden_states")
        else:
            raise AdapterError(f"{type(self.base_layer).__name__} was called without an input tensor "
                               f"(keywords: {sorted(kwargs)}); it cannot be wrapped by an adapter")
        if self.row_adapters is not None and not self.disabled:
            return self._forward_per_row(x, *args, **kwargs)
        if self.fused is not None and not args and not kwargs:
            out = self.fused.output(self, x)
            if out is not None:
                return out
        live = self.live_adapters()
        for adapter in live:
            if adapter.modifies_input:
                x = adapter.transform_input(x, self.base_layer)
        out = self.base_layer(x, *args, **kwargs)
        for adapter in live:
            out = adapter.transform_output(x, out, self.base_layer)
        return out

    def _forward_per_row(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each batch row uses its own adapter (or none): the base runs once for the whole batch, the
        gatherable (LoRA) adapters add their deltas in one batched computation, and any other
        output-side adapter transforms its own rows."""
        if self.merged:
            raise AdapterError("per-row adapters need unmerged adapters; call unmerge_adapters(model) first")
        names = tuple(self.row_adapters)
        if len(names) != x.shape[0]:
            raise AdapterError(f"row_adapters has {len(names)} names for a batch of {x.shape[0]} rows")
        stacks = self._current_row_stacks()
        plan = stacks.plan(names, self.adapters, x.device)
        out = self.base_layer(x, *args, **kwargs)
        if plan.slots is not None:
            out = out + stacks.delta(x, plan.slots).to(out.dtype)
        for name, rows in plan.own_rows:
            out = out.index_copy(0, rows, self.adapters[name].transform_output(x[rows], out[rows], self.base_layer))
        return out

    def _current_row_stacks(self) -> _RowStacks:
        """The stacked factors of this layer's gatherable adapters, rebuilt only when the adapter set
        (or the train/eval mode, or a trainable adapter's weights) changed: a decoding step with the
        same adapters loaded restacks nothing."""
        key = (self.training, tuple(self.adapters.keys()), tuple(map(id, self.adapters.values())))
        stacks = self._row_stacks
        if stacks is None or stacks.key != key or stacks.weights_changed():
            factors = {name: f for name, adapter in self.adapters.items()
                       if (f := _gatherable_factors(adapter)) is not None}
            self._row_stacks = stacks = _RowStacks(key, factors, tuple(self.adapters.values()))
        return stacks

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


def _gatherable_factors(adapter: LayerAdapter) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    # Dropout is random per call, so a training-mode adapter with dropout keeps its own path.
    dropout = getattr(adapter, "dropout", None)
    if adapter.training and dropout is not None and not isinstance(dropout, nn.Identity):
        return None
    factors = adapter.low_rank_factors()
    if factors is not None:
        return factors
    from tuneforge.adapters.lora.lora import LoraLinear  # lora.py imports this module

    if type(adapter) is LoraLinear:  # subclasses (DoRA) change transform_output
        return adapter.lora_A, adapter.lora_B, adapter.scaling
    return None


class _RowPlan(NamedTuple):
    slots: torch.Tensor | None  # (B,) stack slot per row; None when no row uses a gatherable adapter
    own_rows: list[tuple[str, torch.Tensor]]  # other adapters: (name, their rows)


class _RowStacks:
    """A layer's LoRA factors stacked for gathering by row (BGMV).

    Slot 0 holds zeros (rows with no adapter, or an adapter this layer does not carry); slot i+1
    holds adapter i with A zero-padded to the largest rank and the scaling folded into B, so padding
    contributes exactly nothing and every row's delta is s·B A x. The stacks are copies made without
    gradient tracking: this path serves inference. Weights of frozen adapters are taken as fixed
    (serving loads them once); trainable ones are re-checked through their version counters.
    """

    def __init__(self, key: tuple, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                 adapters: tuple[LayerAdapter, ...]):
        self.key = key
        # The key holds the adapters' ids; keeping the adapters alive keeps a deleted adapter's id
        # from being reused by a newly loaded one, which would look unchanged.
        self._adapters = adapters
        self.index = {name: slot + 1 for slot, name in enumerate(factors)}
        self._watched = [(t, t._version) for a, b, _ in factors.values() for t in (a, b) if t.requires_grad]
        self._last_plan: tuple[tuple, _RowPlan] | None = None
        self._gathered: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (slots, Aᵀ rows, Bᵀ rows)
        if not factors:
            return
        first_a, first_b, _ = next(iter(factors.values()))
        rank = max(a.shape[0] for a, _, _ in factors.values())
        self.a = first_a.new_zeros((len(factors) + 1, rank, first_a.shape[1]))  # (n+1, R, in)
        self.b = first_b.new_zeros((len(factors) + 1, first_b.shape[0], rank))  # (n+1, out, R)
        with torch.no_grad():
            for slot, (a, b, scaling) in enumerate(factors.values(), start=1):
                self.a[slot, : a.shape[0]] = a
                self.b[slot, :, : b.shape[1]] = b * scaling

    def weights_changed(self) -> bool:
        return any(tensor._version != version for tensor, version in self._watched)

    def plan(self, names: tuple, adapters: nn.ModuleDict, device: torch.device) -> _RowPlan:
        """Which rows gather which slot, and which rows go through their adapter's own path.
        Decoding steps repeat the same names, so the last plan is kept."""
        if self._last_plan is not None and self._last_plan[0] == names:
            return self._last_plan[1]
        present = [n for n in dict.fromkeys(names) if n is not None and n in adapters]
        if any(adapters[n].modifies_input for n in present):
            raise AdapterError("per-row batching supports output-side adapters only (e.g. LoRA), not input scaling")
        slots = None
        if any(n in self.index for n in present):
            slots = torch.tensor([self.index.get(n, 0) for n in names], dtype=torch.long, device=device)
        own_rows = [(name, torch.tensor([i for i, n in enumerate(names) if n == name], device=device))
                    for name in present if name not in self.index]
        plan = _RowPlan(slots, own_rows)
        self._last_plan = (names, plan)
        return plan

    def delta(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """s·B A x for each row with its own adapter: x (B, ..., in) -> (B, ..., out)."""
        a_rows, b_rows = self._rows_of(slots)
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.a.dtype)  # (B, T, in)
        low = torch.bmm(flat, a_rows)  # (B, T, R)
        delta = torch.bmm(low, b_rows)  # (B, T, out)
        return delta.reshape(*x.shape[:-1], delta.shape[-1])

    def _rows_of(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's Aᵀ (B, in, R) and s·Bᵀ (B, R, out), gathered once per plan: decoding steps with
        the same rows reuse them (the gather copies more bytes than the two small matmuls read)."""
        if self._gathered is None or self._gathered[0] is not slots:
            a_rows = self.a[slots].transpose(1, 2).contiguous()
            b_rows = self.b[slots].transpose(1, 2).contiguous()
            self._gathered = (slots, a_rows, b_rows)
        return self._gathered[1], self._gathered[2]
