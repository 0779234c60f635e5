"""SLoRA: a federated sparse warm-up, then LoRA initialised from its update by SVD (``federated.method: slora``).

    adapter: {method: lora, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}   # stage 2
    federated: {method: slora, rounds: 5, slora_sparse_rounds: 2, slora_density: 0.01}

Paper: Babakniya et al., "SLoRA: Federated Parameter Efficient Fine-Tuning of Language Models",
arXiv:2308.06522, §4 (the two-stage method). Stage 1 trains a sparse ΔW on a fixed random mask of
density d (~1%) shared by every client: here a SHiRA adapter (``adapters/selective/shira.py``) with
``mask_type: random`` and the mask seeded by ``federated.seed``, so the mask is a pure function of
the config and clients send only the d·out·in masked values, averaged by ordinary FedAvg. Stage 2
starts LoRA from the rank-r truncated SVD of each layer's accumulated sparse update:

    ΔW = U Σ Vᵀ;   B = U_r Σ_r^{1/2} / √s,   A = Σ_r^{1/2} V_rᵀ / √s        so  s·B·A = U_r Σ_r V_rᵀ

(s the LoRA scaling α/r, or α/√r with rsLoRA). The base weights stay W₀; the first
``slora_sparse_rounds`` of ``federated.rounds`` are stage 1, the rest stage 2 (plain FedAvg of LoRA).
"""

from __future__ import annotations

import copy

import numpy as np

from tuneforge.errors import ConfigError

SPARSE_LEAF = "shira_weight"
INDEX_LEAF = "shira_indices"


def sparse_stage_config(raw: dict, density: float, seed: int) -> dict:
    """The config the clients train stage 1 with: the LoRA's targets as a SHiRA adapter of ``density``
    on a random mask every party derives from ``seed``, averaged by plain FedAvg."""
    stage = copy.deepcopy(raw)
    lora = stage["adapter"]
    stage["adapter"] = {"method": "shira", "density": density, "mask_type": "random", "random_seed": seed,
                        **{key: lora[key] for key in ("target_modules", "exclude_modules", "layers_to_transform",
                                                       "layers_pattern") if key in lora}}
    stage["federated"] = {**stage["federated"], "method": "fedavg"}
    return stage


def lora_stage_config(raw: dict) -> dict:
    """The config the clients train stage 2 with: the config's own LoRA, averaged by plain FedAvg."""
    stage = copy.deepcopy(raw)
    stage["federated"] = {**stage["federated"], "method": "fedavg"}
    return stage


def svd_lora_init(sparse: dict[str, np.ndarray], lora: dict[str, np.ndarray],
                  scalings: dict[str, float]) -> dict[str, np.ndarray]:
    """Stage 2's LoRA factors from stage 1's averaged SHiRA tensors.

    ``sparse``: SHiRA file tensors (``<layer>.shira_weight`` (k,), ``<layer>.shira_indices`` (2, k) rows/cols
    of the (out, in) ΔW); ``lora``: the LoRA file tensors at init (for their keys and shapes: A (r, in),
    B (out, r)); ``scalings``: each layer prefix's LoRA scaling s. Returns every LoRA tensor, A and B set
    to the factors of the rank-r truncated SVD of ΔW / s."""
    layers = {key.rsplit(".", 2)[0] for key in lora if key.endswith("lora_A.weight")}
    sparse_layers = {key.rsplit(".", 1)[0] for key in sparse if key.endswith(SPARSE_LEAF)}
    if layers != sparse_layers:
        raise ConfigError(f"slora: the sparse stage trained layers {sorted(sparse_layers - layers)[:3]} that the LoRA "
                          f"lacks, and the LoRA has {sorted(layers - sparse_layers)[:3]} it did not: both stages must "
                          "target the same modules")
    initialised = dict(lora)
    for layer in sorted(layers):
        a_key, b_key = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
        rank, in_features = lora[a_key].shape
        out_features = lora[b_key].shape[0]
        delta = sparse_delta(sparse[f"{layer}.{SPARSE_LEAF}"], sparse[f"{layer}.{INDEX_LEAF}"],
                             (out_features, in_features))
        u, singular, vt = np.linalg.svd(delta, full_matrices=False)  # (out, m), (m,), (m, in); m = min(out, in)
        root = np.sqrt(singular[:rank] / scalings[layer])
        factor_b = np.zeros((out_features, rank))  # a rank above min(out, in) keeps its extra columns at zero
        factor_a = np.zeros((rank, in_features))
        kept = len(root)
        factor_b[:, :kept] = u[:, :kept] * root
        factor_a[:kept] = root[:, None] * vt[:kept]
        initialised[a_key] = factor_a.astype(np.float32)
        initialised[b_key] = factor_b.astype(np.float32)
    return initialised


def sparse_delta(values: np.ndarray, indices: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The dense (out, in) ΔW of one SHiRA layer, in float64."""
    delta = np.zeros(shape)
    rows, cols = np.asarray(indices, np.int64)
    delta[rows, cols] = np.asarray(values, np.float64)
    return delta


def lora_scalings(model, name: str) -> dict[str, float]:
    """Each LoRA layer's scaling s, by its file-key prefix (``<PEFT prefix><module name>``)."""
    from tuneforge.adapters.model import wrapped_layers
    from tuneforge.adapters.peft_format import PREFIX

    return {f"{PREFIX}{layer_name}": float(layer.adapters[name].scaling)
            for layer_name, layer in wrapped_layers(model) if name in layer.adapters}
