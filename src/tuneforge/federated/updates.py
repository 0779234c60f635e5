"""What clients send and how the server combines it: FedAvg and FFA-LoRA over adapter tensors.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data", arXiv:1602.05629, Algorithm 1): the new global weights are Σ_k (n_k / n) w_k, n_k being client
k's example count.

Averaged per tensor, a LoRA's factors give the product mean(B)·mean(A), which is *not* the average
mean(B·A) of the clients' updates ΔW_k = s·B_k A_k: FedAvg of LoRA is inexact.

FFA-LoRA (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
arXiv:2403.12313, §4): A stays frozen at one random init shared by all clients and only B trains, so
mean(B_k)·A = mean(B_k·A) and the average of the factors is exactly the average of the updates. Here
that is the adapter method ``lora-fa`` (A a buffer, never trained); clients send B only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from tuneforge.adapters.peft_format import adapter_state
from tuneforge.merge.compress import from_sparse_ternary, sparse_ternary

PART_SEPARATOR = "::"  # "<adapter key>::mask" etc.: the parts of one compressed tensor


def trained_keys(model: nn.Module, name: str) -> list[str]:
    """File keys of the adapter tensors training can change: what a client must send back."""
    return sorted(key for key, tensor in adapter_state(model, name).items() if tensor.requires_grad)


def state_arrays(model: nn.Module, name: str, keys: list[str] | None = None) -> dict[str, np.ndarray]:
    """The adapter's tensors (all, or ``keys``) as float32 numpy arrays, the form Flower sends."""
    state = adapter_state(model, name)
    chosen = keys if keys is not None else sorted(state)
    return {key: state[key].detach().to("cpu", torch.float32).numpy().copy() for key in chosen}


def update_problem(update: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why ``update`` cannot be averaged (wrong keys, shapes, dtype, non-finite values), or None."""
    missing = sorted(set(expected) - set(update))
    extra = sorted(set(update) - set(expected))
    if missing or extra:
        return f"keys differ from the expected adapter tensors (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, shape in expected.items():
        array = update[key]
        if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
            return f"{key}: expected a float array, got {getattr(array, 'dtype', type(array).__name__)}"
        if tuple(array.shape) != tuple(shape):
            return f"{key}: shape {tuple(array.shape)}, expected {tuple(shape)}"
        if not np.isfinite(array).all():
            return f"{key}: holds NaN or infinite values"
    return None


def weighted_average(updates: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Σ_k w_k u_k / Σ_k w_k per tensor (FedAvg, Algorithm 1), accumulated in float64."""
    if not updates:
        raise ValueError("nothing to average: no client update was accepted")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"client weights must sum to a positive number, got {weights}")
    averaged = {}
    for key in updates[0]:
        acc = sum(np.asarray(u[key], dtype=np.float64) * (w / total) for u, w in zip(updates, weights))
        averaged[key] = acc.astype(np.float32)
    return averaged


def compress_update(update: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                    density: float) -> dict[str, np.ndarray]:
    """ComPEFT's sparse ternary code (Yadav et al. 2023, arXiv:2311.13171; ``merge/compress.py``) of each
    tensor's change from ``reference`` (the global adapter the client started from): a bitmask of the
    top-k = ⌊density·n⌋ entries by magnitude, their signs as bits, and one scale."""
    sent = {}
    for key, value in update.items():
        delta = torch.from_numpy(np.asarray(value, np.float32) - np.asarray(reference[key], np.float32))
        for part, tensor in sparse_ternary(delta, density).items():
            sent[f"{key}{PART_SEPARATOR}{part}"] = tensor.numpy()
    return sent


def decompress_update(sent: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                      expected: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The tensors a compressed upload stands for (reference + decoded change); ValueError when the parts
    are missing, unexpected or the wrong size for the expected shapes."""
    keys = {name.rsplit(PART_SEPARATOR, 1)[0] for name in sent}
    if keys != set(expected):
        raise ValueError(f"compressed tensors {sorted(keys - set(expected))[:3]} unexpected, "
                         f"{sorted(set(expected) - keys)[:3]} missing")
    decoded = {}
    for key, shape in expected.items():
        parts = {part: torch.from_numpy(np.asarray(sent.get(f"{key}{PART_SEPARATOR}{part}", np.zeros(0))))
                 for part in ("mask", "signs", "scale")}
        count = math.prod(shape)
        if parts["mask"].dtype != torch.uint8 or parts["mask"].numel() != math.ceil(count / 8):
            raise ValueError(f"{key}: mask of {parts['mask'].numel()} bytes, expected {math.ceil(count / 8)}")
        kept = int(((parts["mask"].to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)[:count].sum())
        if parts["signs"].dtype != torch.uint8 or parts["signs"].numel() != math.ceil(kept / 8):
            raise ValueError(f"{key}: signs of {parts['signs'].numel()} bytes, expected {math.ceil(kept / 8)}")
        if parts["scale"].numel() != 1 or not torch.isfinite(parts["scale"].float()).all():
            raise ValueError(f"{key}: scale must be one finite number")
        delta = from_sparse_ternary({p: t for p, t in parts.items()}, tuple(shape), torch.float32)
        decoded[key] = (np.asarray(reference[key], np.float32) + delta.numpy()).astype(np.float32)
    return decoded
