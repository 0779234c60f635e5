"""The LoRA layer adapter behind every non-default initialisation.

PiSSA, OLoRA, CorDA and LoRA-GA start A, B at components of W and train on the residual
W_res = W - s·B0 A0 (B0, A0: the initial factors). We keep W untouched and apply the residual
on the fly instead::

    h = W x - s·B0 A0 x + s·B A dropout(x)

which equals W_res x + s·B A x exactly. Keeping W means the base model stays the base model:
disabling the adapter gives the original outputs, several adapters can share one base, unmerge
restores W, and the adapter exports as a plain LoRA delta relative to the original W,
ΔW = s·(B A - B0 A0), with no second copy of the model. The price is a second rank-r product per
forward. B0, A0 are non-persistent buffers: they are re-derived from W (or from calibration
data) whenever the adapter is built, exactly as PEFT re-derives them on load.

EVA leaves B at zero and LoftQ replaces the base weight by its quantized version, so neither has a
residual: for them this class is plain LoRA with other starting values.

Data-driven inits (CorDA, LoRA-GA, EVA) are *pending* from ``add_adapter`` until
``initialize_lora`` has seen calibration batches; a pending adapter refuses to run, so training
never silently starts from placeholder values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.adapters.lora.lora import LoraLinear
from tuneforge.errors import AdapterError


class InitialisedLoraLinear(LoraLinear):
    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 use_rslora: bool, transposed: bool, init: str, module_name: str):
        super().__init__(in_features, out_features, r, alpha, dropout, use_rslora, "kaiming", transposed)
        self.init = init
        self.module_name = module_name
        self.pending = False
        self.register_buffer("init_A", None, persistent=False)  # (r, in) A0, when W keeps a residual
        self.register_buffer("init_B", None, persistent=False)  # (out, r) B0

    def start_from(self, lora_A: torch.Tensor, lora_B: torch.Tensor, residual: bool) -> None:
        """Set A, B; with ``residual`` the same product is subtracted from W (virtually)."""
        with torch.no_grad():
            self.lora_A.copy_(lora_A.to(self.lora_A.dtype))
            self.lora_B.copy_(lora_B.to(self.lora_B.dtype))
        self.init_A = self.lora_A.detach().clone() if residual else None
        self.init_B = self.lora_B.detach().clone() if residual else None
        self.pending = False

    @property
    def has_residual(self) -> bool:
        return self.init_A is not None

    def residual_output(self, x: torch.Tensor) -> torch.Tensor:
        """s·B0 A0 x, on the undropped input: it is part of the frozen base, not of the trained path."""
        x = x.to(self.init_A.dtype)
        return F.linear(F.linear(x, self.init_A), self.init_B) * self.scaling

    def transform_output(self, x, out, base_layer):
        self._refuse_if_pending()
        delta = self.lora_output(x)
        if self.has_residual:
            delta = delta - self.residual_output(x)
        return out + delta.to(out.dtype)

    def delta_weight(self, base_layer) -> torch.Tensor:
        self._refuse_if_pending()
        product = self.lora_B @ self.lora_A
        if self.has_residual:
            product = product - self.init_B @ self.init_A
        delta = product * self.scaling  # (out, in)
        return delta.T if self.transposed else delta

    def low_rank_factors(self):
        """Batched per-row serving may gather A, B only when the layer is exactly out + s·B A x."""
        if self.pending or self.has_residual:
            return None
        return self.lora_A, self.lora_B, self.scaling

    def load_file_tensors(self, tensors, where):
        if self.pending and self.init != "eva":
            raise AdapterError(
                f"'{where}' was trained from init={self.init}, which moved components found with calibration "
                "data out of the base weights; a saved file holds only the trained A and B, so the residual "
                "cannot be rebuilt on this base. Export the adapter with "
                "tuneforge.adapters.lora.inits.export_as_plain_lora(model, name, directory) (a plain LoRA of rank "
                "2r for the unmodified base, loadable anywhere), or add_adapter + initialize_lora with the "
                "same calibration batches, then load_adapter_weights."
            )
        super().load_file_tensors(tensors, where)
        self.pending = False  # EVA keeps W unchanged: the file's A, B are the whole adapter

    def _refuse_if_pending(self) -> None:
        if self.pending:
            raise AdapterError(
                f"LoRA init '{self.init}' on '{self.module_name}' needs calibration data and has not seen any: "
                "call tuneforge.adapters.lora.inits.initialize_lora(model, adapter_name, batches) after add_adapter "
                "(the trainer does this with its first `training.init_batches` batches)."
            )
