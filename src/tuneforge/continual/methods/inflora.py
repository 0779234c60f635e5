"""``inflora``: interference-free low-rank adaptation (Liang & Li 2024, "InfLoRA: Interference-Free
Low-Rank Adaptation for Continual Learning", CVPR, arXiv:2404.00228).

    method: {name: inflora, energy: 0.95}

Each task adds a LoRA ΔW_t = B_t A_t (PEFT's ``lora_B`` (out, r) times ``lora_A`` (r, in)) whose
down-projection A_t is *designed* before the task and frozen; only B_t trains. Every
update then lies in the row space of A_t, ΔW_t = B_t A_t. If A_t's rows are orthogonal to the
earlier tasks' input subspace M (orthonormal columns, per layer), ΔW_t x = 0 for every earlier
input x in span(M): the new task cannot interfere with the old ones (the paper's interference-free condition).
The design takes the new task's inputs H_t (collected in the loop's ``prepare`` hook on its first
batches) and sets A_t's rows to the top-r eigenvectors of

    (I - M Mᵀ) H_t H_tᵀ (I - M Mᵀ)

(the new task's input directions that the old tasks do not use). After the task, M grows GPM-style
(Saha et al. 2021, "Gradient Projection Memory", the DualGPM step the paper uses): the fewest new
directions of the residual (I - M Mᵀ) H_t such that M captures ``energy`` of H_t's squared norm.
Earlier tasks' LoRAs stay frozen (folded into the base, the same function as keeping them summed).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.continual.methods.base import ADAPTER_NAME, ContinualMethod, Stage
from tuneforge.continual.methods.lora_layers import fold_in, input_covariances, lora_layers, require_lora, task_batches


class InfLoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    energy: float = Field(0.95, gt=0, le=1, description="fraction of each task's input energy the protected subspace keeps")
    subspace_batches: int = Field(8, ge=1, description="batches of a finished task used to grow the protected subspace")


def complement_projector(basis: torch.Tensor | None, size: int) -> torch.Tensor:
    """I - M Mᵀ for M (in, k) with orthonormal columns; I without a basis."""
    identity = torch.eye(size, dtype=torch.float64)
    return identity if basis is None or basis.shape[1] == 0 else identity - basis.double() @ basis.double().T


def designed_down_projection(covariance: torch.Tensor, basis: torch.Tensor | None, rank: int) -> torch.Tensor:
    """(r, in): the top-r eigenvectors of P H Hᵀ P, P = I - M Mᵀ, as rows (orthonormal, ⟂ M)."""
    projector = complement_projector(basis, covariance.shape[0])
    projected = projector @ covariance.double() @ projector
    eigenvalues, eigenvectors = torch.linalg.eigh((projected + projected.T) / 2)  # ascending
    top = eigenvectors[:, eigenvalues.argsort(descending=True)[:rank]]  # (in, r)
    return (projector @ top).T.contiguous()  # re-projected: ⟂ M up to rounding even where eigenvalues tie at 0


def grow_basis(covariance: torch.Tensor, basis: torch.Tensor | None, energy: float) -> torch.Tensor:
    """M with the fewest residual directions added so that ‖M Mᵀ H‖² ≥ energy ‖H‖² (H Hᵀ = covariance)."""
    size = covariance.shape[0]
    covariance = covariance.double()
    total = torch.trace(covariance)
    current = basis.double() if basis is not None else torch.zeros(size, 0, dtype=torch.float64)
    captured = torch.trace(current.T @ covariance @ current) if current.shape[1] else torch.zeros((), dtype=torch.float64)
    if total <= 0 or captured >= energy * total:
        return current.float()
    projector = complement_projector(current, size)
    residual = projector @ covariance @ projector
    eigenvalues, eigenvectors = torch.linalg.eigh((residual + residual.T) / 2)
    order = eigenvalues.argsort(descending=True)
    added = 0
    for value in eigenvalues[order]:
        if captured >= energy * total or value <= 0 or current.shape[1] + added >= size:
            break
        captured = captured + value
        added += 1
    new = projector @ eigenvectors[:, order[:added]]
    merged, _ = torch.linalg.qr(torch.cat([current, new], dim=1))  # keep the columns orthonormal
    return merged.float()


class DesignedDownProjection(TrainingHooks):
    """prepare: set each layer's lora_A to the designed rows and freeze it (only lora_B trains)."""

    def __init__(self, bases: dict[str, torch.Tensor]):
        self.bases = bases

    def prepare(self, model: nn.Module, batches, loss_fn) -> None:
        layers = lora_layers(model, ADAPTER_NAME)
        covariances = input_covariances(model, layers, batches)
        with torch.no_grad():
            for name, lora in layers.items():
                rows = designed_down_projection(covariances[name], self.bases.get(name), lora.lora_A.shape[0])
                lora.lora_A.copy_(rows.to(lora.lora_A))
                lora.lora_A.requires_grad_(False)


class InfLora(ContinualMethod):
    name = "inflora"
    options_class = InfLoraOptions

    def __init__(self, options, context):
        require_lora(context.train_config, self.name)
        super().__init__(options, context)
        self.bases: dict[str, torch.Tensor] = {}  # layer -> M (in, k): the earlier tasks' input subspace

    def init_adapter(self, stage: Stage):
        return None

    def training_model(self, stage: Stage, base: nn.Module) -> nn.Module:
        return fold_in(base, [done.adapter_dir for done in self.finished])

    def training_hooks(self, stage: Stage, model: nn.Module) -> list[TrainingHooks]:
        return [DesignedDownProjection(self.bases)]

    def after_task(self, stage: Stage, model: nn.Module, tokenizer) -> None:
        (task_index,) = stage.tasks
        config = self.context.train_config
        batches = task_batches(self.context.tasks[task_index].train, tokenizer, config, self.options.subspace_batches)
        layers = lora_layers(model, ADAPTER_NAME)
        for name, covariance in input_covariances(model, layers, batches).items():
            self.bases[name] = grow_basis(covariance, self.bases.get(name), self.options.energy)

    def state_dict(self) -> dict:
        return {"bases": self.bases}

    def load_state_dict(self, state: dict) -> None:
        self.bases = dict(state.get("bases", {}))
