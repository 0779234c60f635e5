"""Fused LoRA projections: q/k/v (and gate/up) as one GEMM over their concatenated base weights.

Usage: ``fuse_projections(model)`` after the adapter is attached and the model is on its device
(``training.fused_projections``); ``unfuse_projections(model)`` gives every base layer its own weight
back. The result equals the unfused layers' up to float rounding (tests/adapters/test_fused_projections.py).

Siblings that read the same input (``q_proj``, ``k_proj``, ``v_proj`` of an attention block; ``gate_proj``,
``up_proj`` of an MLP) become one group; every other eligible LoRA/DoRA Linear is a group of one. A
group's base weights are moved into one (out_total, in) tensor once, and each base layer's ``weight``
becomes a view of its rows, so nothing is copied per step and no memory is added. The first member
called with an input computes the whole group, the others take their slice of that result:

    Y = x W_catᵀ + [s₁ U₁ B₁ᵀ | s₂ U₂ B₂ᵀ | ...],   U = x A_catᵀ  (one GEMM for every member's A)

LoRA (Hu et al. 2022, arXiv:2106.09685, Eq. 3: h = W₀x + s·BAx) then adds the bias; DoRA (Liu et al.
2024, arXiv:2402.09353, §4, with the norm detached as its §4.3 says) is m/‖W + s·BA‖ · (W x + s·BAx) + bias, the same as ``DoraLinear``'s
``out + (scale − 1)·W x + scale·s·BAx`` rearranged.

``_FrozenBaseLoraFn`` is the autograd function of the group: the base is frozen, so backward computes no
base weight gradient, and it reuses U saved in forward instead of recomputing x Aᵀ:

    dX = dY W_cat + G A_cat,   G = [s₁ dY₁ B₁ | s₂ dY₂ B₂ | ...]
    dA_cat = Gᵀ x,   dB_i = s_i dY_iᵀ U_i

A group runs unfused (``AdaptedLayer``'s own forward) whenever the fused math would differ: an active
dropout, another adapter active or merged, per-row serving, a base weight that was replaced or trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.adapters.layer import AdaptedLayer
from tuneforge.adapters.lora.dora import DoraLinear
from tuneforge.adapters.lora.lora import LoraLinear

# Sibling projections that transformers' decoder blocks call with the same input tensor.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fused_kind(adapter: nn.Module) -> str | None:
    """"lora" or "dora" when the adapter's forward is exactly plain LoRA's or DoRA's; None otherwise
    (a subclass that changes the math keeps its own path)."""
    if not isinstance(adapter, LoraLinear) or adapter.transposed:
        return None
    return fused_kind_of_class(type(adapter))


def fused_kind_of_class(cls: type) -> str | None:
    """The math a LoraLinear class's forward does, as far as fusing is concerned (see ``fused_kind``)."""
    if cls.lora_output is not LoraLinear.lora_output:
        return None
    if cls.transform_output is LoraLinear.transform_output:
        return "lora"
    if (cls.transform_output is DoraLinear.transform_output
            and cls._adapted_weight_norm is DoraLinear._adapted_weight_norm):
        return "dora"
    return None


class _FrozenBaseLoraFn(torch.autograd.Function):
    """x (N, in), W_cat (O, in) frozen, A_cat (R, in), B_i (o_i, r_i) -> x W_catᵀ + [s_i U_i B_iᵀ] (N, O)."""

    @staticmethod
    def forward(ctx, x, weight, a_cat, ranks, outs, scalings, *bs):
        out = F.linear(x, weight)  # (N, O)
        u = F.linear(x, a_cat)  # (N, R)
        for u_i, b, out_i, s in zip(u.split(ranks, dim=-1), bs, out.split(outs, dim=-1), scalings):
            out_i.add_(F.linear(u_i, b), alpha=s)
        # x is needed only for A's gradient: a frozen A (LoRA-FA) keeps just U, as that method intends.
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, weight, a_cat, u, *bs)
        ctx.layout = (ranks, outs, scalings)
        return out

    @staticmethod
    def backward(ctx, d_out):
        x, weight, a_cat, u, *bs = ctx.saved_tensors
        ranks, outs, scalings = ctx.layout
        d_outs = d_out.split(outs, dim=-1)
        g = torch.cat([(d_i @ b) * s for d_i, b, s in zip(d_outs, bs, scalings)], dim=-1)  # (N, R)
        d_x = d_a = None
        if ctx.needs_input_grad[0]:
            d_x = torch.addmm(g @ a_cat, d_out, weight)  # dY W_cat + G A_cat
        if ctx.needs_input_grad[2]:
            d_a = g.T @ x  # (R, in)
        d_bs = [(d_i.T @ u_i) * s if ctx.needs_input_grad[6 + i] else None
                for i, (d_i, u_i, s) in enumerate(zip(d_outs, u.split(ranks, dim=-1), scalings))]
        return d_x, None, d_a, None, None, None, *d_bs


class FusedGroup:
    """Base layers whose weights are rows of one tensor, and the input of the last fused call."""

    def __init__(self, layers: list[AdaptedLayer], adapter_name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        self.layers = layers
        self.adapter_name = adapter_name
        self.weight = weight  # (O, in): the members' base weights, stacked
        self.bias = bias
        self.outs = tuple(layer.base_layer.out_features for layer in layers)
        self._pending: tuple[torch.Tensor, int, dict[int, torch.Tensor]] | None = None

    def output(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor | None:
        """This member's output for ``x`` (computing the whole group once per input), or None when
        the group must run unfused."""
        pending = self._pending
        if pending is not None and pending[0] is x and pending[1] == _version(x) and id(layer) in pending[2]:
            result = pending[2].pop(id(layer))
            if not pending[2]:
                self._pending = None
            return result
        adapters = self._fusable_adapters()
        if adapters is None:
            self._pending = None
            return None
        outputs = self._compute(x, adapters)
        mine = outputs.pop(id(layer))
        self._pending = (x, _version(x), outputs) if outputs else None
        return mine

    def _fusable_adapters(self) -> list[LoraLinear] | None:
        adapters = []
        for layer, rows in zip(self.layers, self._row_ranges()):
            live = layer.live_adapters()
            weight = layer.base_layer.weight
            if (layer.row_adapters is not None or layer.merged or len(live) != 1 or weight.requires_grad
                    or layer.active != [self.adapter_name] or not _is_rows_of(weight, self.weight, rows)):
                return None
            adapter = live[0]
            dropout_active = adapter.training and not isinstance(adapter.dropout, nn.Identity)
            if fused_kind(adapter) is None or dropout_active:
                return None
            adapters.append(adapter)
        dtypes = {a.lora_A.dtype for a in adapters} | {a.lora_B.dtype for a in adapters}
        return adapters if len(dtypes) == 1 else None

    def _row_ranges(self):
        start = 0
        for size in self.outs:
            yield start, start + size
            start += size

    def _compute(self, x: torch.Tensor, adapters: list[LoraLinear]) -> dict[int, torch.Tensor]:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])  # (N, in)
        a_cat = torch.cat([a.lora_A for a in adapters])  # (R, in)
        dtype = _compute_dtype(flat, a_cat)
        weight = self.weight.to(dtype)
        fused = _FrozenBaseLoraFn.apply(flat.to(dtype), weight, a_cat.to(dtype), tuple(a.r for a in adapters),
                                        self.outs, tuple(a.scaling for a in adapters),
                                        *(a.lora_B.to(dtype) for a in adapters))  # (N, O)
        outputs = {}
        biases = self.bias.split(self.outs) if self.bias is not None else [None] * len(self.outs)
        for layer, adapter, piece, bias in zip(self.layers, adapters, fused.split(self.outs, dim=-1), biases):
            if fused_kind(adapter) == "dora":
                scale = adapter.lora_magnitude_vector / adapter._adapted_weight_norm(layer.base_layer).detach()
                piece = piece * scale.to(piece.dtype)
            if bias is not None:
                piece = piece + bias.to(piece.dtype)
            outputs[id(layer)] = piece.reshape(*lead, piece.shape[-1])
        return outputs


def _version(x: torch.Tensor) -> int:
    """The in-place write counter; inference-mode tensors (the serving engine's) have none."""
    return -1 if x.is_inference() else x._version


def _compute_dtype(x: torch.Tensor, a_cat: torch.Tensor) -> torch.dtype:
    """What the unfused layers multiply in: the autocast dtype when autocast is on, else the input's.
    (Unfused LoRA casts x to the adapter's dtype for its own product; the base product is the larger one.)"""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, a_cat.dtype)


def _is_rows_of(weight: torch.Tensor, stacked: torch.Tensor, rows: tuple[int, int]) -> bool:
    start, _ = rows
    return (weight.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
            and weight.storage_offset() == stacked.storage_offset() + start * stacked.stride(0)
            and weight.shape == (rows[1] - rows[0], stacked.shape[1]))


def fuse_projections(model: nn.Module, adapter_name: str) -> int:
    """Group the model's eligible adapted Linears (siblings sharing an input together); returns the
    number of layers that take the fused path."""
    fused = 0
    for parent in model.modules():
        children = dict(parent.named_children())
        grouped = set()
        for names in SHARED_INPUT_GROUPS:
            members = [children[n] for n in names if _eligible(children.get(n), adapter_name)]
            if len(members) >= 2 and _same_layout(members):
                _make_group(members, adapter_name)
                grouped.update(id(m) for m in members)
                fused += len(members)
        for child in children.values():
            if id(child) not in grouped and _eligible(child, adapter_name):
                _make_group([child], adapter_name)
                fused += 1
    return fused


def unfuse_projections(model: nn.Module) -> None:
    """Give each base layer a weight of its own again (e.g. before saving the base with safetensors,
    which refuses tensors that share memory)."""
    for module in model.modules():
        if isinstance(module, AdaptedLayer) and module.fused is not None:
            weight = module.base_layer.weight
            module.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            module.fused = None


def _eligible(module: nn.Module | None, adapter_name: str) -> bool:
    return (isinstance(module, AdaptedLayer) and module.fused is None and type(module.base_layer) is nn.Linear
            and not module.base_layer.weight.requires_grad
            and (module.base_layer.bias is None or not module.base_layer.bias.requires_grad)
            and adapter_name in module.adapters
            and fused_kind(module.adapters[adapter_name]) is not None)


def _same_layout(members: list[AdaptedLayer]) -> bool:
    bases = [m.base_layer for m in members]
    first = bases[0].weight
    return (all(b.in_features == bases[0].in_features and b.weight.dtype == first.dtype and b.weight.device == first.device
                for b in bases)
            and len({b.bias is None for b in bases}) == 1)


def _make_group(members: list[AdaptedLayer], adapter_name: str) -> None:
    bases = [m.base_layer for m in members]
    with torch.no_grad():
        weight = torch.cat([b.weight for b in bases])  # (O, in)
        bias = torch.cat([b.bias for b in bases]) if bases[0].bias is not None else None
    start = 0
    for base in bases:
        rows = base.out_features
        base.weight = nn.Parameter(weight[start: start + rows], requires_grad=False)
        if bias is not None:
            base.bias = nn.Parameter(bias[start: start + rows], requires_grad=False)
        start += rows
    group = FusedGroup(members, adapter_name, weight, bias)
    for member in members:
        member.fused = group
