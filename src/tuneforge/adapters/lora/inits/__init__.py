"""LoRA initialisations beyond B = 0: the ``init`` values of ``LoraConfig``.

    pissa    principal singular components of W (pissa.py)             from W, at add_adapter
    olora    QR of W (olora.py)                                          from W, at add_adapter
    loftq    NF4 base Q and the SVD of W - Q (loftq.py)                  from W, at add_adapter
    corda    SVD of W · input covariance (corda.py)                      from calibration batches
    lora-ga  SVD of the first full-weight gradient (lora_ga.py)          from calibration batches
    eva      top input directions, ranks redistributed (eva.py)          from calibration batches

Data-driven inits run in ``initialize_lora(model, name, batches)``; the trainer calls it through
the LoRA method's ``TrainingHooks.prepare``. How the residual W - s·B0 A0 is kept, and why W itself
stays untouched, is in residual.py; ``export_as_plain_lora`` writes such an adapter as a plain
rank-2r LoRA for the original base (export.py).
"""

from __future__ import annotations

from torch import nn

from tuneforge.adapters.config import LoraConfig
from tuneforge.adapters.hooks import TrainingHooks
from tuneforge.adapters.lora.inits.calibration import DATA_DRIVEN_INITS, initialize_lora
from tuneforge.adapters.lora.inits.export import export_as_plain_lora
from tuneforge.adapters.lora.inits.loftq import loftq_factors
from tuneforge.adapters.lora.inits.olora import olora_factors
from tuneforge.adapters.lora.inits.pissa import pissa_factors
from tuneforge.adapters.lora.inits.residual import InitialisedLoraLinear
from tuneforge.adapters.lora.lora import is_transposed, weight_shape
from tuneforge.errors import AdapterError, ConfigError
from tuneforge.quant.linear import QuantLinear

__all__ = ["InitialisedLoraLinear", "build_initialised_lora", "export_as_plain_lora", "initialize_lora",
           "lora_init_hooks"]


def build_initialised_lora(base_layer: nn.Module, config: LoraConfig, module_name: str, r: int,
                           alpha: float) -> InitialisedLoraLinear:
    """``build_lora``'s branch for every init except kaiming/gaussian."""
    _check_supported(base_layer, config, module_name, r)
    in_features, out_features = weight_shape(base_layer)
    adapter = InitialisedLoraLinear(in_features, out_features, r, alpha, config.dropout, config.use_rslora,
                                    is_transposed(base_layer), config.init, module_name)
    if config.init in DATA_DRIVEN_INITS:
        adapter.pending = True
        return adapter
    weight = _weight_out_in(base_layer)
    if config.init == "pissa":
        adapter.start_from(*pissa_factors(weight, r, adapter.scaling, config.pissa_niter), residual=True)
    elif config.init == "olora":
        adapter.start_from(*olora_factors(weight, r), residual=True)
    else:
        quantized, lora_A, lora_B = loftq_factors(weight, r, adapter.scaling, config.loftq_iters)
        _replace_base_weight(base_layer, quantized)
        adapter.start_from(lora_A, lora_B, residual=False)
    return adapter


def _check_supported(base_layer: nn.Module, config: LoraConfig, module_name: str, r: int) -> None:
    init = config.init
    if isinstance(base_layer, nn.Embedding):
        what = ("LoftQ quantizes Linear weights for a 4-bit base (QuantLinear); embeddings stay in full precision"
                if init == "loftq" else "it is defined for Linear/Conv1D weights")
        raise AdapterError(
            f"init={init} cannot be applied to the Embedding '{module_name}': {what}. Remove it from "
            "target_modules (or add it to exclude_modules), or use init=kaiming for embeddings in a separate adapter."
        )
    if config.use_dora:
        raise ConfigError(f"init={init} with use_dora=true is not supported; set use_dora=false or init=kaiming")
    if isinstance(base_layer, QuantLinear) and init in ("loftq", "lora-ga"):
        raise AdapterError(
            f"init={init} on '{module_name}' needs the full-precision weight, but the layer is already quantized "
            f"({base_layer.quant_type}). Add the adapter before quantizing (LoftQ quantizes the base itself)."
        )
    in_features, out_features = weight_shape(base_layer)
    if init == "lora-ga" and 2 * r > min(in_features, out_features):
        raise AdapterError(
            f"init=lora-ga uses the top 2r={2 * r} singular directions of the gradient of '{module_name}', but its "
            f"weight is {out_features}x{in_features}; lower r to at most {min(in_features, out_features) // 2}."
        )


def _weight_out_in(base_layer: nn.Module):
    weight = base_layer.weight.detach().float()
    return weight.T if is_transposed(base_layer) else weight


def _replace_base_weight(base_layer: nn.Module, weight_out_in) -> None:
    target = base_layer.weight
    new = weight_out_in.T if is_transposed(base_layer) else weight_out_in
    target.data.copy_(new.to(target.dtype))


class CalibrationHooks(TrainingHooks):
    """Runs the data-driven init on the trainer's first batches."""

    def __init__(self, adapter_name: str):
        self.adapter_name = adapter_name

    def prepare(self, model, batches, loss_fn):
        initialize_lora(model, self.adapter_name, batches, loss_fn)


def lora_init_hooks(model: nn.Module, adapter_name: str, config: LoraConfig) -> TrainingHooks | None:
    """The LoRA method's ``hooks`` factory: only data-driven inits ask for anything."""
    return CalibrationHooks(adapter_name) if config.init in DATA_DRIVEN_INITS else None
